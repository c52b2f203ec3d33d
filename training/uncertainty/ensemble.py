"""The deep-ensemble artifact and its predictor.

An ensemble is a directory that carries everything scoring needs, so the same numbers come out of
``spatial score``, the MLflow model and the HTTP service::

    spec.json        classes, channels (names), input size and preprocessing, model config, per-member
                     temperature, posterior (ensemble or MC dropout), source channel layout
    member_<k>.pt    state dict of member k
    encoder_<j>.pt   state dict of encoder j (only with ``uncertainty.encoders``: `spatial pretrain` encoders)
    novelty_<k>.npz  the novelty model (``uncertainty.novelty``; see ``training.uncertainty.novelty``) of member k,
                     or of encoder k when the ensemble has encoders

Per-cell outputs (see ``training.uncertainty.decompose.FIELD_DESCRIPTIONS``): mean class probabilities over members
(calibrated as ``spec.calibration`` says: one temperature on the pooled log-probabilities, or one per member), predicted class, confidence, total entropy, aleatoric (mean member
entropy), epistemic (mutual information) and novelty (mean over members of each member's
``uncertainty.novelty`` score; see ``training.uncertainty.novelty``; with encoders, the mean over the encoders of
the kNN score on their features).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from training.config import ModelConfig
from training.data.loader import Preprocess
from training.engine import forward
from training.errors import DataError, ModelError
from training.models.factory import build_model
from training.uncertainty.decompose import decompose, decompose_pooled, softmax
from training.uncertainty.novelty import NoveltyModel, novelty_from_dict, novelty_to_dict, stage_features
from training.uncertainty.pixel_descriptor import pixel_descriptor

SPEC_VERSION = 1
OUTPUT_FIELDS = ("predicted_class", "confidence", "entropy", "aleatoric", "epistemic", "novelty")


@dataclass
class EnsembleSpec:
    classes: list[str]
    channels: list[str]
    source_channels: list[str]
    image_size: int
    preprocess: dict[str, Any]
    model: dict[str, Any]
    temperatures: list[float]
    posterior: str = "ensemble"
    mc_samples: int = 10
    has_novelty: bool = True
    calibration: str = "member"     # pooled | member | none (artifacts from before pooled calibration: member)
    pooled_temperature: float = 1.0  # pool-then-calibrate: divides the log of the members' averaged probabilities
    n_encoders: int = 0              # self-supervised encoders the novelty is measured on (0: the members)
    info: dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION

    @property
    def n_members(self) -> int:
        return len(self.temperatures)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> EnsembleSpec:
        """``folder/spec.json``; a :class:`ModelError` that says what to do when there is no ensemble."""
        p = Path(folder)
        if not p.exists():
            raise ModelError(f"{p}: no ensemble here; `spatial train` writes one (`dvc repro train`, a stage of "
                             "`make run`)")
        spec_file = p / "spec.json"
        if not spec_file.is_file():
            raise ModelError(f"{p}: not an ensemble directory (spec.json missing)")
        try:
            spec = cls(**json.loads(spec_file.read_text()))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{spec_file}: unreadable ensemble spec ({exc})") from None
        spec.check_temperatures(spec_file)
        return spec

    def check_temperatures(self, spec_file: Path) -> None:
        """Every temperature a finite number > 0 (a NaN, 0 or negative one would only fail once scoring started)."""
        temps = self.temperatures
        if not isinstance(temps, list) or not temps:
            raise ModelError(f"{spec_file}: temperatures must be a non-empty list of numbers > 0, got {temps!r}")
        fields = [(f"temperatures[{k}]", t) for k, t in enumerate(temps)]
        for name, t in [*fields, ("pooled_temperature", self.pooled_temperature)]:
            if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
                raise ModelError(f"{spec_file}: {name} must be a finite number > 0, got {t!r}")


def _reason(exc: BaseException, limit: int = 200) -> str:
    """One short line about ``exc``: its type and the first sentence of its message (not the advice that may
    follow, such as loading the file unsafely)."""
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _first_mismatch(model: torch.nn.Module, state: dict) -> str:
    """The first difference between ``model``'s tensors and a loaded ``state`` dict, in one line."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            return f"first mismatch: {key} missing from the file"
        got = state[key]
        if not isinstance(got, torch.Tensor):
            return f"first mismatch: {key} is not a tensor"
        if got.shape != tensor.shape:
            return (f"first mismatch: {key} has shape {list(got.shape)} in the file, {list(tensor.shape)} in the "
                    "model")
    extra = [str(key) for key in state if key not in expected]
    if extra:
        return f"first mismatch: unexpected {extra[0]} in the file"
    return "no tensor could be copied"


