"""The one typed configuration. ``params.yaml`` is validated at load; the CLI (``--set a.b=v``),
DVC (``dvc exp run -S``) and Ray Tune override the same dotted keys.

Sections are named after the stages that read them (``synth``, ``split``, ``train`` ...).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from training.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Section):
    """The simulated SPARCS screen (``spatial synth``)."""

    out: str = "data/raw"
    format: Literal["h5sc", "sparcspy", "both"] = "h5sc"
    image_size: int = Field(64, ge=16, le=512)
    cells_per_class: int = Field(1200, ge=1, description="labeled cells per control condition (over all slides)")
    slides_per_condition: int = Field(3, ge=1)
    timecourse_hours: list[float] = [0.0, 2.0, 4.0, 8.0, 14.0]
    cells_per_timepoint: int = Field(200, ge=1)
    screen_slides: int = Field(2, ge=0)
    cells_per_screen_slide: int = Field(4000, ge=0)
    n_genes: int = Field(60, ge=1, description="targeted genes in the gRNA library")
    grnas_per_gene: int = Field(4, ge=1)
    n_controls: int = Field(40, ge=0, description="non-targeting control gRNAs")
    n_hits: int = Field(6, ge=0, description="planted autophagy-off hit genes")
    knockout_efficiency: float = Field(0.8, gt=0, le=1)
    novel_fraction: float = Field(0.02, ge=0, le=1, description="share of screen cells from the novel-phenotype gene")
    max_cells_per_file: int = Field(10000, ge=1, description="larger slides are split into part files (same group)")
    batch_size: int = Field(256, ge=1, description="cells rendered at once (memory vs speed)")
    seed: int = 0


class IndexConfig(Section):
    manifest: str = "data/raw/manifest.csv"
    out: str = "data/index/cells.parquet"


class SplitConfig(Section):
    out: str = "data/index/splits.parquet"
    classes: list[str] = Field(default_factory=list, description="training classes; empty = every label")
    max_per_class: int | None = Field(1000, ge=1, description="class-balanced undersampling cap")
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    test_groups: list[str] = Field(default_factory=list, description="fixed held-out groups (slides)")
    unlabeled_max: int | None = Field(4000, ge=0, description="cap on unlabeled screen cells kept")
    seed: int = 0


class AugmentConfig(Section):
    flips: bool = True
    rot90: bool = True
    intensity: float = Field(0.1, ge=0, description="max relative brightness jitter")
    contrast: float = Field(0.1, ge=0)
    gamma: float = Field(0.1, ge=0)
    noise: float = Field(0.01, ge=0, description="Gaussian noise std")
    blur: float = Field(0.2, ge=0, le=1, description="probability of a small Gaussian blur")


class DataConfig(Section):
    channels: list[str | int] = Field(default_factory=list, description="names or indices; empty = image channels")
    image_size: int | None = Field(None, ge=8, description="model input size; None = as stored")
    resize: Literal["resize", "crop"] = Field("resize", description="how stored crops reach image_size")
    normalize: Literal["none", "per_cell", "fixed"] = "none"
    mean: float = 0.0
    std: float = 1.0
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(0, ge=0)
    cache: bool = Field(True, description="hold the (small) training set in memory after the first read")
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(Section):
    name: str = "convnext_custom"
    dims: list[int] = [16, 32, 64, 128]
    depths: list[int] = [1, 1, 2, 1]
    drop_rate: float = Field(0.1, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    pretrained: str | None = Field(None, description="local checkpoint file; hub weights are not fetched")


class TrainConfig(Section):
    regime: Literal["supervised", "semisupervised"] = "supervised"
    epochs: int = Field(10, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] = "none"
    patience: int | None = Field(4, ge=1, description="early stopping on validation loss; None = off")
    grad_clip: float | None = Field(1.0, gt=0)
    device: str = "auto"
    amp: bool = Field(True, description="bf16 autocast + channels_last on CUDA (ignored on CPU)")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    seed: int = 0


class EnsembleConfig(Section):
    members: int = Field(3, ge=1)
    bootstrap: bool = False
    posterior: Literal["ensemble", "mc_dropout"] = "ensemble"
    mc_samples: int = Field(10, ge=2)


class UncertaintyConfig(Section):
    temperature_scaling: bool = True
    novelty: Literal["mahalanobis", "none"] = "mahalanobis"


class EvaluateConfig(Section):
    reference_scores: str | None = Field(None, description="CSV cell_id,score from a reference classifier")
    ece_bins: int = Field(15, ge=2)


class MlflowConfig(Section):
    tracking_uri: str | None = Field(None, description="else $MLFLOW_TRACKING_URI, else sqlite mlflow.db at repo root")
    experiment: str = "spatial"


class RegistryConfig(Section):
    model_name: str = "spatial-phenotype"
    alias: str = "champion"
    metric: str = Field("test_balanced_accuracy", description="MLflow run metric that decides the alias")
    greater_is_better: bool = True


class SSLConfig(Section):
    method: Literal["fixmatch", "autoencoder"] = "fixmatch"
    threshold: float = Field(0.95, gt=0, le=1)
    unlabeled_ratio: int = Field(3, ge=1)
    unlabeled_weight: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    distribution_alignment: bool = False
    novelty_guard: bool = True
    recon_weight: float = Field(1.0, ge=0)
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of training labels kept")


class ALConfig(Section):
    strategies: list[str] = ["random", "margin", "power_bald"]
    seeds: int = Field(3, ge=1)
    initial: int = Field(40, ge=1)
    initial_method: Literal["random", "typicality"] = "random"
    query_size: int = Field(40, ge=1)
    rounds: int = Field(5, ge=1)
    pool_subsample: int | None = Field(4000, ge=1)
    power_temperature: float = Field(1.0, gt=0)
    semisupervised: bool = False
    labels_csv: str | None = None
    members: int = Field(1, ge=1)


class TuneConfig(Section):
    num_samples: int = Field(4, ge=1)
    address: str | None = None
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    metric: str = "val_balanced_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    max_failures: int = Field(1, ge=0)
    storage_path: str | None = None
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ScoreConfig(Section):
    batch_size: int = Field(256, ge=1)
    chunk_size: int = Field(4096, ge=1)


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    max_cells_per_request: int = Field(1024, ge=1)
    max_request_mb: float = Field(64.0, gt=0)
    max_batch_size: int = Field(256, ge=1)
    max_latency_ms: int = Field(500, ge=1)


class Params(Section):
    seed: int = 0
    synth: SynthConfig = SynthConfig()
    index: IndexConfig = IndexConfig()
    split: SplitConfig = SplitConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    ssl: SSLConfig = SSLConfig()
    al: ALConfig = ALConfig()
    tune: TuneConfig = TuneConfig()
    score: ScoreConfig = ScoreConfig()
    serve: ServeConfig = ServeConfig()

    @field_validator("seed")
    @classmethod
    def _seed_non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("seed must be >= 0")
        return v

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``train.lr`` ...), as logged to MLflow."""
        return flatten(self.model_dump(mode="json"))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "space":
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections as needed."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``3``, ``1e-3``, ``[a, b]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value '{raw}': {exc}") from None
    return key, value


def resolve(raw: dict[str, Any] | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Validate ``raw`` (a params dict) after applying dotted ``overrides``."""
    tree = copy.deepcopy(raw or {})
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid params: {problems}") from None


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Read ``params.yaml`` (or defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: params file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections, got {type(raw).__name__}")
    return resolve(raw, overrides)


def dump_params(params: Params, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
