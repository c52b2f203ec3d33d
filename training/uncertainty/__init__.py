"""Knowing when the model does not know: ``ensemble`` (the saved deep ensemble and its scoring), ``decompose``
(total / aleatoric / epistemic: the one entropy and mutual information, also used by acquisition), ``calibration``
(temperature scaling), ``recalibration`` (the pooled temperature refitted on labeled cells of new slides),
``novelty`` (feature-density scores)."""
