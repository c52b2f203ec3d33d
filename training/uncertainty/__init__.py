"""Knowing when the model does not know: ``ensemble`` (the saved deep ensemble and its scoring), ``decompose``
(total / aleatoric / epistemic), ``calibration`` (temperature scaling), ``novelty`` (feature-density scores)."""
