"""The training engine: learns, resumes bit-identically, stops early, fails loudly on NaN, is seed-deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.config import AugmentConfig, ModelConfig, TrainConfig
from training.data.augment import Augmenter
from training.engine import (
    SupervisedObjective,
    evaluate,
    fit,
    predict,
    seed_everything,
    select_device,
)
from training.errors import ConfigError, TrainingError
from training.models.factory import build_model, feature_dim

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"name": "convnext_custom", "dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}


def blobs(n: int, seed: int, size: int = 32, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy round cells on an exact-0 background: class 0 larger with bright puncta, class 1 smaller, diffuse."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.rand(2, n, 1, 1, generator=g) * 0.3 + 0.35) * size
    r = torch.where(y == 0, 0.28, 0.2)[:, None, None] * size * (0.85 + 0.3 * torch.rand(n, 1, 1, generator=g))
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
    off = (torch.rand(2, n, 6, 1, 1, generator=g) - 0.5) * r[:, None]  # 6 puncta per cell, inside it
    spots = torch.exp(-((yy - cy[:, None] - off[0]) ** 2 + (xx - cx[:, None] - off[1]) ** 2) / 4.0).sum(1)
    x = 0.3 + 0.05 * torch.randn(n, size, size, generator=g) + 0.6 * spots * (y == 0)[:, None, None]
    return (x.clamp(0, 1) * mask)[:, None].float(), (1 - y if flip else y).long()


class Loader:
    """DataLoader(TensorDataset) yielding engine batches; shuffled from the global torch RNG (or seed+epoch)."""

    def __init__(self, x, y, batch_size=32, shuffle=True, seed: int | None = None):
        self.ds = TensorDataset(x, y, torch.arange(len(x)))
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.ds) / self.batch_size)

    def __iter__(self):
        gen = None if self.seed is None else torch.Generator().manual_seed(self.seed + self.epoch)
        for x, y, i in DataLoader(self.ds, self.batch_size, shuffle=self.shuffle, generator=gen):
            yield {"image": x, "label": y, "idx": i}


def data(n_train=256, n_val=128, flip_val=False, seed=None):
    return (Loader(*blobs(n_train, 0), seed=seed), Loader(*blobs(n_val, 1, flip=flip_val), shuffle=False))


def make(seed=0, drop_rate=0.0, drop_path_rate=0.0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**TINY, drop_rate=drop_rate, drop_path_rate=drop_path_rate), 1, 2)


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 4, "lr": 3e-3, "warmup_epochs": 0.5, "patience": None, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def objective(noise=True):
    aug = Augmenter(AugmentConfig(noise=0.02 if noise else 0.0, blur=0.3))
    return SupervisedObjective(2, aug, label_smoothing=0.05)


def test_tiny_model_learns_easy_task() -> None:
    train, val = data()
    logged = []
    res = fit(make(), train, val, cfg(epochs=6), objective(), 2, progress=False,
              log_metrics=lambda m, e: logged.append((e, m)))
    assert res.history[-1]["val_accuracy"] > 0.8
    assert res.history[-1]["val_balanced_accuracy"] > 0.8
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert [e for e, _ in logged] == list(range(6)) and res.epochs_run == 6
    assert {"train_loss", "train_accuracy", "grad_norm", "lr", "val_loss", "val_accuracy",
            "val_balanced_accuracy"} <= set(logged[0][1])


def test_resume_is_bit_identical(tmp_path) -> None:
    c = cfg(epochs=4, patience=3)
    train, val = data()
    full = make(drop_rate=0.3, drop_path_rate=0.1)
    ref = fit(full, train, val, c, objective(), 2, out_dir=tmp_path / "a", progress=False)

    class Crash(Loader):
        def set_epoch(self, epoch: int) -> None:
            if epoch == 2:
                raise KeyboardInterrupt
            super().set_epoch(epoch)

    crash = Crash(*blobs(256, 0))
    part = make(drop_rate=0.3, drop_path_rate=0.1)
    with pytest.raises(KeyboardInterrupt):
        fit(part, crash, val, c, objective(), 2, out_dir=tmp_path / "b", progress=False)
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert saved["state"]["epoch"] == 2

    resumed = make(seed=123, drop_rate=0.3, drop_path_rate=0.1)  # different init: everything comes from last.pt
    torch.manual_seed(999)  # and a disturbed global RNG
    res = fit(resumed, Loader(*blobs(256, 0)), val, c, objective(), 2, out_dir=tmp_path / "b", resume=True,
              progress=False)
    assert res.history == ref.history
    assert res.epochs_run == ref.epochs_run == 4
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_resume_without_checkpoint_fails(tmp_path) -> None:
    train, val = data(n_train=64, n_val=32)
    with pytest.raises(TrainingError, match="no checkpoint"):
        fit(make(), train, val, cfg(), objective(), 2, out_dir=tmp_path, resume=True, progress=False)


def test_early_stopping_restores_best(tmp_path) -> None:
    train, val = data(flip_val=True)  # validation labels inverted: val loss rises as the model learns
    model = make()
    snapshots = {}

    def snap(metrics, epoch):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    res = fit(model, train, val, cfg(epochs=20, patience=2), objective(), 2, out_dir=tmp_path, log_metrics=snap,
              progress=False)
    losses = [h["val_loss"] for h in res.history]
    assert res.stopped_early and res.epochs_run < 20
    assert res.epochs_run == res.best_epoch + 1 + 2
    assert res.best_epoch == int(np.argmin(losses)) and res.best_val_loss == min(losses)
    assert res.weights_epoch == res.best_epoch
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[res.best_epoch][k]), k
    # resuming a finished run trains nothing more and returns the same best weights
    again = make(seed=5)
    res2 = fit(again, train, val, cfg(epochs=20, patience=2), objective(), 2, out_dir=tmp_path, resume=True,
               progress=False)
    assert res2.epochs_run == res.epochs_run and res2.history == res.history
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize(("monitor", "best"), [("val_loss", 1), ("val_balanced_accuracy", 2)])
def test_monitor_picks_the_restored_epoch(tmp_path, monkeypatch, monitor, best) -> None:
    """Scripted validation metrics where the lowest loss (epoch 1) and the best accuracy (epoch 2) disagree."""
    script = iter([(1.0, 0.5), (0.5, 0.6), (0.6, 0.9), (0.7, 0.7)])

    def scripted(*args, **kwargs):
        loss, acc = next(script)
        return {"val_loss": loss, "val_accuracy": acc, "val_balanced_accuracy": acc}

    monkeypatch.setattr("training.engine.evaluate", scripted)
    train, val = data()
    model = make()
    snapshots = {}

    def snap(metrics, epoch):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    res = fit(model, train, val, cfg(epochs=4, patience=4, monitor=monitor), objective(), 2, out_dir=tmp_path,
              log_metrics=snap, progress=False)
    assert res.epochs_run == 4 and not res.stopped_early
    assert res.best_epoch == res.weights_epoch == best
    assert res.best_val_loss == [1.0, 0.5, 0.6, 0.7][best]
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[best][k]), k


class NaNAt:
    """Supervised objective whose loss turns NaN at one (epoch, step)."""

    def __init__(self, epoch: int, step: int):
        self.inner, self.at = objective(), (epoch, step)

    def loss(self, model, batch, step):
        loss, extra = self.inner.loss(model, batch, step)
        return (loss * float("nan") if (step.epoch, step.step) == self.at else loss), extra

    def on_step_end(self, model):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, d):
        pass


def test_nan_loss_raises_and_keeps_checkpoint(tmp_path) -> None:
    val = data(n_val=32)[1]
    ckpt = tmp_path / "last.pt"
    seen = {}

    class Watch(Loader):
        def set_epoch(self, epoch):
            if epoch == 1:
                seen["bytes"] = ckpt.read_bytes()
            super().set_epoch(epoch)

    with pytest.raises(TrainingError, match=rf"loss became NaN at epoch 1 step 2; last good checkpoint: {ckpt}"):
        fit(make(), Watch(*blobs(128, 0)), val, cfg(), NaNAt(1, 2), 2, out_dir=tmp_path, progress=False)
    assert ckpt.read_bytes() == seen["bytes"]
    assert torch.load(ckpt, weights_only=False)["state"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left behind

    with pytest.raises(TrainingError, match="last good checkpoint: none"):
        fit(make(), Loader(*blobs(64, 0)), val, cfg(), NaNAt(0, 0), 2, progress=False)


def test_same_seed_same_history() -> None:
    def run(seed):
        train, val = data(n_train=128, n_val=64)
        seed_everything(seed)
        model = make(seed, drop_rate=0.2)
        return fit(model, train, val, cfg(epochs=2, seed=seed), objective(), 2, progress=False).history

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c


def test_schedule_sgd_and_step_cap() -> None:
    calls = []

    class Count(SupervisedObjective):
        def loss(self, model, batch, step):
            calls.append((step.epoch, step.step, step.global_step, step.total_steps))
            return super().loss(model, batch, step)

    lrs = []
    train, val = data(n_train=256, n_val=32)
    c = cfg(epochs=4, optimizer="sgd", lr=0.05, warmup_epochs=2, max_steps_per_epoch=3)
    fit(make(), train, None, c, Count(2, None), 2, progress=False, log_metrics=lambda m, e: lrs.append(m["lr"]))
    assert len(calls) == 12 and calls[-1] == (3, 2, 11, 12)
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > lrs[3]  # warm-up to the peak, then cosine decay
    assert lrs[1] == pytest.approx(0.05) and lrs[3] == pytest.approx(0.0, abs=1e-12)


def test_unlabeled_cells_are_ignored_and_bad_weights_refused() -> None:
    x, y = blobs(64, 0)
    y[::2] = -1
    model = make()
    res = fit(model, Loader(x, y), Loader(x, y, shuffle=False), cfg(epochs=1), objective(), 2, progress=False)
    labeled = y >= 0  # the validation loss is that of the labeled cells alone, with the weights fit kept
    alone = evaluate(model, Loader(x[labeled], y[labeled], shuffle=False), 2, torch.device("cpu"))
    assert res.weights_epoch == 0 and res.history[0]["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="class_weights"):
        SupervisedObjective(3, None, class_weights=torch.ones(2))
    weighted = SupervisedObjective(2, None, class_weights=torch.tensor([1.0, 3.0]))
    assert fit(make(), Loader(x, y), None, cfg(epochs=1), weighted, 2, progress=False).epochs_run == 1


@pytest.mark.parametrize("name", ["convnext_custom", "sparcs_vgg"])
def test_predict_and_mc_dropout(name: str) -> None:
    x, y = blobs(40, 3)
    loader = Loader(x, y, batch_size=16, shuffle=False)
    extra = TINY if name == "convnext_custom" else {}
    for rate in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**extra, "name": name, "drop_rate": rate}), 1, 2)
        model.train()
        out = predict(model, loader, mc_dropout=4)
        assert model.training  # mode restored
        assert out["logits"].shape == (4, 40, 2)
        assert out["features"].shape == (40, feature_dim(model))
        assert (out["idx"] == np.arange(40)).all() and (out["label"] == y.numpy()).all()
        spread = out["logits"].std(0).max()
        assert (spread > 1e-4) if rate > 0 else (spread == 0)
        plain = predict(model, loader, with_features=False)
        assert plain["logits"].shape == (40, 2) and "features" not in plain
        np.testing.assert_allclose(plain["logits"], model.eval()(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_select_device() -> None:
    assert select_device("auto").type == "cpu" and select_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        select_device("gpu0")


class BodyDropoutNet(torch.nn.Module):
    """Dropout inside the feature extractor: MC dropout must rerun the whole network per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Dropout(0.5), torch.nn.ReLU())
        self.fc = torch.nn.Linear(4, 2)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f, pre_logits: bool = False):
        f = f.mean((2, 3))
        return f if pre_logits else self.fc(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_mc_dropout_in_the_body() -> None:
    x, y = blobs(8, 0)
    torch.manual_seed(0)
    model = BodyDropoutNet()
    out = predict(model, Loader(x, y, shuffle=False), mc_dropout=3)
    assert out["logits"].std(0).max() > 1e-4
    np.testing.assert_allclose(out["features"], model.eval().forward_head(model.forward_features(x), True).detach(),
                               rtol=1e-5, atol=1e-6)


def test_validation_balanced_accuracy_is_the_one_metric():
    """engine.evaluate scores with training.evaluation.metrics.balanced_accuracy: mean recall over present classes."""
    from training.engine import evaluate as engine_eval

    class Always(nn.Module):  # predicts class 0 for every cell
        def forward(self, x):
            return torch.tensor([[5.0, 0.0, 0.0]]).repeat(len(x), 1)

    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    batches = [{"image": torch.zeros(3, 1, 4, 4), "label": labels[:3]},
               {"image": torch.zeros(3, 1, 4, 4), "label": labels[3:]}]
    m = engine_eval(Always(), batches, 3, torch.device("cpu"))
    assert m["val_balanced_accuracy"] == pytest.approx(1 / 3)  # recall 1, 0, 0
    assert m["val_accuracy"] == pytest.approx(3 / 6)


def test_probe_epochs_train_only_the_classifier_first() -> None:
    """LP-FT: during the probe epochs the backbone stays exactly as it started (no update, no weight decay) while
    the classifier learns; afterwards the backbone trains too, and the model leaves fully trainable."""
    train, val = data(n_train=96, n_val=32)
    model = make()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    after: dict[int, dict[str, torch.Tensor]] = {}

    def keep(epoch, metrics, ckpt):
        after[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    fit(model, train, val, cfg(epochs=3, probe_epochs=2), objective(), 2, progress=False, on_epoch_end=keep)
    body = [k for k in start if not k.startswith("head.fc.") and start[k].is_floating_point()]
    assert body and all(torch.equal(after[1][k], start[k]) for k in body)
    assert not torch.equal(after[1]["head.fc.weight"], start["head.fc.weight"])
    assert not torch.equal(after[2]["stem.0.weight"], start["stem.0.weight"])
    assert all(p.requires_grad for p in model.parameters())

    # probe_epochs == epochs is a pure linear probe
    probed = make()
    fit(probed, train, val, cfg(epochs=1, probe_epochs=1), objective(), 2, progress=False)
    assert torch.equal(probed.state_dict()["stem.0.weight"], start["stem.0.weight"])
    with pytest.raises(ConfigError, match="probe_epochs=4 exceeds train.epochs=3"):  # params refuse it at load;
        unchecked = cfg(epochs=3).model_copy(update={"probe_epochs": 4})  # a copy made in code is still caught
        fit(make(), train, val, unchecked, objective(), 2, progress=False)
    # an error during the probe (here a NaN loss) still leaves the model fully trainable
    failed = make()
    with pytest.raises(TrainingError):
        fit(failed, train, val, cfg(epochs=3, probe_epochs=2), NaNAt(0, 1), 2, progress=False)
    assert all(p.requires_grad for p in failed.parameters())


def test_backbone_lr_scale_moves_the_backbone_that_much_less() -> None:
    """One AdamW step from the same weights on the same batch: Adam's first step is lr times the gradient's sign
    (and the decoupled decay is lr times the weight), so a backbone at lr * 0.1 moves exactly a tenth as far while
    the classifier moves as far as with one rate."""
    train, val = data(n_train=32, n_val=16)
    start = make().state_dict()
    moved = {}
    for scale in (1.0, 0.1):
        model = make()
        fit(model, train, val, cfg(epochs=1, backbone_lr_scale=scale), objective(noise=False), 1, progress=False)
        moved[scale] = {k: v - start[k] for k, v in model.state_dict().items() if v.is_floating_point()}
    assert torch.allclose(moved[0.1]["head.fc.weight"], moved[1.0]["head.fc.weight"], atol=1e-7)
    body = [k for k in moved[1.0] if not k.startswith("head.fc.") and moved[1.0][k].abs().max() > 0]
    assert "stem.0.weight" in body
    for k in body:
        # atol: two float32 roundings of a weight near 1 (a norm whose gradient is about Adam's eps moves ~1e-7)
        assert torch.allclose(moved[0.1][k], 0.1 * moved[1.0][k], rtol=1e-3, atol=3e-7), k
