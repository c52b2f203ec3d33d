"""The one typed configuration. ``params.yaml`` is validated at load; the CLI (``--set a.b=v``),
DVC (``dvc exp run -S``) and Ray Tune override the same dotted keys.

Sections are named after the stages that read them (``synth``, ``split``, ``train`` ...).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.errors import ConfigError

Seed = Annotated[int, Field(ge=0, description="random seed (numpy's generators take non-negative integers)")]


class Section(BaseModel):
    """A params section: unknown keys and non-finite numbers (NaN, inf) are refused; no setting means "no limit" by
    inf (an optional one is ``null``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SynthConfig(Section):
    """The simulated SPARCS screen (``spatial synth``)."""

    out: str = "data/raw"
    format: Literal["h5sc", "sparcspy", "both"] = "both"
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
    compression: Literal["gzip", "lzf", "none"] = Field(
        "gzip", description="HDF5 compression of the images. gzip writes the same bytes for the same pixels, so "
        "data/raw's DVC hash is stable. lzf (scPortrait's usual choice) reads about 1.3x faster, but h5py's LZF "
        "compressor leaves its hash table uninitialised (liblzf's INIT_HTAB 0), so its bytes can differ from run to "
        "run while the pixels do not")
    workers: int = Field(2, ge=1, description="threads generating files in parallel (same output for any number)")
    phenotype: dict[str, float | list[float]] = Field(
        default_factory=dict, description="overrides of the phenotype model's constants (training.sim.synth."
        "PhenotypeModel field -> number or [low, high]), e.g. {ei24_factor: [0.45, 0.8]} for a weaker EI24 KO; "
        "{} = the default model")
    seed: Seed = 0


class IndexConfig(Section):
    manifest: str = "data/raw/manifest.csv"
    out: str = "data/index/cells.parquet"


class SplitConfig(Section):
    out: str = "data/index/splits.parquet"
    classes: list[str] = Field(default_factory=lambda: ["stimulated", "atg5_ko"],
                               description="training classes; empty = every label")
    max_per_class: int | None = Field(1000, ge=1, description="class-balanced undersampling cap")
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.34, gt=0, lt=1)
    test_groups: list[str] = Field(default_factory=list, description="fixed held-out groups (slides)")
    unlabeled_max: int | None = Field(4000, ge=0, description="cap on unlabeled screen cells kept")
    seed: Seed = 0


class AugmentConfig(Section):
    flips: bool = True
    rot90: bool = True
    intensity: float = Field(0.1, ge=0, description="max relative brightness jitter")
    contrast: float = Field(0.1, ge=0)
    gamma: float = Field(0.1, ge=0)
    noise: float = Field(0.01, ge=0, description="Gaussian noise std")
    blur: float = Field(0.2, ge=0, le=1, description="probability of a small Gaussian blur")


class DataConfig(Section):
    channels: list[str | int] = Field(default_factory=lambda: ["LC3B"],
                                      description="names or indices; empty = image channels")
    channel_map: dict[str, str] = Field(default_factory=dict, description="model channel name -> file channel "
                                        "name (names also match ignoring case: LC3B = lc3b)")
    image_size: int | None = Field(64, ge=8, description="model input size; None = as stored")
    resize: Literal["resize", "crop"] = Field("resize", description="how stored crops reach image_size")
    normalize: Literal["none", "per_cell", "fixed"] = "none"
    mean: float = 0.0
    std: float = 1.0
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(0, ge=0)
    cache: bool = Field(True, description="hold the (small) training set in memory after the first read")
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(Section):
    name: str = "convnext_custom"
    dims: list[int] = [16, 32, 64, 128]
    depths: list[int] = [1, 1, 2, 1]
    drop_rate: float = Field(0.1, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    patch_size: Literal[1, 2, 4] = Field(4, description="ConvNeXt stem stride: 4 (timm's) starts the first stage at "
                            "a quarter of the crop's side, 1 at full resolution (more compute); with 2 timm's first "
                            "stage downsamples again, so 2 is 4's resolution")
    pretrained: str | None = Field(None, description="local checkpoint file; hub weights are not fetched")


class TrainConfig(Section):
    regime: Literal["supervised", "semisupervised"] = "supervised"
    epochs: int = Field(15, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] = "none"
    patience: int | None = Field(5, ge=1, description="early stopping on `monitor`; None = off")
    monitor: Literal["val_loss", "val_balanced_accuracy"] = Field(
        "val_loss", description="what picks the best epoch for early stopping and the restored weights: the lowest "
        "validation loss, or the highest validation balanced accuracy (the ssl study: FixMatch's loss rises while "
        "its accuracy holds)")
    grad_clip: float | None = Field(1.0, gt=0)
    probe_epochs: int = Field(
        0, ge=0, description="LP-FT: the first probe_epochs epochs train only the classifier (the backbone frozen), "
        "then the whole network; meant for fine-tuning from model.pretrained, whose features a random head would "
        "otherwise pull apart (Kumar et al. 2022). 0 = train everything from the start")
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=1, description="discriminative fine-tuning: every parameter outside the classifier learns at "
        "lr * backbone_lr_scale (the classifier at lr), so fine-tuning moves a pretrained encoder less; 1 = one rate")
    device: str = "auto"
    amp: bool = Field(True, description="bf16 autocast + channels_last on CUDA (ignored on CPU)")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    seed: Seed = 0

    @model_validator(mode="after")
    def _probe_within_training(self) -> TrainConfig:
        if self.probe_epochs > self.epochs:  # refused at load, before a command writes anything
            raise ValueError(f"train.probe_epochs={self.probe_epochs} exceeds train.epochs={self.epochs}")
        return self


