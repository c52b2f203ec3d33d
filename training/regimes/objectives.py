"""The one objective builder: ``train.regime`` (and ``ssl.method``) -> the objective the engine optimises.

Supervised training, semi-supervised training, active-learning rounds and tuning trials all call
:func:`make_objective`.
"""

from __future__ import annotations

from training.config import Params
from training.data.augment import Augmenter
from training.data.trainset import TrainData, class_weights
from training.engine import SupervisedObjective
from training.errors import ConfigError
from training.regimes.semisupervised import make_ssl_objective


def make_objective(params: Params, data: TrainData, seed: int):
    """The regime's objective. Supervised here; semi-supervised objectives plug in the same way."""
    y = data.split("train")["y"].to_numpy()
    if params.train.regime == "supervised":
        return SupervisedObjective(len(data.classes), Augmenter(params.data.augment), params.train.label_smoothing,
                                   class_weights(y, len(data.classes), params.train.class_weights))
    if params.train.regime == "semisupervised":
        return make_ssl_objective(params, data, seed)
    raise ConfigError(f"train.regime: unknown regime '{params.train.regime}'")
