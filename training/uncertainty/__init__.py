"""Knowing when the model does not know: ``ensemble`` (the saved deep ensemble and its scoring), ``decompose``
(total / aleatoric / epistemic: the one entropy and mutual information, also used by acquisition), ``calibration`` (temperature scaling), ``novelty`` (feature-density scores)."""