class EnsembleConfig(Section):
    members: int = Field(3, ge=1)
    bootstrap: bool = False
    posterior: Literal["ensemble", "mc_dropout"] = "ensemble"
    mc_samples: int = Field(10, ge=2)


class UncertaintyConfig(Section):
    calibration: Literal["pooled", "member", "none"] = Field(
        "pooled", description="pooled: one temperature on the ensemble's averaged log-probabilities (validation); "
        "member: one temperature per member before averaging; none")
    novelty: Literal["mahalanobis", "relative_mahalanobis", "knn", "multistage_knn", "energy", "energy_multistage",
                     "pixel_knn", "energy_pixel", "energy_multistage_pixel", "pixel_mahalanobis",
                     "pixel_knn_mahalanobis", "energy_pixel_mahalanobis", "none"] = Field(
        "energy_pixel_mahalanobis", description="chosen by leave-one-class-out on the control classes, three seeds, "
        "and tests on new screens (README 'Novelty: which score')")
    knn_k: int = Field(10, ge=1, description="k of the kNN novelty scores")
    knn_bank: int = Field(5000, ge=1, description="training cells kept per member for the kNN scores")
    encoders: list[str] = Field(
        [], description="`spatial pretrain` encoder files: the kNN novelty (knn or multistage_knn) is measured on "
        "their features, averaged over them, instead of on the members' (README 'Novelty from the encoder')")

    @model_validator(mode="after")
    def _encoders_need_knn(self) -> UncertaintyConfig:
        if self.encoders and self.novelty not in ("knn", "multistage_knn"):
            raise ValueError(f"uncertainty.encoders needs uncertainty.novelty knn or multistage_knn, "
                             f"got {self.novelty}")
        return self


class DiscoverConfig(Section):
    """The discovery queue (``spatial discover``): novel cells clustered into candidate phenotypes."""

    reference: Literal["controls", "model"] = Field(
        "controls", description="controls: distance to the same slide's non-targeting cells (needs genotypes); "
        "model: the model's own novelty. Without genotypes the model is the reference")
    quantile: float = Field(0.95, gt=0, lt=1, description="novelty threshold: this quantile of the control cells' own "
                            "(leave-one-out) novelty, or of the model's validation cells")
    networks: int = Field(3, ge=1, description="controls reference: randomly initialised feature networks averaged "
                          "(seeds discover.seed, +1, ...)")
    knn_k: int = Field(10, ge=1, description="controls reference: k-th nearest control cell")
    max_controls: int = Field(5000, ge=1, description="controls reference: controls searched per slide (seeded)")
    min_controls: int = Field(50, ge=1, description="controls reference: fewer on a slide -> the pooled controls")
    max_clusters: int = Field(8, ge=1, description="Gaussian mixture components tried (1..max), chosen by BIC")
    pca_components: int = Field(10, ge=1)
    gallery_cells: int = Field(32, ge=1, description="most novel cells shown per cluster")
    seed: Seed = 0


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
    package: bool = Field(True, description="when the alias moves, save the new holder into the BentoML model store "
                          "(serving.bento.store; `spatial package` builds the Bento)")


