"""The one training loop. Regimes (supervised, FixMatch, active learning, ensembles) plug in an ``Objective``.

Batches are dicts: ``image`` float32 (B, C, H, W), ``label`` int64 (B,) with -1 = unlabeled, ``idx`` int64 (B,);
regimes may add keys. Epochs are numbered from 0 (``StepContext.epoch``, history, ``log_metrics`` step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from training.config import TrainConfig
from training.data.augment import Augmenter
from training.errors import ConfigError, TrainingError
from training.evaluation.metrics import balanced_accuracy
from training.io.atomic import save_torch
from training.models.factory import classifier_prefixes

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; an explicit device that is not available is a ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: '{spec}' is not a device (use auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={spec} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


@dataclass
class StepContext:
    epoch: int
    step: int
    global_step: int
    generator: torch.Generator
    device: torch.device
    steps_per_epoch: int = 0
    total_steps: int = 0


class Objective(Protocol):
    """What a regime plugs into :func:`fit`. ``loss`` runs under autocast with the batch already on the device."""

    def loss(self, model: nn.Module, batch: dict, step: StepContext) -> tuple[Tensor, dict[str, float]]: ...

    def on_step_end(self, model: nn.Module) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...

    # Optional: ``param_groups(model) -> list[dict]``: extra trainable modules of the objective (the autoencoder's
    # decoder) as optimizer parameter groups; they get the engine's warm-up, cosine schedule and gradient clipping.


EpochEnd = Callable[[int, dict[str, float], "Path | None"], None]
"""End-of-epoch hook: ``(epoch, metrics, checkpoint)``, called after the epoch's checkpoint is saved (``None``
without ``out_dir``)."""


class SupervisedObjective:
    """Cross-entropy (label smoothing, optional class weights) on ``Augmenter.standard`` views; -1 labels ignored."""

    def __init__(
        self, n_classes: int, augmenter: Augmenter | None, label_smoothing: float = 0.0,
        class_weights: Tensor | None = None,
    ) -> None:
        if class_weights is not None and class_weights.shape != (n_classes,):
            raise ConfigError(f"class_weights must have shape ({n_classes},), got {tuple(class_weights.shape)}")
        self.n_classes = n_classes
        self.augmenter = augmenter
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights

    def loss(self, model: nn.Module, batch: dict, step: StepContext) -> tuple[Tensor, dict[str, float]]:
        x, y = batch["image"], batch["label"]
        keep = y >= 0
        if not bool(keep.any()):
            raise TrainingError(f"epoch {step.epoch} step {step.step}: a supervised batch has no labeled cells")
        if not bool(keep.all()):
            x, y = x[keep], y[keep]
        if self.augmenter is not None:
            x = self.augmenter.standard(x, step.generator)
        logits = model(x).float()
        weight = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=self.label_smoothing)
        return loss, {"train_accuracy": (logits.argmax(1) == y).float().mean().item()}

    def on_step_end(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float  # the validation loss of the best epoch (by ``train.monitor``)
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    weights_epoch: int = -1  # the epoch whose weights the model holds after fit


# -- helpers ---------------------------------------------------------------------------------------------------


def _score(metrics: dict, monitor: str) -> float:
    """``train.monitor`` as a higher-is-better number: the negated validation loss, or the metric itself."""
    return -metrics["val_loss"] if monitor == "val_loss" else metrics[monitor]


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _steps_per_epoch(train_data: Iterable, explicit: int | None, cap: int | None) -> int:
    steps = explicit
    if steps is None:
        try:
            steps = len(train_data)  # type: ignore[arg-type]
        except TypeError:
            steps = cap
    if steps is None:
        raise TrainingError("cannot tell the steps per epoch: train_data has no len(); pass steps_per_epoch")
    steps = min(steps, cap) if cap else steps
    if steps < 1:
        raise TrainingError("training data is empty (0 steps per epoch)")
    return steps


def _optimizer(model: nn.Module, cfg: TrainConfig, extra: list[dict] | None = None) -> torch.optim.Optimizer:
    """Weight decay on weights with >= 2 dims only (not on norms and biases); everything outside the classifier at
    ``cfg.lr * cfg.backbone_lr_scale`` when that scale is below 1; ``extra`` groups (an objective's own modules) as
    given."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    parts = [([p for _, p in named], cfg.lr)]  # (parameters, their learning rate)
    if cfg.backbone_lr_scale != 1.0:
        head = classifier_prefixes(model)
        classifier = [p for n, p in named if n.startswith(head)]
        if not classifier:
            raise ConfigError(f"train.backbone_lr_scale: the model has no classifier parameters named {', '.join(head)}")
        backbone = [p for n, p in named if not n.startswith(head)]
        parts = [(classifier, cfg.lr), (backbone, cfg.lr * cfg.backbone_lr_scale)]
    groups = [g for params, lr in parts for g in (
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
    )]
    groups += extra or []
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
        "augment": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _probe_switch(model: nn.Module, cfg: TrainConfig) -> Callable[[int], None]:
    """LP-FT (``cfg.probe_epochs``): returns ``set_epoch(epoch)``, which freezes every trainable parameter outside the
    classifier while ``epoch < cfg.probe_epochs`` and unfreezes them after. A frozen parameter gets no gradient, so
    the optimizer skips it (no update, no weight decay); BatchNorm statistics (the VGG's) still update."""
    if cfg.probe_epochs > cfg.epochs:
        raise ConfigError(f"train.probe_epochs={cfg.probe_epochs} exceeds train.epochs={cfg.epochs}")
    if cfg.probe_epochs == 0:
        return lambda epoch: None
    head = classifier_prefixes(model)
    body = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith(head)]
    if len(body) == sum(1 for p in model.parameters() if p.requires_grad):
        raise ConfigError(f"train.probe_epochs: the model has no classifier parameters named {', '.join(head)}")

    def set_epoch(epoch: int) -> None:
        for p in body:
            p.requires_grad_(epoch >= cfg.probe_epochs)

    return set_epoch


