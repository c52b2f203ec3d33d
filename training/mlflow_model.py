"""The deep ensemble as one MLflow pyfunc model, logged as code (MLflow's "models from code"): MLflow runs this
file when the model loads, so nothing is pickled and the logged model does not depend on cloudpickle's format.

Input: float32 images ``(N, C, H, W)`` (the model's channels or the full stored stack); output: one row per cell with
``prob_<class>...``, ``predicted_class``, ``confidence``, ``entropy``, ``aleatoric``, ``epistemic``, ``novelty``.
The ensemble itself travels as the artifact ``ensemble``, the ``training`` package as the model's code.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import set_model


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Loads the ``ensemble`` artifact and scores images with it."""

    def load_context(self, context) -> None:
        from training.uncertainty.ensemble import Ensemble

        self.ensemble = Ensemble.load(context.artifacts["ensemble"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        # an ndarray hint: MLflow infers no schema from it (the logged signature holds the shape) and does not
        # warn that the hint is missing
        images = np.asarray(model_input, dtype=np.float32)
        return self.ensemble.to_frame(self.ensemble.predict_images(images))


set_model(EnsembleModel())