class SSLConfig(Section):
    """Semi-supervised training (``train.regime=semisupervised``) and the label budget of every regime."""

    method: Literal["fixmatch", "autoencoder"] = "fixmatch"
    threshold: float = Field(0.95, gt=0, le=1, description="FixMatch confidence threshold for a pseudo-label")
    unlabeled_ratio: int = Field(3, ge=1, description="unlabeled cells per labeled cell in a batch (mu)")
    unlabeled_weight: float = Field(1.0, ge=0, description="weight of the unlabeled loss (lambda_u)")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA teacher that makes the pseudo-labels; 0 = the student")
    distribution_alignment: bool = False
    class_thresholds: bool = Field(False, description="FlexMatch curriculum: per-class thresholds that start low "
                                   "for classes the model seldom predicts confidently")
    balance_unlabeled: Literal[False, "predicted"] = Field(
        False, description="predicted: each epoch the unlabeled pool is drawn (with replacement, seeded) with weights "
        "inverse to the frequency of the EMA teacher's predicted class, so every predicted class gives the same "
        "share of the unlabeled batches (fixmatch only)")
    novelty_guard: bool = True
    guard_quantile: float = Field(0.95, gt=0, lt=1, description="labeled-feature distance quantile beyond which "
                                  "unlabeled cells are down-weighted as novel")
    recon_weight: float = Field(1.0, ge=0, description="autoencoder arm: weight of the reconstruction loss")
    label_fraction: float = Field(1.0, gt=0, le=1, description="class-stratified share of training labels kept "
                                  "(any regime); the other training cells become unlabeled")
    truth: str | None = Field(None, description="simulator truth.parquet: logs pseudo-label accuracy (never trains)")


class PretrainConfig(Section):
    """Self-supervised contrastive pretraining of the encoder on unlabeled cells (``spatial pretrain``, SimCLR's
    NT-Xent); fine-tune from it with ``model.pretrained=<out>/encoder.pt``."""

    epochs: int = Field(30, ge=1, description="passes over the pretraining cells")
    batch_size: int = Field(128, ge=2, description="cells per batch; each gives two views, the others are negatives")
    lr: float = Field(0.002, gt=0)
    warmup_epochs: float = Field(1.0, ge=0)
    temperature: float = Field(0.2, gt=0, description="NT-Xent softmax temperature")
    proj_dim: int = Field(64, ge=2, description="projection head output (the contrastive space; discarded after)")
    views: Literal["standard", "strong"] = Field(
        "strong", description="the augmentation of each view: data.augment as in supervised training, or the "
        "FixMatch strong view (3x photometric, blur and cutout)")
    crop_scale: float = Field(0.2, gt=0, le=1, description="smallest share of the image area a view's random "
                              "resized crop keeps (1 = no crop)")
    max_cells: int | None = Field(8000, ge=2, description="cells drawn (seeded) from train + unlabeled; null = all")


DEFAULT_STATE_CLASSES = {"on": "stimulated", "off": "unstimulated", "blocked": "atg5_ko", "partial": "ei24_ko"}


