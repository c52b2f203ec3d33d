"""Search spaces over the same dotted config keys the CLI overrides (``--set train.lr=...``).

``tune.space`` in ``params.yaml`` maps a key to a dimension::

    tune:
      space:
        train.lr: {type: loguniform, low: 3.0e-4, high: 1.0e-2}
        model.dims: {type: choice, values: [[8, 16, 32, 64], [16, 32, 64, 128]]}
        model.drop_rate: {type: uniform, low: 0.0, high: 0.3}
        train.regime: {type: grid, values: [supervised, semisupervised, active]}

Types: ``choice`` (random pick), ``uniform`` / ``loguniform`` (floats), ``randint`` (ints in [low, high]) and
``grid`` (every value is run, ``num_samples`` times each with random search). ``train.regime`` takes a third
value besides the training regimes: ``active`` runs an active-learning campaign in the trial.

With Optuna search a grid dimension becomes categorical and every grid combination is queued first, so each
value is tried at least once; list values are passed to Optuna as JSON strings and decoded in the trial.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from typing import Any

import numpy as np

from training.config import Params, flatten, resolve
from training.errors import ConfigError

TYPES = ("choice", "uniform", "loguniform", "randint", "grid")
REGIMES = ("supervised", "semisupervised", "active")
REGIME_KEY = "train.regime"


def _keys(params: Params) -> set[str]:
    return set(flatten(params.model_dump(mode="json")))


def _check_value(raw: dict[str, Any], key: str, value: Any) -> None:
    if key == REGIME_KEY:
        if value not in REGIMES:
            raise ConfigError(f"tune.space.{key}: regime must be one of {', '.join(REGIMES)}, got {value!r}")
        return
    try:
        resolve(raw, {key: value})
    except ConfigError as exc:
        raise ConfigError(f"tune.space.{key}: value {value!r} is not valid ({exc})") from None


def parse_space(space: dict[str, dict[str, Any]], params: Params) -> dict[str, dict[str, Any]]:
    """Validate ``tune.space`` against ``params``: known keys, known types, bounds, values that validate."""
    if not space:
        raise ConfigError("tune.space is empty: declare at least one dimension (see tuning/space.py)")
    raw = params.model_dump(mode="json")
    known = _keys(params)
    out: dict[str, dict[str, Any]] = {}
    for key, dim in space.items():
        where = f"tune.space.{key}"
        if key not in known:
            raise ConfigError(f"{where}: not a config key (keys look like train.lr, model.dims, data.augment.noise)")
        if not isinstance(dim, dict) or "type" not in dim:
            raise ConfigError(f"{where}: expected a mapping with 'type' (one of {', '.join(TYPES)})")
        kind = dim["type"]
        if kind not in TYPES:
            raise ConfigError(f"{where}: unknown type '{kind}' (one of {', '.join(TYPES)})")
        extra = set(dim) - {"type", "values"} if kind in ("choice", "grid") else set(dim) - {"type", "low", "high"}
        if extra:
            raise ConfigError(f"{where}: unexpected field(s) {', '.join(sorted(extra))} for type {kind}")
        if kind in ("choice", "grid"):
            values = dim.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: {kind} needs a non-empty list 'values'")
            for v in values:
                _check_value(raw, key, v)
            out[key] = {"type": kind, "values": list(values)}
            continue
        try:
            low, high = float(dim["low"]), float(dim["high"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: {kind} needs numeric 'low' and 'high'") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            need = "0 < low < high" if kind == "loguniform" else "low < high"
            raise ConfigError(f"{where}: {kind} needs {need}, got low={low:g}, high={high:g}")
        if kind == "randint":
            if low != int(low) or high != int(high):
                raise ConfigError(f"{where}: randint bounds must be integers")
            low, high = int(low), int(high)
        for v in (low, high):
            _check_value(raw, key, v)
        out[key] = {"type": kind, "low": low, "high": high}
    return out


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _encode(v: Any, optuna: bool) -> Any:
    return json.dumps(v) if optuna and not _scalar(v) else v


def to_param_space(specs: dict[str, dict[str, Any]], optuna: bool = False) -> dict[str, Any]:
    """Ray Tune domains for validated ``specs`` (keys stay dotted)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in specs.items():
        kind = d["type"]
        if kind == "choice" or (kind == "grid" and optuna):
            out[key] = tune.choice([_encode(v, optuna) for v in d["values"]])
        elif kind == "grid":
            out[key] = tune.grid_search(d["values"])
        elif kind == "uniform":
            out[key] = tune.uniform(d["low"], d["high"])
        elif kind == "loguniform":
            out[key] = tune.loguniform(d["low"], d["high"])
        else:
            out[key] = tune.randint(d["low"], d["high"] + 1)  # Ray's upper bound is exclusive
    return out


def grid_points(specs: dict[str, dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """For Optuna: one complete point per grid combination (other dimensions drawn with ``seed``)."""
    grid = {k: d["values"] for k, d in specs.items() if d["type"] == "grid"}
    if not grid:
        return []
    rng = np.random.default_rng(seed)
    points = []
    for combo in itertools.product(*grid.values()):
        point: dict[str, Any] = {}
        for key, d in specs.items():
            kind = d["type"]
            if key in grid:
                v = combo[list(grid).index(key)]
            elif kind == "choice":
                v = d["values"][int(rng.integers(len(d["values"])))]
            elif kind == "uniform":
                v = float(rng.uniform(d["low"], d["high"]))
            elif kind == "loguniform":
                v = float(math.exp(rng.uniform(math.log(d["low"]), math.log(d["high"]))))
            else:
                v = int(rng.integers(d["low"], d["high"] + 1))
            point[key] = _encode(v, True)
        points.append(point)
    return points


def decode(config: dict[str, Any]) -> dict[str, Any]:
    """Trial config -> dotted overrides: JSON-encoded lists (Optuna) decoded, private ``_keys`` dropped."""
    out = {}
    for key, v in config.items():
        if key.startswith("_"):
            continue
        if isinstance(v, str) and v.startswith(("[", "{")):
            with contextlib.suppress(json.JSONDecodeError):
                v = json.loads(v)
        out[key] = v
    return out


def max_iterations(specs: dict[str, dict[str, Any]], params: Params) -> int:
    """The most ``tune.report`` calls a trial makes: epochs (trained regimes) or rounds (active learning)."""
    def largest(key: str, default: int) -> int:
        d = specs.get(key)
        if d is None:
            return default
        vals = d["values"] if "values" in d else [d["high"]]
        return int(max(vals))

    n = largest("train.epochs", params.train.epochs)
    regimes = specs.get(REGIME_KEY, {}).get("values", [params.train.regime])
    if "active" in regimes:
        n = max(n, largest("al.rounds", params.al.rounds) + 1)
    return n
