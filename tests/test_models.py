"""Model factory: every name builds, penultimate features work for all models, checkpoints load safely, augmentations."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from training.config import AugmentConfig, ModelConfig
from training.data.augment import Augmenter
from training.errors import ModelError
from training.models.factory import SparcsVGG, build_model, feature_dim, model_names

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}
BIG = ("base", "large", "xlarge", "xxlarge", "huge", "small")


def _names(big: bool) -> list[str]:
    return [n for n in model_names() if any(b in n for b in BIG) == big]


def _check_shapes(name: str, in_chans: int, size: int = 64) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name), in_chans, 5)
        x = torch.zeros(3, in_chans, size, size)
        assert model(x).shape == (3, 5)
        assert embed(model, x).shape == (3, feature_dim(model))


def embed(model, x):
    """Penultimate features, as the engine takes them (forward_head with pre_logits)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", _names(big=False))
def test_every_small_name_builds(name: str, in_chans: int) -> None:
    _check_shapes(name, in_chans)


@pytest.mark.slow
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", _names(big=True))
def test_every_big_name_builds(name: str, in_chans: int) -> None:
    _check_shapes(name, in_chans)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", ["convnext_custom", "sparcs_vgg", "convnext_atto"])
def test_real_forward_and_embedding(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, **TINY), in_chans, 4).eval()
    x = torch.rand(2, in_chans, 32, 32)
    logits, feats = model(x), embed(model, x)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    assert feats.shape == (2, feature_dim(model))
    # embed is the input of the final classifier
    torch.testing.assert_close(model.get_classifier()(feats), logits)


@pytest.mark.parametrize("name", ["convnext_custom", "sparcs_vgg"])
def test_stage_maps_for_the_multistage_novelty(name: str) -> None:
    """Every model name gives the stage maps the multi-stage novelty scores pool, from the same pass as the logits:
    the SPARCS VGG baseline could not train with ``energy_multistage`` (then the default) before it had them."""
    from training.engine import forward, predict
    from training.uncertainty.novelty import stage_features

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, **TINY), 1, 2).eval()
    x = torch.rand(3, 1, 64, 64)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(maps) >= 4 and all(m.ndim == 4 and len(m) == 3 for m in maps)
    if name == "sparcs_vgg":
        assert [m.shape[-1] for m in maps] == [64, 32, 16, 8, 4, 2]
    stages: list = []
    logits, _ = forward(model, x, stages=stages)
    torch.testing.assert_close(logits, model(x))
    assert len(stages) == len(maps)
    out = predict(model, [{"image": x, "idx": torch.arange(3), "label": torch.zeros(3, dtype=torch.long)}],
                  pool_stages=stage_features)
    assert out["stages"].shape == (3, 2 * sum(m.shape[1] for m in maps))
    assert np.isfinite(out["stages"]).all()


@pytest.mark.parametrize("name", ["convnext_custom", "convnext_atto"])
def test_patch_size_sets_the_first_stage_resolution(name: str) -> None:
    """``model.patch_size`` is the ConvNeXt stem's stride: 4 (timm's) starts the stages at 16 px of a 64 px crop,
    1 at the full 64 px, the resolution the VGG's first stage sees; with 2, timm's first stage downsamples once more
    (back to 16 px)."""
    x = torch.rand(2, 1, 64, 64)
    sides = {}
    for patch in (4, 2, 1):
        model = build_model(ModelConfig(name=name, **TINY, patch_size=patch), 1, 3).eval()
        _, maps = model.forward_intermediates(x)
        sides[patch] = [m.shape[-1] for m in maps]
        assert model(x).shape == (2, 3)
    assert sides == {4: [16, 8, 4, 2], 2: [16, 8, 4, 2], 1: [64, 32, 16, 8]}


