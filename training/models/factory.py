"""Model factory: timm ConvNeXt (named or custom-sized) and the SPARCS VGG baseline.

Every model exposes timm's ``forward_features`` / ``forward_head(x, pre_logits=...)`` split, so
:func:`embed` (novelty, core-sets, embeddings) works the same for all of them. Nothing is ever
downloaded: ``cfg.pretrained`` must name a local checkpoint file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn
from torch import Tensor, nn

from training.config import ModelConfig
from training.errors import ModelError

log = logging.getLogger(__name__)

CUSTOM = "convnext_custom"
SPARCS_VGG = "sparcs_vgg"
HUB_WORDS = {"hub", "imagenet", "true", "yes", "timm", "default", "pretrained"}
NO_WEIGHTS = {"", "none", "null", "false", "no"}

# SPARCS "autophagy classifier 2.1": VGG configuration B as used by SPARCSpy (numbers: 3x3 conv + BN + ReLU).
VGG_B: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M", 512, "M"]
VGG_MLP = (1024, 512, 256)


def model_names() -> list[str]:
    """Every accepted ``model.name``."""
    return [CUSTOM, SPARCS_VGG, *timm.list_models("convnext*")]


class SparcsVGG(nn.Module):
    """SPARCS autophagy classifier 2.1 (de-novo baseline): input BatchNorm, VGG-B body, 2048-1024-512-256-n MLP.

    The body ends with an adaptive average pool to 2x2, so 128x128 crops give exactly the original
    512*2*2 = 2048 features; other sizes are pooled (or, below 128 px, replicated) to the same 2048.
    Max-pools use ``ceil_mode`` so inputs down to 1 px run through all six pooling stages.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 2, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_chans, self.num_classes, self.drop_rate = in_chans, num_classes, drop_rate
        self.input_norm = nn.BatchNorm2d(in_chans)
        layers: list[nn.Module] = []
        chans = in_chans
        for item in VGG_B:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(chans, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(True)]
                chans = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat_features = chans * 2 * 2  # 2048
        mlp: list[nn.Module] = []
        width = self.flat_features
        for hidden in VGG_MLP:
            mlp += [nn.Linear(width, hidden), nn.ReLU(True), nn.Dropout(drop_rate)]
            width = hidden
        self.pre_logits = nn.Sequential(*mlp)
        self.num_features = self.head_hidden_size = width
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 512, h, w) convolutional feature map (before the 2x2 pool)."""
        return self.features(self.input_norm(x))

    def forward_intermediates(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:meth:`forward_features` and, like timm's ``forward_intermediates``, every stage's map: here each block's
        output before its max-pool, at the block's own resolution (six stages; the multi-stage novelty pools them)."""
        x = self.input_norm(x)
        maps = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                maps.append(x)
            x = layer(x)
        return x, maps

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pre_logits(torch.flatten(self.pool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def build_model(cfg: ModelConfig, in_chans: int, n_classes: int) -> nn.Module:
    """Build ``cfg.name`` for ``in_chans`` input channels and ``n_classes`` outputs (random init or local weights)."""
    if in_chans < 1 or n_classes < 1:
        raise ModelError(f"model needs in_chans >= 1 and n_classes >= 1, got in_chans={in_chans}, n_classes={n_classes}")
    name = cfg.name
    if name == CUSTOM:
        if len(cfg.dims) != 4 or len(cfg.depths) != 4:
            raise ModelError(
                f"model.dims and model.depths must list 4 stages for {CUSTOM}, got dims={cfg.dims} depths={cfg.depths}"
            )
        if min(cfg.dims) < 1 or min(cfg.depths) < 1:
            raise ModelError(f"model.dims and model.depths must be positive, got dims={cfg.dims} depths={cfg.depths}")
        model: nn.Module = ConvNeXt(
            in_chans=in_chans, num_classes=n_classes, dims=tuple(cfg.dims), depths=tuple(cfg.depths),
            drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, patch_size=cfg.patch_size,
        )
    elif name == SPARCS_VGG:
        model = SparcsVGG(in_chans, n_classes, drop_rate=cfg.drop_rate)
    elif name in timm.list_models("convnext*"):
        model = timm.create_model(
            name, pretrained=False, in_chans=in_chans, num_classes=n_classes,
            drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, patch_size=cfg.patch_size,
        )
    else:
        raise ModelError(f"model.name: unknown model '{name}'; choose one of: {', '.join(model_names())}")
    if isinstance(model, ConvNeXt):
        _init_stem_bias(model)
    if cfg.pretrained is not None and cfg.pretrained.strip().lower() not in NO_WEIGHTS:
        load_checkpoint(model, cfg.pretrained)
    return model


STEM_BIAS_STD = 0.1


def _init_stem_bias(model: ConvNeXt) -> None:
    """Draw the patchify conv's bias from N(0, 0.1) instead of timm's zeros.

    Single-cell crops are zero outside the cell mask (about half the pixels). With a zero bias every
    background patch maps to the all-zero vector, the stem LayerNorm then divides by sqrt(eps) and the
    bias gradient is ~1e8 at init: training plateaus for hundreds of steps and short runs collapse
    depending on the seed. A small random bias gives background patches a finite, seed-dependent norm.
    """
    conv = model.stem[0]
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.normal_(0.0, STEM_BIAS_STD)


def feature_dim(model: nn.Module) -> int:
    """D of the penultimate features ``model.forward_head(model.forward_features(x), pre_logits=True)``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _state_dict_from(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelError(f"{path}: not a state dict (expected tensors, or a dict with a 'state_dict'/'model' key)")
    prefixes = ("module.", "_orig_mod.")
    out = {}
    for k, v in obj.items():
        for p in prefixes:
            k = k.removeprefix(p)
        out[k] = v
    return out


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier, the part a pretrained encoder does not provide."""
    return ("fc.",) if isinstance(model, SparcsVGG) else ("head.fc.",)


def _stem_head_prefixes(model: nn.Module) -> tuple[str, ...]:
    stem = ("input_norm.", "features.0.") if isinstance(model, SparcsVGG) else ("stem.",)
    return (*stem, *classifier_prefixes(model))


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``.

    The input conv is adapted (timm ``adapt_input_conv``) when only its channel count differs; other stem and
    classifier tensors whose shapes differ are skipped (logged). A mismatch anywhere else is a ModelError.
    """
    text = str(path).strip()
    low = text.lower()
    if low in HUB_WORDS or low.startswith(("hf-hub:", "hf_hub:", "timm/", "http://", "https://")):
        raise ModelError(
            f"model.pretrained='{text}': hub weights cannot be fetched offline; give a local checkpoint path"
        )
    p = Path(text)
    if not p.is_file():
        raise ModelError(f"model.pretrained: checkpoint file {p} not found")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file is an input problem
        raise ModelError(f"{p}: cannot read checkpoint: {exc}") from None
    sd = _state_dict_from(raw, p)
    if isinstance(model, ConvNeXt):
        sd = checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    soft = _stem_head_prefixes(model)
    loaded, skipped, adapted, bad = {}, [], [], []
    for k, v in sd.items():
        if k not in own:
            continue
        target = own[k]
        if v.shape == target.shape:
            loaded[k] = v
        elif k.startswith(soft) and v.ndim == 4 and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            loaded[k] = adapt_input_conv(target.shape[1], v.float(), base_chans=v.shape[1]).to(target.dtype)
            adapted.append(k)
        elif k.startswith(soft):
            skipped.append(k)
        else:
            bad.append(f"{k} {tuple(v.shape)} vs {tuple(target.shape)}")
    missing = [k for k in own if k not in loaded and k not in skipped]
    if bad or not loaded:
        detail = "; ".join(bad[:5]) if bad else "no tensor names match"
        raise ModelError(f"{p}: checkpoint does not fit model ({detail})")
    if missing:
        raise ModelError(f"{p}: checkpoint lacks {len(missing)} model tensors, e.g. {', '.join(missing[:5])}")
    model.load_state_dict(loaded, strict=False)
    unused = sorted(set(sd) - set(own))
    log.info("loaded %d tensors from %s", len(loaded), p)
    if adapted:
        log.info("adapted input channels of %s", ", ".join(adapted))
    if skipped:
        log.info("skipped (shape differs): %s", ", ".join(skipped))
    if unused:
        log.warning("ignored %d checkpoint tensors not in the model, e.g. %s", len(unused), ", ".join(unused[:5]))