def _last_good(ckpt: Path | None) -> str:
    return f"last good checkpoint: {ckpt if ckpt is not None and ckpt.is_file() else 'none'}"


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, n_classes: int, device: torch.device, amp: bool = False) -> dict:
    """Validation metrics over labeled cells: val_loss (plain cross-entropy), val_accuracy, val_balanced_accuracy."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    labels, preds = [], []
    for batch in data:
        batch = _to_device(batch, device, amp and device.type == "cuda")
        keep = batch["label"] >= 0
        if not bool(keep.any()):
            continue
        with _autocast(device, amp):
            logits = model(batch["image"][keep]).float()
        y = batch["label"][keep]
        total += F.cross_entropy(logits, y, reduction="sum").double()
        count += len(y)
        labels.append(y.cpu())
        preds.append(logits.argmax(1).cpu())
    model.train(was_training)
    if count == 0:
        raise TrainingError("validation data has no labeled cells")
    y_all, pred_all = torch.cat(labels).numpy(), torch.cat(preds).numpy()
    return {
        "val_loss": float(total) / count,
        "val_accuracy": float((y_all == pred_all).mean()),
        "val_balanced_accuracy": balanced_accuracy(y_all, pred_all),
    }


# -- the loop --------------------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    train_data: Iterable[dict],
    val_data: Iterable[dict] | None,
    cfg: TrainConfig,
    objective: Objective,
    n_classes: int,
    out_dir: Path | None = None,
    resume: bool = False,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
    steps_per_epoch: int | None = None,
    on_epoch_end: EpochEnd | None = None,
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs (fewer with early stopping).

    Checkpoints ``out_dir/last.pt`` after every epoch, then calls ``on_epoch_end(epoch, metrics, checkpoint)``;
    ``resume`` continues from the checkpoint (bit-identical on CPU).
    With early stopping on (``cfg.patience``) the weights of the best epoch by ``cfg.monitor`` (lowest validation
    loss, or highest validation balanced accuracy; the first epoch wins a tie) are restored at the end;
    with ``val_data=None`` there is no validation and no early stopping.
    """
    device = select_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"
    model.to(device)
    if amp:
        model.to(memory_format=torch.channels_last)
    steps = _steps_per_epoch(train_data, steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps * cfg.epochs
    if not resume:
        seed_everything(cfg.seed)  # before an objective builds its own modules (param_groups)
    extra_groups = objective.param_groups(model) if hasattr(objective, "param_groups") else None
    optimizer = _optimizer(model, cfg, extra_groups)
    probe = _probe_switch(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(round(cfg.warmup_epochs * steps), total))
    gen = torch.Generator()
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    early = cfg.patience is not None and val_data is not None
    st: dict[str, Any] = {"epoch": 0, "best_epoch": -1, "best_val_loss": math.inf, "best_state": None,
                          "bad_epochs": 0, "stopped_early": False, "history": []}

    if resume:
        if ckpt is None or not ckpt.is_file():
            raise TrainingError(f"cannot resume: no checkpoint at {ckpt}")
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        objective.load_state_dict(saved["objective"])
        st = saved["state"]
        _set_rng_state(saved["rng"], gen)
        log.info("resumed from %s at epoch %d", ckpt, st["epoch"])
    else:
        gen.manual_seed(int(np.random.SeedSequence([cfg.seed, 1]).generate_state(1)[0]))

    clipped = [*model.parameters(), *(p for g in extra_groups or [] for p in g["params"])] if cfg.grad_clip else []
    try:
        while st["epoch"] < cfg.epochs and not st["stopped_early"]:
            epoch = st["epoch"]
            if hasattr(train_data, "set_epoch"):
                train_data.set_epoch(epoch)
            probe(epoch)
            model.train()
            sums: dict[str, float] = defaultdict(float)
            n = 0
            bar = tqdm(total=steps, desc=f"epoch {epoch}", disable=not progress, leave=False)
            for step, batch in zip(range(steps), train_data, strict=False):
                ctx = StepContext(epoch, step, epoch * steps + step, gen, device, steps, total)
                batch = _to_device(batch, device, amp)
                with _autocast(device, amp):
                    loss, extra = objective.loss(model, batch, ctx)
                value = loss.item()
                if not math.isfinite(value):
                    bad = "NaN" if math.isnan(value) else "Inf"
                    raise TrainingError(f"loss became {bad} at epoch {epoch} step {step}; {_last_good(ckpt)}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    sums["grad_norm"] += float(nn.utils.clip_grad_norm_(clipped, cfg.grad_clip))
                optimizer.step()
                scheduler.step()
                objective.on_step_end(model)
                sums["train_loss"] += value
                for k, v in extra.items():
                    sums[k] += float(v)
                n += 1
                bar.update()
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{value:.4f}")
            bar.close()
            if n == 0:
                raise TrainingError(f"training data yielded no batches in epoch {epoch}")

            metrics = {k: v / n for k, v in sums.items()}
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            if val_data is not None:
                metrics.update(evaluate(model, val_data, n_classes, device, amp))
                if not math.isfinite(metrics["val_loss"]):
                    raise TrainingError(f"validation loss became NaN at epoch {epoch}; {_last_good(ckpt)}")
                best = st["best_epoch"]
                if best < 0 or _score(metrics, cfg.monitor) > _score(st["history"][best], cfg.monitor):
                    st.update(best_epoch=epoch, best_val_loss=metrics["val_loss"], bad_epochs=0)
                    if early:
                        st["best_state"] = _cpu_copy(model.state_dict())
                else:
                    st["bad_epochs"] += 1
                    st["stopped_early"] = early and st["bad_epochs"] >= cfg.patience
            st["history"].append({"epoch": epoch, **metrics})
            st["epoch"] = epoch + 1
            if log_metrics is not None:
                log_metrics(metrics, epoch)
            if ckpt is not None:
                save_torch({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "objective": objective.state_dict(),
                    "state": st, "rng": _rng_state(gen), "config": cfg.model_dump(mode="json"),
                }, ckpt)
            if on_epoch_end is not None:
                on_epoch_end(epoch, dict(metrics), ckpt)
            if progress:
                tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in {"epoch": epoch, **metrics}.items()))
    finally:
        probe(cfg.epochs)  # the model leaves with every parameter trainable as it came, even on an error
    weights_epoch = st["epoch"] - 1
    if early and st["best_state"] is not None:
        model.load_state_dict(st["best_state"])
        weights_epoch = st["best_epoch"]
    return FitResult(
        best_epoch=st["best_epoch"], best_val_loss=st["best_val_loss"], epochs_run=st["epoch"],
        stopped_early=st["stopped_early"], history=copy.deepcopy(st["history"]),
        checkpoint_dir=Path(out_dir) if out_dir is not None else None, weights_epoch=weights_epoch,
    )