class ALConfig(Section):
    """Simulated pool-based active learning campaigns (``spatial al``)."""

    strategies: list[str] = ["random", "margin", "power_bald"]
    classes: list[str] = Field(default_factory=list, description="the campaign's classes; [] = split.classes. Other "
                               "classes make the campaign split the manifest itself with split.* (--splits unused)")
    seeds: int = Field(3, ge=1, description="campaigns per strategy (seeds al.seed, al.seed+1, ...)")
    seed: Seed = 0
    initial: int = Field(20, ge=1, description="labels in the initial set")
    initial_method: Literal["random", "typicality"] = "random"
    query_size: int = Field(45, ge=1, description="labels acquired per round")
    rounds: int = Field(4, ge=1, description="acquisition rounds after the initial set")
    pool: list[Literal["train", "unlabeled"]] = Field(["train"], min_length=1, description="splits that form the pool")
    pool_subsample: int | None = Field(2000, ge=1, description="pool cells scored per round (random subsample)")
    pool_shares: dict[str, float] = Field(
        default_factory=dict, description="class -> share of the pool ({} = the pool as it is): the largest pool "
        "with these shares of slide classes, one draw per al.seed (a pool dominated by one phenotype, as a screen is)")
    power_temperature: float = Field(1.0, gt=0, description="power_*: sample with p ~ score^(1/T)")
    posterior: Literal["mc_dropout", "ensemble"] = Field("mc_dropout", description="samples for bald / power_bald")
    members: int = Field(1, ge=1, description="models per round (ensemble posterior)")
    mc_samples: int = Field(20, ge=2)
    epochs: int = Field(10, ge=1, description="epochs over the labeled set per round (from scratch each round)")
    min_steps: int = Field(500, ge=1, description="at least this many optimizer steps per round")
    batch_size: int = Field(32, ge=1)
    semisupervised: bool = Field(False, description="FixMatch on the rest of the pool inside each round")
    full_data: bool = Field(True, description="train on the whole oracle-labeled pool as the reference")
    full_data_seeds: int | None = Field(1, ge=1, description="seeds of that reference (None: every campaign seed)")
    typicality_neighbors: int = Field(20, ge=1)
    oracle: Literal["auto", "truth", "manifest", "labels"] = Field(
        "auto", description="truth: simulator's truth.parquet beside the manifest; manifest: slide labels; "
        "labels: al.labels_csv; auto: labels_csv if set, else truth if present, else manifest")
    labels_csv: str | None = Field(None, description="CSV source_file,cell_id,label of labels a person gave")
    state_classes: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_STATE_CLASSES),
        description="simulated annotator: true state -> class name (other states: 'none of these')")

    @field_validator("pool_shares")
    @classmethod
    def _shares_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if v and (any(not 0 < x <= 1 for x in v.values()) or abs(sum(v.values()) - 1) > 1e-6):
            raise ValueError(f"al.pool_shares must be shares in (0, 1] that sum to 1, got {v}")
        return v

    @field_validator("state_classes", mode="before")
    @classmethod
    def _yaml11_booleans(cls, v: Any) -> Any:
        """YAML 1.1 readers turn unquoted ``on`` / ``off`` keys into booleans (``dvc exp run -S`` rewrites
        params.yaml without the quotes): map them back to the state names."""
        if isinstance(v, dict):
            return {({True: "on", False: "off"}[k] if isinstance(k, bool) else k): c for k, c in v.items()}
        return v


def _default_space() -> dict[str, dict[str, Any]]:
    """The product's sweep: the three regimes side by side (each with a few learning rates)."""
    return {
        "train.regime": {"type": "grid", "values": ["supervised", "semisupervised", "active"]},
        "train.lr": {"type": "loguniform", "low": 0.0005, "high": 0.005},
    }


class TuneConfig(Section):
    """Ray Tune sweeps (``spatial tune``); dimensions in ``space`` are dotted keys of this config."""

    num_samples: int = Field(4, ge=1, description="random search: samples per grid point; optuna: trials")
    name: str | None = Field(None, description="sweep (experiment) name; None = sweep-<timestamp>")
    address: str | None = Field(None, description="Ray cluster address; else $RAY_ADDRESS, else a local Ray")
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="fractions share a GPU (0.25 = four trials per GPU)")
    metric: str = "val_balanced_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: reports (epochs / AL rounds) before a trial can stop")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor at each rung")
    search: Literal["random", "optuna"] = "random"
    max_concurrent_trials: int | None = Field(None, ge=1)
    max_failures: int = Field(1, ge=0, description="retries of a failing trial (from its last checkpoint)")
    storage_path: str | None = Field(None, description="Tune results; shared storage (NFS, s3://) on a cluster; "
                                     "None = ray_results/ at the repository root (local runs only)")
    out: str = Field("reports/tune", description="best.json, best_params.yaml, trials.csv")
    promote_out: str = Field("models/tuned", description="ensemble directory written by spatial tune --promote")
    space: dict[str, dict[str, Any]] = Field(default_factory=_default_space)


