"""Knowing when the model does not know: ``ensemble`` (the saved deep ensemble and its scoring), ``decompose``
(total / aleatoric / epistemic: the one entropy and mutual information, also used by acquisition), ``calibration``
(temperature scaling), ``shift`` (a label-free temperature for new slides, ATC), ``recalibration`` (the pooled
temperature refitted for new slides, on labeled cells or by ``shift``), ``novelty`` (feature-density scores)."""