# -- inference -------------------------------------------------------------------------------------------------


def _head_only_dropout(model: nn.Module) -> bool:
    """True when every active Dropout lives in ``model.head``/``fc``/``pre_logits`` (body features are deterministic)."""
    return all(
        name.startswith(("head.", "fc", "pre_logits."))
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
    )


@torch.no_grad()
def forward(model: nn.Module, x: Tensor, mc_dropout: int = 0, with_features: bool = True, amp: bool = True,
            stages: list | None = None) -> tuple[Tensor, Tensor | None]:
    """One batch through a model in eval mode: float32 logits (B, K), or (S, B, K) with ``mc_dropout=S`` passes with
    only Dropout switched to train mode, and penultimate ``features`` (B, D; dropout off) or None. Given a list as
    ``stages``, the same pass appends every backbone stage's feature map to it (``forward_intermediates``).

    The one inference step: :func:`predict`, the ensemble's scoring and active-learning pool scoring all use it.
    With MC dropout the body runs once and the head S times when all active dropout is in the head."""
    use_amp = amp and x.device.type == "cuda"
    if use_amp:
        x = x.contiguous(memory_format=torch.channels_last)
    feats = None
    with _autocast(x.device, use_amp):
        if stages is None:
            f = model.forward_features(x)
        else:
            f, maps = model.forward_intermediates(x)
            stages.extend(maps)
        if with_features:
            feats = model.forward_head(f, pre_logits=True).float()
        if not mc_dropout:
            return model.forward_head(f).float(), feats
        dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        head_only = _head_only_dropout(model)
        for m in dropouts:
            m.train()
        try:
            samples = [(model.forward_head(f) if head_only else model(x)).float() for _ in range(mc_dropout)]
        finally:
            for m in dropouts:
                m.eval()
    return torch.stack(samples), feats