class ScoreConfig(Section):
    """Screen-wide batch scoring (``spatial score``)."""

    batch_size: int = Field(256, ge=1)
    chunk_size: int = Field(4096, ge=1, description="cells per resumable part file")
    num_workers: int = Field(0, ge=0, description="loader worker processes per scorer (local or per Ray actor)")
    device: str = Field("auto", description="auto | cpu | cuda[:i] (local runs; Ray actors use their GPU if given)")
    ray_actors: int | None = Field(None, ge=1, description="Ray scorer actors; None = one per GPU, else one per CPU")
    ray_cpus_per_actor: float = Field(1.0, gt=0)
    ray_gpus_per_actor: float | None = Field(None, ge=0, description="None = 1 when the cluster has GPUs, else 0")
    torch_threads: int | None = Field(None, ge=1, description="PyTorch threads of a local run; None = all cores")


class ServeConfig(Section):
    """The BentoML HTTP service (``spatial serve``)."""

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    max_cells_per_request: int = Field(1024, ge=1)
    max_request_mb: float = Field(64.0, gt=0, description="largest JSON body (POST /score)")
    max_upload_mb: float = Field(4096.0, gt=0, description="largest file upload (POST /score_file)")
    max_batch_size: int = Field(256, ge=1, description="adaptive batching: most cells per model call")
    max_latency_ms: int = Field(30000, ge=1, description="adaptive batching: a request expected to wait longer "
                                "gets 503 (load shedding); screening clients prefer waiting")
    resize: bool = Field(True, description="resize square crops of another size to the model's input (else 422)")
    file_chunk_cells: int = Field(512, ge=1, description="cells read, scored and streamed at once by /score_file")
    max_upload_cells: int = Field(1_000_000, ge=1, description="most cells in one uploaded file (from its metadata)")
    max_image_side: int = Field(512, ge=8, description="largest image side in a request or upload")
    max_channels: int = Field(16, ge=1, description="most channels of a request or upload")
    max_decoded_mb: float = Field(65536.0, gt=0, description="largest decoded image dataset of an upload")
    max_chunk_mb: float = Field(64.0, gt=0, description="largest decoded HDF5 storage chunk of an upload (h5py "
                                "decodes whole chunks, so this bounds the memory of one read)")
    threads: int = Field(16, ge=1, description="requests the front service handles at once")
    timeout_s: int = Field(3600, ge=1, description="request timeout (large uploads stream for long)")
    cpus: float | None = Field(None, gt=0, description="CPUs reserved for the model runner; None = BentoML default")
    gpus: int | None = Field(None, ge=0, description="GPUs for the model runner; None = 1 if CUDA is visible, else 0")
    device: str = Field("auto", description="auto | cpu | cuda[:i] for the model runner")
    torch_threads: int | None = Field(None, ge=1, description="model runner's PyTorch threads; None = all cores")


class LabelConfig(Section):
    """A person in the loop (``spatial query | label``): labels given in the browser join training."""

    labels: str = Field("labels.csv", description="the labels history (source_file,cell_id,label,annotator,time); "
                        "absent or empty = no cell labels")
    strategy: str = Field("power_bald", description="acquisition function of spatial query (as al.strategies; "
                          "power_bald was the best in the al study), or label_check: the cells whose slide "
                          "label the model disputes")
    n: int = Field(96, ge=1, description="cells per query")
    exclude_test: bool = Field(True, description="never query cells of the fixed test split (split.out)")
    host: str = Field("127.0.0.1", description="spatial label: loopback unless allow_remote")
    port: int = Field(8000, ge=1, le=65535)
    allow_remote: bool = Field(False, description="accept requests from other hosts (else 403)")
    thumbnail_px: int = Field(96, ge=16, le=512, description="thumbnail edge in pixels")
    thumbnail_cache: int = Field(4096, ge=0, description="thumbnails kept in memory")
    confident: float = Field(0.9, gt=0, le=1, description="ensemble confidence above which a label that says "
                             "otherwise is listed for a second look")


class ReportConfig(Section):
    """The screen report (``spatial report``)."""

    out: str = "reports/screen/index.html"
    gallery_cells: int = Field(8, ge=1, description="cells per gallery row")
    thumbnail_px: int = Field(72, ge=16, le=512)
    timecourse_class: str | None = Field(None, description="class plotted over the timecourse; None = the first")
SPARCS_THRESHOLDS = [0.99999, 0.999, 0.9975, 0.995, 0.99, 0.98]