class Ensemble:
    """K trained members + temperatures + novelty models (of the members, or of ``encoders`` when given: one per
    encoder); scores preprocessed or raw cell images."""

    def __init__(self, spec: EnsembleSpec, members: Sequence[torch.nn.Module],
                 novelty: Sequence[NoveltyModel] | None = None, device: str | torch.device = "cpu",
                 encoders: Sequence[torch.nn.Module] = ()):
        self.spec = spec
        self.device = torch.device(device)
        self.members = [m.to(self.device).eval() for m in members]
        self.encoders = [e.to(self.device).eval() for e in encoders]
        self.novelty = list(novelty or [])
        if self.encoders and len(self.novelty) != len(self.encoders):
            raise ModelError(f"{len(self.encoders)} encoders need one novelty model each, got {len(self.novelty)}")
        self.spec.n_encoders = len(self.encoders)
        self.preprocess = Preprocess(**{**spec.preprocess, "channels": tuple(spec.channels)})

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from training.io.atomic import atomic_path

        with atomic_path(path, suffix="") as tmp:
            tmp.mkdir()
            (tmp / "spec.json").write_text(json.dumps(asdict(self.spec), indent=2))
            for name, nets in (("member", self.members), ("encoder", self.encoders)):
                for k, m in enumerate(nets):
                    torch.save({n: t.detach().cpu() for n, t in m.state_dict().items()}, tmp / f"{name}_{k}.pt")
            for k, nov in enumerate(self.novelty):
                np.savez(tmp / f"novelty_{k}.npz", **{n: np.asarray(v) for n, v in novelty_to_dict(nov).items()})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Ensemble:
        p = Path(path)
        spec = EnsembleSpec.read(p)
        # the weights are all in the artifact: a checkpoint the members were fine-tuned from is not read again
        arch = ModelConfig(**{**spec.model, "pretrained": None})

        def network(name: str, k: int) -> torch.nn.Module:
            model = build_model(arch, len(spec.channels), len(spec.classes))
            file = p / f"{name}_{k}.pt"
            if not file.is_file():
                raise ModelError(f"{p}: cannot load {name} {k}: {file.name} is missing")
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated or foreign file fails in many ways (KeyError...)
                raise ModelError(f"{p}: cannot load {name} {k}: {file.name} is not a readable PyTorch state dict "
                                 f"({_reason(exc)})") from None
            if not isinstance(state, dict):
                raise ModelError(f"{p}: cannot load {name} {k}: {file.name} is not a state dict "
                                 f"(a {type(state).__name__})")
            try:
                model.load_state_dict(state)
            except Exception:  # torch lists every mismatching tensor: name the first one only
                raise ModelError(f"{p}: cannot load {name} {k}: the weights in {file.name} do not fit the model "
                                 f"architecture in spec.json ({_first_mismatch(model, state)})") from None
            return model

        members = [network("member", k) for k in range(spec.n_members)]
        encoders = [network("encoder", j) for j in range(spec.n_encoders)]
        novelty = []
        n_novelty = (len(encoders) or len(members)) if spec.has_novelty else 0
        for k in range(n_novelty):
            file = p / f"novelty_{k}.npz"
            if not file.is_file():
                raise ModelError(f"{p}: cannot load novelty model {k}: {file.name} is missing")
            try:
                with np.load(file) as z:
                    novelty.append(novelty_from_dict({n: z[n] for n in z.files}))
            except Exception as exc:  # not an .npz, pickled data, missing arrays...
                raise ModelError(f"{p}: cannot load novelty model {k}: {file.name} is not a readable novelty model "
                                 f"({_reason(exc)})") from None
        return cls(spec, members, novelty, device, encoders)

    # -- scoring ---------------------------------------------------------------------------------------
    def select_channels(self, images: np.ndarray) -> np.ndarray:
        """Accept the model's channels, or the full stored stack (masks + channels) and select by name."""
        c = images.shape[1]
        if c == len(self.spec.channels):
            return images
        if c == len(self.spec.source_channels):
            idx = [self.spec.source_channels.index(name) for name in self.spec.channels]
            return images[:, idx]
        raise DataError(
            f"images have {c} channels; expected {len(self.spec.channels)} ({', '.join(self.spec.channels)}) or the "
            f"full stack of {len(self.spec.source_channels)} ({', '.join(self.spec.source_channels)})"
        )

    @staticmethod
    def _novelty_input(kind: str, model: torch.nn.Module, x: torch.Tensor, features: np.ndarray,
                       logits: torch.Tensor, stages: list, pixels: np.ndarray | None = None
                       ) -> np.ndarray | dict[str, np.ndarray]:
        """What a member's novelty model scores: penultimate ``features``, deterministic ``logits`` (the MC-dropout
        samples are not: one more head pass then), pooled ``stages`` (the maps of the same forward pass), the
        batch's ``pixels`` descriptor (the same for every member: computed once per batch by the caller), or a dict
        of several (``logits+stages``)."""
        if kind == "features":
            return features
        if kind == "logits":
            det = logits[:, 0] if logits.shape[1] == 1 else forward(model, x, with_features=False)[0]
            return det.cpu().numpy()
        if kind == "stages":
            return stage_features(stages)
        if kind == "pixels":
            return pixels
        return {part: Ensemble._novelty_input(part, model, x, features, logits, stages, pixels)
                for part in kind.split("+")}

    @torch.no_grad()
    def raw_outputs(self, x: torch.Tensor, with_features: bool = False) -> dict[str, np.ndarray]:
        """Model-ready inputs ``(N, C, S, S)`` -> member ``logits`` ``(N, M, S, K)`` (S = MC-dropout samples, else 1),
        ``novelty`` ``(N,)`` and optionally mean penultimate ``features`` ``(N, D)``. Cells come first so batches
        concatenate along axis 0."""
        x = x.to(self.device, non_blocking=True)
        samples = self.spec.mc_samples if self.spec.posterior == "mc_dropout" else 0
        logits, novelty, feats = [], [], []
        member_novelty, encoder_novelty = ([], self.novelty) if self.encoders else (self.novelty, [])
        pixels = pixel_descriptor(x) if any("pixels" in n.input for n in member_novelty) else None
        for k, model in enumerate(self.members):
            maps: list | None = [] if member_novelty and "stages" in member_novelty[k].input else None
            lg, f = forward(model, x, mc_dropout=samples, with_features=True, stages=maps)
            lg = lg.transpose(0, 1) if samples else lg[:, None]  # (N, S, K)
            logits.append(lg.cpu().numpy())
            f = f.cpu().numpy()
            if member_novelty:
                nov = member_novelty[k]
                novelty.append(nov.score(self._novelty_input(nov.input, model, x, f, lg, maps, pixels)))
            if with_features:
                feats.append(f)
        for encoder, nov in zip(self.encoders, encoder_novelty, strict=True):
            maps = [] if "stages" in nov.input else None
            lg, f = forward(encoder, x, with_features=True, stages=maps)
            novelty.append(nov.score(self._novelty_input(nov.input, encoder, x, f.cpu().numpy(), lg[:, None], maps)))
        out = {
            "logits": np.stack(logits, axis=1),
            "novelty": np.mean(novelty, axis=0) if novelty else np.full(len(x), np.nan),
        }
        if with_features:
            out["features"] = np.mean(feats, axis=0)
        return out

    def combine(self, logits: np.ndarray, temperatures: Sequence[float] | None = None,
                members: Sequence[int] | None = None, calibration: str | None = None) -> dict[str, np.ndarray]:
        """Member logits ``(N, M, S, K)`` -> probabilities and uncertainty (``decompose``).

        ``calibration`` (default: the spec's): ``member`` divides each member by its own temperature before
        averaging, ``pooled`` divides the log of the averaged probabilities by one temperature, ``none`` neither.
        ``temperatures=[...]`` overrides the member temperatures (and turns pooled scaling off); ``members=[k]``
        gives a single member, calibrated by its own temperature (unless ``calibration='none'``)."""
        mode = self.spec.calibration if calibration is None else calibration
        sel = list(range(logits.shape[1])) if members is None else list(members)
        if mode == "pooled" and len(sel) == 1:
            mode = "member"  # one member: its own temperature is the pooled one
        if temperatures is not None:
            temps, mode = np.asarray(temperatures, dtype=np.float64), "member"
        elif mode == "member":
            temps = np.asarray(self.spec.temperatures, dtype=np.float64)
        else:
            temps = np.ones(logits.shape[1])
        z = logits[:, sel].astype(np.float64) / temps[sel][None, :, None, None]
        probs = softmax(z, axis=-1)
        n, m, s, k = probs.shape
        probs = probs.transpose(1, 2, 0, 3).reshape(m * s, n, k)
        if mode == "pooled":
            return decompose_pooled(probs, self.spec.pooled_temperature)
        return decompose(probs)

    def predict_tensor(self, x: torch.Tensor, with_features: bool = False) -> dict[str, np.ndarray]:
        """Model-ready inputs -> per-cell probabilities and uncertainty fields (+ novelty)."""
        raw = self.raw_outputs(x, with_features)
        return {**self.combine(raw.pop("logits")), **raw}

    def predict_images(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Raw pixels ``(N, C, H, W)`` in [0, 1] (model channels or the full stack) -> per-cell outputs."""
        if images.ndim != 4:
            raise DataError(f"images have shape {images.shape}; expected (N, C, H, W)")
        images = self.select_channels(images)
        parts = [self.predict_tensor(self.preprocess(images[s : s + batch_size]))
                 for s in range(0, len(images), batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def predict_batches(self, batches: Iterable[dict[str, torch.Tensor]], total: int | None = None,
                        progress: bool = False, with_features: bool = False, raw: bool = False
                        ) -> dict[str, np.ndarray]:
        """Scores every batch of a ``CellLoader``; outputs are ordered by the batches' ``idx``.
        ``raw=True`` returns member logits (see ``raw_outputs``) instead of combined fields."""
        parts, idx = [], []
        fn = self.raw_outputs if raw else self.predict_tensor
        for batch in tqdm(batches, total=total, desc="score", unit="batch", disable=not progress):
            parts.append(fn(batch["image"], with_features))
            idx.append(batch["idx"].numpy())
        if not parts:
            return {}
        order = np.argsort(np.concatenate(idx), kind="stable")
        return {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}

    def to_frame(self, out: dict[str, np.ndarray], cells: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per-cell table: ``source_file, cell_id`` (when given), ``prob_<class>...`` and the uncertainty fields."""
        df = pd.DataFrame(index=range(len(out["mean_probs"])))
        if cells is not None:
            df["source_file"] = cells["source_file"].astype(str).to_numpy()
            df["cell_id"] = cells["cell_id"].to_numpy(np.int64)
        for j, name in enumerate(self.spec.classes):
            df[f"prob_{name}"] = out["mean_probs"][:, j].astype(np.float32)
        df["predicted_class"] = np.asarray(self.spec.classes)[out["predicted"]]
        for name in OUTPUT_FIELDS[1:]:
            df[name] = out[name].astype(np.float32)
        return df

