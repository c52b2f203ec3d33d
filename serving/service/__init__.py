"""The HTTP scoring service: ``api`` (the BentoML service class), ``validation`` (one request-validation layer),
``uploads`` (single-cell files sent by clients), ``schemas`` (response models)."""