def test_checkpoint_with_another_patch_size_keeps_all_but_the_stem(tmp_path, caplog) -> None:
    """An encoder pretrained with the 4 px stem still initialises a full-resolution (1 px stem) model: every tensor but
    the stem conv."""
    src = build_model(ModelConfig(name="convnext_custom", **TINY), 1, 2)
    path = tmp_path / "enc.pt"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.INFO):
        dst = build_model(ModelConfig(name="convnext_custom", **TINY, patch_size=1, pretrained=str(path)), 1, 2)
    assert "stem.0.weight" in caplog.text
    assert dst.stem[0].weight.shape[-1] == 1
    torch.testing.assert_close(dst.stages[1].blocks[0].conv_dw.weight, src.stages[1].blocks[0].conv_dw.weight)


def test_custom_convnext_follows_dims_and_dropout() -> None:
    model = build_model(ModelConfig(name="convnext_custom", dims=[8, 16, 24, 40], depths=[1, 2, 1, 1], drop_rate=0.3), 2, 3)
    assert feature_dim(model) == 40
    assert len(model.stages[1].blocks) == 2
    assert model.head.drop.p == pytest.approx(0.3)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sparcs_vgg_pools_to_2048(size: int) -> None:
    model = build_model(ModelConfig(name="sparcs_vgg", drop_rate=0.2), 1, 2).eval()
    x = torch.rand(2, 1, size, size)
    fmap = model.forward_features(x)
    assert fmap.shape[1] == 512
    assert torch.flatten(model.pool(fmap), 1).shape == (2, 2048)
    assert model.pre_logits[0].in_features == 2048
    assert [m.out_features for m in model.pre_logits if isinstance(m, torch.nn.Linear)] == [1024, 512, 256]
    assert model(x).shape == (2, 2)
    assert embed(model, x).shape == (2, 256) == (2, feature_dim(model))
    assert all(m.p == pytest.approx(0.2) for m in model.modules() if isinstance(m, torch.nn.Dropout))
    if size == 128:
        assert fmap.shape[-2:] == (2, 2)  # the original geometry: no resampling at 128 px


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ModelError, match="convnext_atto.*|sparcs_vgg"):
        build_model(ModelConfig(name="resnet50"), 1, 2)


@pytest.mark.parametrize("value", ["hub", "imagenet", "true", "hf-hub:timm/convnext_atto.d2_in1k"])
def test_hub_weights_refused(value: str) -> None:
    with pytest.raises(ModelError, match="offline"):
        build_model(ModelConfig(name="convnext_atto", pretrained=value), 1, 2)


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        build_model(ModelConfig(name="convnext_custom", pretrained=str(tmp_path / "nope.pt"), **TINY), 1, 2)


def test_bad_custom_dims() -> None:
    with pytest.raises(ModelError, match="4 stages"):
        build_model(ModelConfig(name="convnext_custom", dims=[8, 16], depths=[1, 1]), 1, 2)


def test_local_checkpoint_loads_and_skips_head(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    src = build_model(ModelConfig(name="convnext_custom", **TINY), 3, 5)
    path = tmp_path / "src.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)

    same = build_model(ModelConfig(name="convnext_custom", pretrained=str(path), **TINY), 3, 5)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v)

    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    with caplog.at_level(logging.INFO, logger="training.models.factory"):
        other = build_model(ModelConfig(name="convnext_custom", pretrained=str(path), **TINY), 1, 2)
    assert "head.fc.weight" in caplog.text and "stem.0.weight" in caplog.text
    torch.testing.assert_close(other.stages[2].blocks[0].conv_dw.weight, src.stages[2].blocks[0].conv_dw.weight)
    # stem conv adapted from 3 to 1 channel (RGB summed), head left at its fresh init
    torch.testing.assert_close(other.stem[0].weight, src.stem[0].weight.sum(1, keepdim=True))
    assert other.head.fc.weight.shape == (2, 32)