class BinsConfig(Section):
    """Excision bins (``spatial bins``): cells binned by their probability of ``class_name``."""

    class_name: str = Field("atg5_ko", description="the phenotype class whose probability bins the cells")
    mode: Literal["thresholds", "quantiles"] = Field("quantiles", description="quantiles: top shares of the cells; "
                                                     "thresholds: fixed score edges (SPARCS, for a sharp classifier)")
    thresholds: list[float] = Field(default_factory=lambda: list(SPARCS_THRESHOLDS), min_length=1,
                                    description="lower score edges, bin 1 first (the SPARCS autophagy screen)")
    quantiles: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.03], min_length=1,
                                   description="cumulative top shares of the eligible cells, bin 1 first")
    max_novelty: float | None = Field(None, description="leave out cells with a higher novelty score")
    max_epistemic: float | None = Field(None, ge=0, description="leave out cells with a higher epistemic uncertainty")
    manifest: str | None = Field("data/raw/manifest.csv", description="adds group/plate/well per cell; None = none")

    @field_validator("thresholds")
    @classmethod
    def _descending(cls, v: list[float]) -> list[float]:
        if any(not 0 < t <= 1 for t in v) or any(a <= b for a, b in zip(v[:-1], v[1:], strict=True)):
            raise ValueError("thresholds must be strictly decreasing values in (0, 1]")
        return v

    @field_validator("quantiles")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(not 0 < q <= 1 for q in v) or any(a >= b for a, b in zip(v[:-1], v[1:], strict=True)):
            raise ValueError("quantiles must be strictly increasing shares in (0, 1]")
        return v


class SequenceConfig(Section):
    """SIMULATOR ONLY (``spatial sequence``): cutting, PCR and sequencing of the bins of a simulated screen."""

    replicates: int = Field(2, ge=1, description="independent replicate screens")
    virtual_cells: int = Field(120000, ge=0, description="cells per replicate of the realistic-size virtual screen "
                               "(scores drawn from the classifier's scores of rendered cells of the same true state); "
                               "0 = sequence the rendered cells themselves")
    recovery: tuple[float, float] = Field((0.72, 0.94), description="share of cut cells recovered (uniform range)")
    background: tuple[float, float] = Field((0.002, 0.065), description="share of a bin's reads from non-selected "
                                            "background cells (uniform range)")
    reads_per_cell: float = Field(50.0, gt=0, description="sequencing depth of a bin sample per cut cell")
    pcr_shape: float = Field(0.5, gt=0, description="Gamma shape of one cell's PCR yield (CV = 1/sqrt(shape)): "
                             "jackpotting")
    library_cells: int = Field(200000, ge=1, description="cells in the unsorted-library sample")
    library_reads_per_grna: float = Field(500.0, gt=0, description="library sequencing depth per gRNA")
    seed: Seed = 0


NtNull = Literal["leave_one_out", "in_sample"]  # how the NT gRNAs' own z-scores for the hits null are fitted
# the pseudo-genes a gene's Stouffer Z is judged against
GeneNull = Literal["nt", "nt_and_screen", "nt_and_quiet_screen", "quiet_screen"]
SIBLING_P = 0.05  # nt_and_quiet_screen: a gRNA whose siblings reach this p leaves the screen's null