@torch.no_grad()
def predict(
    model: nn.Module, data: Iterable[dict], device: torch.device | str | None = None, mc_dropout: int = 0,
    with_features: bool = True, amp: bool = True, pool_stages: Callable[[list], np.ndarray] | None = None,
    describe_pixels: Callable[[Tensor], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Logits (N, K) — or (S, N, K) with ``mc_dropout=S`` (see :func:`forward`) — plus penultimate ``features``
    (N, D, dropout off), ``idx`` and ``label`` (N,) over every batch of ``data``. With ``pool_stages`` (e.g.
    ``training.uncertainty.novelty.stage_features``) also ``stages``: its rows for the backbone stage maps of the
    same forward pass; with ``describe_pixels`` (``training.uncertainty.pixel_descriptor.pixel_descriptor``) also
    ``pixels``: its rows for the input images."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    was_training = model.training
    out: dict[str, list] = defaultdict(list)
    seen = 0
    model.eval()
    try:
        for batch in data:
            x = batch["image"].to(device, non_blocking=True)
            b = len(x)
            maps: list | None = [] if pool_stages is not None else None
            logits, feats = forward(model, x, mc_dropout, with_features, amp, stages=maps)
            out["logits"].append(logits.cpu())
            if maps is not None:
                out["stages"].append(torch.from_numpy(pool_stages(maps)))
            if describe_pixels is not None:
                out["pixels"].append(torch.from_numpy(describe_pixels(x)))
            if with_features:
                out["features"].append(feats.cpu())
            idx = batch.get("idx")
            out["idx"].append(idx.cpu() if idx is not None else torch.arange(seen, seen + b))
            label = batch.get("label")
            out["label"].append(label.cpu() if label is not None else torch.full((b,), -1, dtype=torch.long))
            seen += b
    finally:
        model.train(was_training)
    if not seen:
        raise TrainingError("predict: data yielded no batches")
    res = {
        "logits": torch.cat(out["logits"], dim=1 if mc_dropout else 0).numpy(),
        "idx": torch.cat(out["idx"]).numpy(),
        "label": torch.cat(out["label"]).numpy(),
    }
    if with_features:
        res["features"] = torch.cat(out["features"]).numpy()
    if pool_stages is not None:
        res["stages"] = torch.cat(out["stages"]).numpy()
    if describe_pixels is not None:
        res["pixels"] = torch.cat(out["pixels"]).numpy()
    return res