def test_checkpoint_for_another_architecture_is_refused(tmp_path) -> None:
    src = build_model(ModelConfig(name="convnext_custom", dims=[8, 16, 24, 32], depths=[1, 1, 1, 1]), 1, 2)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="does not fit"):
        build_model(ModelConfig(name="convnext_custom", pretrained=str(tmp_path / "w.pt"), **TINY), 1, 2)
    torch.save({"not": "weights"}, tmp_path / "junk.pt")
    with pytest.raises(ModelError, match="not a state dict"):
        build_model(ModelConfig(name="sparcs_vgg", pretrained=str(tmp_path / "junk.pt")), 1, 2)


def test_vgg_checkpoint_other_channels(tmp_path) -> None:
    src = SparcsVGG(in_chans=2, num_classes=3)
    torch.save(src.state_dict(), tmp_path / "vgg.pt")
    dst = build_model(ModelConfig(name="sparcs_vgg", pretrained=str(tmp_path / "vgg.pt")), 1, 3)
    torch.testing.assert_close(dst.fc.weight, src.fc.weight)  # same head size: loaded
    assert dst.input_norm.weight.shape == (1,)


# -- augmentations ---------------------------------------------------------------------------------------------


def _cells(n: int = 16, c: int = 2, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, c, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - size / 2) ** 2 + (xx - size / 2.5) ** 2) < (size / 3) ** 2
    return x * mask  # exact-0 background outside the "cell"