class HitsConfig(Section):
    """Gene hit calling (``spatial hits``)."""

    fdr: float = Field(0.1, gt=0, lt=1, description="Benjamini-Hochberg level of is_hit")
    method: Literal["spatial", "sparcs", "rra"] = Field("spatial", description="counts mode: the method of "
                                                        "genes.csv; the others are reported beside it")
    cells_method: Literal["soft", "threshold"] = Field("soft", description="cells mode: the method of genes.csv")
    bins: list[int] = Field(default_factory=list, description="phenotype bins used; [] = every bin")
    min_library_reads: int = Field(1, ge=0, description="gRNAs with fewer library reads (per replicate) are dropped")
    min_nt_cells: float = Field(20.0, ge=0, description="counts mode: a replicate whose NT gRNAs hold fewer cells "
                                "in the bins cannot estimate the null and is left out")
    nt_null: NtNull = Field(
        "leave_one_out", description="counts mode: each NT gRNA's z-score for the null from the fit on the other NT "
        "gRNAs (leave_one_out: out of sample, as a targeting gRNA's is) or on all of them (in_sample, before "
        "2026-12-06: a false discovery proportion above the FDR)")
    gene_null: GeneNull = Field(
        "nt_and_quiet_screen", description="both modes: a gene's p-value against NT pseudo-genes (nt), or the "
        "larger of that and its p against pseudo-genes drawn from every gRNA of the screen (nt_and_screen: a gene must "
        "stand out from the controls and from the screen's own gRNAs, whose PCR-jackpot tail an NT sample "
        "under-samples; hits among them make it conservative) or from the gRNAs whose gene's other gRNAs do not stand "
        "out (nt_and_quiet_screen, the default at every library size since 2026-12-07: the hits' gRNAs left out, the "
        "null genes' jackpots kept; with the NT null alone null genes got too many small p-values with 40-400 NT "
        "gRNAs, and with 1,000 at 20,000 genes), or that screen null alone (quiet_screen: no larger-of with the NT "
        "pseudo-genes, whose p-values from a few hundred NT gRNAs make the larger conservative in small libraries; "
        "more recall below 1,000 genes, but too many small null p-values at 250 and 4,000 genes, so an option)")
    quiet_sibling_p: float = Field(SIBLING_P, gt=0, le=1, description="(nt_and_)quiet_screen: a gRNA leaves the "
                                   "screen's null when its gene's other gRNAs reach this p against NT pseudo-genes")
    min_cells: int = Field(1, ge=1, description="cells mode: gRNAs with fewer cells are dropped")
    null_draws: int = Field(2000, ge=100, description="NT pseudo-genes (and NT cell bootstraps) per gRNA/cell count")
    sparcs_p: float = Field(0.05, gt=0, lt=1, description="the SPARCS baseline's (uncorrected) p-value cut")
    rra_alpha: float = Field(0.25, gt=0, le=1, description="the RRA baseline's alpha: gRNAs ranked in this top share "
                             "count towards a gene's score")
    seed: Seed = 0


class Params(Section):
    seed: Seed = 0
    profile: str = Field("cpu", description="the profile merged over these values (see ``profiles`` in params.yaml)")
    synth: SynthConfig = SynthConfig()
    index: IndexConfig = IndexConfig()
    split: SplitConfig = SplitConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    discover: DiscoverConfig = DiscoverConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    ssl: SSLConfig = SSLConfig()
    pretrain: PretrainConfig = PretrainConfig()
    al: ALConfig = ALConfig()
    tune: TuneConfig = TuneConfig()
    score: ScoreConfig = ScoreConfig()
    serve: ServeConfig = ServeConfig()
    label: LabelConfig = LabelConfig()
    report: ReportConfig = ReportConfig()
    bins: BinsConfig = BinsConfig()
    sequence: SequenceConfig = SequenceConfig()
    hits: HitsConfig = HitsConfig()

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
        raise ConfigError(f"--set {key}: cannot parse value '{raw}': {yaml_problem(exc)}") from None
    return key, value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (line and column, counted from 1)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if problem is None:
        return " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


BASE_PROFILES = ("cpu", "default")


def apply_profile(tree: dict[str, Any]) -> bool:
    """Merge ``profiles[profile]`` over ``tree`` (in place; ``profiles`` is removed). The base profile ``cpu``
    is the file's own values. Returns whether a profile was merged."""
    profiles = tree.pop("profiles", None) or {}
    name = tree.get("profile") or "cpu"
    if not isinstance(profiles, dict):
        raise ConfigError("profiles: expected a mapping of profile name -> params sections")
    if name not in profiles:
        if name in BASE_PROFILES:
            return False
        raise ConfigError(f"profile '{name}' is not defined; known profiles: {', '.join(['cpu', *profiles])}")
    _deep_merge(tree, profiles[name] or {}, f"profiles.{name}")
    return True


def _deep_merge(tree: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    if not isinstance(patch, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(patch).__name__}")
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_merge(tree[key], value, f"{where}.{key}")
        else:
            tree[key] = copy.deepcopy(value)


def resolve(raw: dict[str, Any] | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Validate ``raw`` (a params dict) after applying dotted ``overrides``."""
    tree = copy.deepcopy(raw or {})
    items = list(overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or []))
    for key, value in items:
        set_dotted(tree, key, value)
    if apply_profile(tree):
        for key, value in items:  # explicit overrides beat the profile
            set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in exc.errors()
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
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {yaml_problem(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not a text file (byte {exc.start} is not UTF-8); expected params.yaml") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections, got {type(raw).__name__}")
    return resolve(raw, overrides)