@pytest.mark.parametrize("view", ["standard", "weak", "strong"])
def test_augment_shapes_and_reproducible(view: str) -> None:
    aug = Augmenter(AugmentConfig(blur=0.5))
    x = _cells()
    before = x.clone()
    a = getattr(aug, view)(x, torch.Generator().manual_seed(5))
    b = getattr(aug, view)(x, torch.Generator().manual_seed(5))
    c = getattr(aug, view)(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # input untouched
    assert (a >= 0).all()


def test_non_square_keeps_shape() -> None:
    x = torch.rand(8, 1, 16, 24)
    aug = Augmenter(AugmentConfig(blur=1.0))
    for view in (aug.standard, aug.weak, aug.strong):
        assert view(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_zero_config_is_identity() -> None:
    cfg = AugmentConfig(flips=False, rot90=False, intensity=0, contrast=0, gamma=0, noise=0, blur=0)
    x = _cells()
    aug = Augmenter(cfg)
    torch.testing.assert_close(aug.standard(x, torch.Generator().manual_seed(0)), x, rtol=0, atol=0)
    torch.testing.assert_close(aug.weak(x, torch.Generator().manual_seed(0)), x, rtol=0, atol=0)
    assert torch.equal(Augmenter(cfg, cutout=0).strong(x, torch.Generator().manual_seed(0)), x)


def test_weak_only_permutes_pixels() -> None:
    x = _cells(n=32)
    y = Augmenter(AugmentConfig(intensity=0.5, noise=0.2, blur=1.0)).weak(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(y.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values, rtol=0, atol=0)
    moved = (y != x).flatten(1).any(1)
    assert 20 <= int(moved.sum()) < 32  # 7/8 of the D4 group moves pixels
    # every output is one of the 8 dihedral transforms of its input
    for xi, yi in zip(x, y, strict=True):
        views = [torch.rot90(v, k, (-2, -1)) for v in (xi, xi.flip(-1)) for k in range(4)]
        assert any(torch.equal(yi, v) for v in views)


def test_intensity_keeps_background_zero_and_strong_is_stronger() -> None:
    x = _cells(n=64)
    cfg = AugmentConfig(flips=False, rot90=False, blur=0.0)
    aug = Augmenter(cfg, cutout=0)
    s = aug.standard(x, torch.Generator().manual_seed(0))
    assert ((x == 0) == (s == 0)).float().mean() > 0.99  # background stays exactly 0 (noise could hit 0 rarely)
    assert (s[x == 0] == 0).all()
    st = aug.strong(x, torch.Generator().manual_seed(0))
    assert (st[x == 0] == 0).all()
    assert (st - x).abs().mean() > 1.5 * (s - x).abs().mean()


def test_strong_cutout_zeroes_a_square() -> None:
    x = torch.rand(16, 1, 32, 32) + 0.1
    cfg = AugmentConfig(flips=False, rot90=False, intensity=0, contrast=0, gamma=0, noise=0, blur=0)
    y = Augmenter(cfg, cutout=0.5).strong(x, torch.Generator().manual_seed(0))
    zeroed = y[:, 0] == 0
    rows, cols = zeroed.any(2), zeroed.any(1)
    assert torch.equal(zeroed, rows[:, :, None] & cols[:, None, :])  # one rectangle per image: rows x columns
    clear = 0
    for r, c in zip(rows, cols, strict=True):
        ri, ci = r.nonzero().flatten(), c.nonzero().flatten()
        assert (ri.diff() == 1).all() and (ci.diff() == 1).all()  # contiguous
        assert min(len(ri), len(ci)) >= 1 and max(len(ri), len(ci)) <= 16  # side at most half the image
        if ri[0] > 0 and ci[0] > 0 and ri[-1] < 31 and ci[-1] < 31:  # clear of the border: a square
            assert len(ri) == len(ci)
            clear += 1
    assert clear >= 4  # the square check ran
    torch.testing.assert_close(y[y != 0], x[y != 0])


def test_crop_keeps_a_random_square_of_at_least_min_scale_of_the_area() -> None:
    size = 64
    ramp = torch.arange(size, dtype=torch.float32).expand(size, size)  # value = column
    x = torch.stack([ramp, ramp.T])[None].repeat(32, 1, 1, 1)  # channel 0: x, channel 1: y
    aug = Augmenter(AugmentConfig())
    assert aug.crop(x, torch.Generator().manual_seed(0), 1.0) is x
    y = aug.crop(x, torch.Generator().manual_seed(0), 0.25)
    assert y.shape == x.shape
    torch.testing.assert_close(y, aug.crop(x, torch.Generator().manual_seed(0), 0.25), rtol=0, atol=0)
    # a square crop: the same scale in x and y (input pixels per output pixel, away from the border pixels that
    # may touch the image edge), between sqrt(0.25) and 1, inside the image
    span_x = (y[:, 0, 0, -3] - y[:, 0, 0, 2]) / (size - 5)
    span_y = (y[:, 1, -3, 0] - y[:, 1, 2, 0]) / (size - 5)
    torch.testing.assert_close(span_x, span_y, rtol=0, atol=1e-4)
    assert (span_x >= 0.5 - 1e-3).all() and (span_x <= 1 + 1e-3).all() and (span_x < 0.9).any()
    assert y.min() >= -1e-4 and y.max() <= size - 1 + 1e-4
    assert len({round(float(v), 2) for v in y[:, 0, 0, 0]}) > 20  # crops start at different places


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_matches_params() -> None:
    x = _cells().cuda()
    aug = Augmenter(AugmentConfig(noise=0.0))
    a = aug.standard(x, torch.Generator().manual_seed(0))
    b = aug.standard(x.cpu(), torch.Generator().manual_seed(0))
    assert a.device.type == "cuda"
    torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["convnext_custom", "convnext_atto"])
def test_convnext_stem_gradient_is_tame_on_masked_cells(name: str) -> None:
    """Zero background (outside the cell mask) must not blow up the stem LayerNorm's gradient at init."""
    torch.manual_seed(0)
    x = torch.zeros(8, 1, 64, 64)
    x[:, :, 16:48, 16:48] = torch.rand(8, 1, 32, 32)  # a cell in the middle, zeros around it
    y = torch.randint(0, 2, (8,))

    def stem_bias_grad(model: torch.nn.Module) -> float:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return float(model.stem[0].bias.grad.norm())

    model = build_model(ModelConfig(name=name, **TINY), 1, 2)
    assert model.stem[0].bias.abs().sum() > 0
    tame = stem_bias_grad(model)
    assert tame < 100.0
    # the defect this guards against: timm's zero bias on the same model and input
    with torch.no_grad():
        model.stem[0].bias.zero_()
    model.zero_grad()
    assert stem_bias_grad(model) > 1000 * tame
