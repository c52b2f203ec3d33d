"""Semi-supervised objectives: FixMatch masking, the open-set guard, label fraction, no test-label leak, resume,
the unlabeled pool balanced by predicted class."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_params

from training.active.campaign import TensorLoader
from training.config import AugmentConfig, ModelConfig, TrainConfig
from training.data.augment import Augmenter
from training.data.cellindex import build_index
from training.data.loader import loader_for
from training.data.splits import make_splits
from training.data.streams import balanced_weights, sample_order
from training.data.trainset import HIDDEN, keep_label_fraction, prepare_data, unlabeled_table
from training.engine import StepContext, fit
from training.errors import ConfigError, TrainingError
from training.models.factory import build_model
from training.regimes.ensemble_training import loaders, train_member
from training.regimes.objectives import make_objective
from training.regimes.semisupervised import (
    AutoencoderObjective,
    FixMatchObjective,
    MixedLoader,
    NoveltyGuard,
    PredictedClassBalance,
    flexible_thresholds,
    pseudo_labels,
    training_stream,
)

TINY = ModelConfig(dims=[8, 16, 16, 32], depths=[1, 1, 1, 1], drop_rate=0.0)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY, 1, 2)


def _ctx(seed: int = 0) -> StepContext:
    return StepContext(0, 0, 0, torch.Generator().manual_seed(seed), torch.device("cpu"))


def _batch(n_l: int = 4, n_u: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n_l, 1, 32, 32, generator=g), "label": torch.arange(n_l) % 2,
            "idx": torch.arange(n_l), "u_image": torch.rand(n_u, 1, 32, 32, generator=g), "u_idx": torch.arange(n_u)}


def _fixmatch(threshold: float, weight: float = 1.0, **kw) -> FixMatchObjective:
    return FixMatchObjective(2, Augmenter(AugmentConfig()), threshold=threshold, unlabeled_weight=weight, **kw)


@pytest.fixture(scope="module")
def tiny_data(tiny_manifest, tmp_path_factory):
    p = tiny_params(tmp_path_factory.mktemp("ssl"))
    table, summary = make_splits(build_index(tiny_manifest, progress=False), p.split)
    return prepare_data(table, summary["classes"], p)


def test_pseudo_labels_mask_below_threshold():
    probs = torch.tensor([[0.96, 0.04], [0.94, 0.06], [0.02, 0.98], [0.5, 0.5]])
    labels, mask = pseudo_labels(probs, 0.95)
    assert labels.tolist() == [0, 0, 1, 0]
    assert mask.tolist() == [True, False, True, False]


def test_flexible_thresholds_lower_the_bar_for_seldom_predicted_classes():
    learned = torch.tensor([0.6, 0.2, 0.0])
    thr = flexible_thresholds(learned, unused=0.2, threshold=0.95)
    assert thr[0] == pytest.approx(0.95)  # the best-learned class keeps the threshold
    assert 0.0 == thr[2] < thr[1] < thr[0]
    # warm-up: while most cells are still unused, every class is normalised by that share
    early = flexible_thresholds(learned, unused=0.9, threshold=0.95)
    assert torch.all(early <= thr) and early[0] < 0.95


def test_class_thresholds_admit_pseudo_labels_that_a_global_threshold_masks():
    model, batch = _model(), _batch()
    plain = _fixmatch(0.999, novelty_guard=False)
    flex = _fixmatch(0.999, novelty_guard=False, class_thresholds=True)
    _, m_plain = plain.loss(model, batch, _ctx())
    _, m_flex = flex.loss(model, batch, _ctx())
    assert m_plain["ssl/mask_rate"] == 0.0
    # nothing reaches 0.999, so no class has learned anything: every class threshold is 0.999 * 0 / (2 - 0) = 0 and
    # the curriculum admits every cell
    assert flex.state_dict()["learned"].tolist() == [0.0, 0.0]
    assert m_flex["ssl/mask_rate"] == 1.0


def test_fixmatch_unlabeled_loss_only_from_confident_cells():
    model = _model()
    batch = _batch()
    masked = {w: _fixmatch(1.0, w, novelty_guard=False).loss(model, batch, _ctx()) for w in (0.0, 1.0)}
    assert masked[1.0][1]["ssl/mask_rate"] == 0.0 and masked[1.0][1]["ssl/weight"] == 0.0
    assert masked[0.0][0].item() == pytest.approx(masked[1.0][0].item())  # no confident cell: no unlabeled loss
    open_ = {w: _fixmatch(1e-6, w, novelty_guard=False).loss(model, batch, _ctx()) for w in (0.0, 1.0)}
    assert open_[1.0][1]["ssl/mask_rate"] == 1.0
    assert open_[1.0][0].item() > open_[0.0][0].item()  # every cell pseudo-labeled: the unlabeled loss counts
    hist = sum(v for k, v in open_[1.0][1].items() if k.startswith("ssl/pl_frac/"))
    assert hist == pytest.approx(1.0)


def test_fixmatch_logs_pseudo_label_accuracy_against_truth():
    obj = _fixmatch(1e-6, novelty_guard=True, truth=np.array([0, 1, 0, 1, -1, -1, -2, 0]))
    model = _model()
    with torch.no_grad():  # a teacher that calls every cell class 0
        model.get_classifier().bias.copy_(torch.tensor([100.0, -100.0]))
    _, m = obj.loss(model, _batch(), _ctx())
    # cells with a class truth: 0, 1, 2, 3, 7; truth 0 (what the teacher says) at 0, 2, 7
    assert m["ssl/pl_accuracy"] == pytest.approx(3 / 5) and m["ssl/pl_accuracy_all"] == pytest.approx(3 / 5)
    assert m["ssl/pl_frac/0"] == 1.0 and m["ssl/pl_frac/1"] == 0.0
    assert m["ssl/mask_rate_noclass"] == 1.0  # the threshold lets every cell through, including no-class ones
    assert {"ssl/guard_class", "ssl/guard_noclass", "ssl/pl_accuracy_all"} <= set(m)


def test_novelty_guard_downweights_cells_far_from_every_class():
    g = torch.Generator().manual_seed(0)
    guard = NoveltyGuard(2, quantile=0.95, momentum=0.0)
    z = torch.cat([torch.randn(50, 8, generator=g) * 0.3 + 2, torch.randn(50, 8, generator=g) * 0.3 - 2])
    y = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    guard.update(z, y)
    w = guard.weights(torch.stack([torch.full((8,), 2.0), torch.full((8,), -2.0), torch.full((8,), 8.0)]))
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(1.0)
    assert w[2] < 1e-3


def test_label_fraction_keeps_a_stratified_share_and_hides_the_rest(tiny_data):
    before = tiny_data.split("train")
    d = keep_label_fraction(tiny_data, 0.25, seed=0)
    after = d.split("train")
    for c in range(len(d.classes)):
        n = int((before["y"] == c).sum())
        assert int((after["y"] == c).sum()) == max(1, round(0.25 * n))
    hidden = d.cells[d.cells[HIDDEN]]
    assert len(hidden) == len(before) - len(after)
    assert (hidden["split"] == "unlabeled").all() and (hidden["y"] == -1).all() and hidden["label"].isna().all()
    for name in ("val", "test", "heldout"):
        pd.testing.assert_frame_equal(d.split(name).drop(columns=HIDDEN), tiny_data.split(name))
    assert keep_label_fraction(tiny_data, 1.0, seed=0) is tiny_data


def test_semisupervised_training_never_sees_test_labels(tiny_data, tmp_path):
    p = tiny_params(tmp_path, **{"train.regime": "semisupervised", "ssl.label_fraction": 0.5})
    d = keep_label_fraction(tiny_data, 0.5, seed=0)
    train, unl = d.split("train"), unlabeled_table(d)
    stream = training_stream(loaders(d, p, 0)[0], d, p, seed=0)
    n_full = len(tiny_data.split("train"))
    assert isinstance(stream, MixedLoader) and len(stream) == math.ceil(n_full / p.data.batch_size)
    keys = lambda t: set(zip(t["source_file"].astype(str), t["cell_id"], strict=True))  # noqa: E731
    seen_l, seen_u = set(), set()
    for batch in stream:
        rows = train.iloc[batch["idx"].numpy()]
        assert (batch["label"].numpy() == rows["y"].to_numpy()).all()
        seen_l |= keys(rows)
        assert "u_label" not in batch
        seen_u |= keys(unl.iloc[batch["u_idx"].numpy()])
    labeled_elsewhere = keys(d.cells[d.cells["split"].isin(["test", "val", "heldout"])])
    assert seen_l <= keys(train)
    assert not (seen_u & labeled_elsewhere) and not (seen_u & keys(train))
    assert not (keys(unl) & labeled_elsewhere)
    assert unl["label"].isna().all() and (unl["y"] == -1).all()


def test_semisupervised_member_trains_through_the_engine(tiny_data, tmp_path):
    p = tiny_params(tmp_path, **{"train.regime": "semisupervised", "ssl.label_fraction": 0.5, "ssl.threshold": 0.6,
                                 "train.epochs": 1, "train.max_steps_per_epoch": 2, "ensemble.members": 1})
    logged = []
    model, temperature, novelty, res, _ = train_member(0, tiny_data, p, tmp_path, log_metrics=lambda m, e: logged.append(m),
                                                   progress=False)
    assert res.epochs_run == 1 and temperature > 0 and novelty is not None
    assert {"ssl/mask_rate", "ssl/weight", "ssl/pl_frac/bright", "ssl/pl_frac/spotty"} <= set(logged[0])
    d = keep_label_fraction(tiny_data, 0.5, p.split.seed)
    truth = unlabeled_table(d).assign(state="on")  # a hand-made truth table: "on" is no tiny class
    obj = make_objective(p, d, 0, truth=truth)
    assert obj.truth is not None and (obj.truth == -1).all()


def _crashing(loader: MixedLoader, at: int) -> MixedLoader:
    class Crash(MixedLoader):
        def set_epoch(self, epoch: int) -> None:
            if epoch == at:
                raise KeyboardInterrupt
            super().set_epoch(epoch)

    return Crash(loader.labeled, loader.unlabeled, loader.steps, loader.rebalance)


@pytest.mark.parametrize("method", ["fixmatch", "autoencoder", "fixmatch_balanced"])
def test_resume_restores_teacher_and_decoder(tmp_path, method):
    g = torch.Generator().manual_seed(0)
    x, y, u = torch.rand(16, 1, 32, 32, generator=g), np.arange(16) % 2, torch.rand(32, 1, 32, 32, generator=g)

    made = []

    def data(obj, model):
        rebalance = None
        if method == "fixmatch_balanced":  # the resumed epoch is drawn from the restored teacher's predictions
            rebalance = PredictedClassBalance(obj, model, TensorLoader(u, None, 10), len(u))
        made.append(MixedLoader(TensorLoader(x, y, 8, shuffle=True, seed=1),
                                TensorLoader(u, None, 16, shuffle=True, seed=2), 2, rebalance))
        return made[-1]

    def objective():
        if method == "autoencoder":
            return AutoencoderObjective(2, Augmenter(AugmentConfig()), in_channels=1, image_size=32)
        return _fixmatch(0.5, distribution_alignment=True, class_thresholds=True)

    cfg = TrainConfig(epochs=2, patience=None, device="cpu", warmup_epochs=0.5)
    ref_obj = objective()
    ref = _model()
    fit(ref, data(ref_obj, ref), None, cfg, ref_obj, 2, out_dir=tmp_path / "a", progress=False)
    crash_obj, crash_model = objective(), _model()
    with pytest.raises(KeyboardInterrupt):
        fit(crash_model, _crashing(data(crash_obj, crash_model), 1), None, cfg, crash_obj, 2, out_dir=tmp_path / "b",
            progress=False)
    res_obj = objective()
    resumed = _model(seed=5)
    fit(resumed, data(res_obj, resumed), None, cfg, res_obj, 2, out_dir=tmp_path / "b", resume=True, progress=False)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = ref_obj.state_dict(), res_obj.state_dict()
    part = "decoder" if method == "autoencoder" else "teacher"
    if method == "fixmatch_balanced":  # the resumed epoch really was drawn by the restored teacher's weights
        assert made[-1].unlabeled.weights is not None and made[-1].rebalance.counts.sum() == len(u)
    for k, v in sa[part].items():
        assert torch.equal(v, sb[part][k]), k
    assert not any("decoder" in k for k in ref.state_dict())  # the decoder never enters the saved model


def _mixed(n_u: int = 32) -> MixedLoader:
    g = torch.Generator().manual_seed(0)
    x, y, u = torch.rand(16, 1, 32, 32, generator=g), np.arange(16) % 2, torch.rand(n_u, 1, 32, 32, generator=g)
    return MixedLoader(TensorLoader(x, y, 8, shuffle=True, seed=1), TensorLoader(u, None, 16, shuffle=True, seed=2), 3)


def test_fixmatch_really_trains_on_the_unlabeled_cells_through_an_ema_teacher():
    cfg = TrainConfig(epochs=1, patience=None, device="cpu", warmup_epochs=0)
    models, objs = {}, {}
    for w in (0.0, 1.0):
        objs[w], models[w] = _fixmatch(1e-6, w, novelty_guard=False, ema_decay=0.99), _model()
        fit(models[w], _mixed(), None, cfg, objs[w], 2, progress=False)
    # same seed, same labeled batches: only the pseudo-labeled unlabeled loss can make the weights differ
    assert any(not torch.equal(a, b) for a, b in zip(models[0.0].state_dict().values(),
                                                    models[1.0].state_dict().values(), strict=True))
    obj, student = objs[1.0], models[1.0]
    assert obj.updates == 3  # one EMA update per optimizer step
    # decay min(0.99, (1+t)/(10+t)) < 1: the teacher moved away from the initial weights, but lags the student
    init = _model().state_dict()
    teacher = obj.teacher.state_dict()
    assert any(not torch.equal(teacher[k], init[k]) for k in init)
    assert any(not torch.equal(teacher[k], v) for k, v in student.state_dict().items())
    # decay 0: the teacher is the student itself
    same = _fixmatch(1e-6, 1.0, novelty_guard=False, ema_decay=0.0)
    m = _model()
    fit(m, _mixed(), None, cfg, same, 2, progress=False)
    for k, v in m.state_dict().items():
        assert torch.equal(same.teacher.state_dict()[k], v), k


def test_autoencoder_decoder_is_a_parameter_group_of_the_engine_optimizer(tmp_path):
    cfg = TrainConfig(epochs=2, patience=None, device="cpu", warmup_epochs=1, grad_clip=1.0)
    obj = AutoencoderObjective(2, Augmenter(AugmentConfig()), in_channels=1, image_size=32)
    before = None
    model = _model()
    obj.param_groups(model)
    before = {k: v.clone() for k, v in obj.decoder.state_dict().items()}
    fit(model, _mixed(), None, cfg, obj, 2, out_dir=tmp_path, progress=False)
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    n_decoder = len(list(obj.decoder.parameters()))
    assert len(groups) == 3 and len(groups[2]["params"]) == n_decoder and groups[2]["weight_decay"] == 0.0
    # the decoder follows the model's schedule: same learning rate in every group (cosine, after warm-up)
    assert groups[2]["lr"] == groups[0]["lr"] < cfg.lr
    assert any(not torch.equal(before[k], v) for k, v in obj.decoder.state_dict().items())  # it was trained


# -- the unlabeled pool balanced by predicted class (ssl.balance_unlabeled=predicted) ------------------------------
def test_balanced_weights_give_every_predicted_class_the_same_share():
    pred = np.array([0] * 90 + [1] * 10)
    w = balanced_weights(pred, 3)  # class 2 is never predicted: the two present classes share the draws
    assert w.sum() == pytest.approx(1.0)
    assert w[pred == 0].sum() == pytest.approx(0.5) and w[pred == 1].sum() == pytest.approx(0.5)
    assert w[0] == pytest.approx(1 / 180) and w[-1] == pytest.approx(1 / 20)
    assert np.allclose(balanced_weights(np.array([2, 2, 2]), 3), 1 / 3)  # one class: uniform


def test_a_pool_of_90_percent_class_a_is_drawn_balanced_under_a_fixed_seed():
    pred = np.array([0] * 900 + [1] * 100)
    w = balanced_weights(pred, 2)
    draw = sample_order(w, 0, 0)
    assert len(draw) == 1000 and np.array_equal(draw, sample_order(w, 0, 0))  # seeded: same draw twice
    assert not np.array_equal(draw, sample_order(w, 0, 1))  # another epoch, another draw
    # in expectation 500 of each (binomial sd 16); under seed (0, 0) exactly 502 minority draws
    assert int((pred[draw] == 1).sum()) == 502
    # a shuffled loader over the same pool gives class B its 10 %; weighted, the minority cells come back repeatedly
    u = torch.as_tensor(pred, dtype=torch.float32)[:, None, None, None]
    loader = TensorLoader(u, None, 100, shuffle=True, seed=3)
    plain = torch.cat([b["image"].flatten() for b in loader])
    assert int(plain.sum()) == 100
    loader.set_weights(w)
    idx = torch.cat([b["idx"] for b in loader]).numpy()
    assert np.array_equal(idx, sample_order(w, 3, 0, 0)) and 450 <= int(pred[idx].sum()) <= 550
    loader.set_weights(None)
    assert np.array_equal(np.sort(torch.cat([b["idx"] for b in loader]).numpy()), np.arange(1000))
    with pytest.raises(TrainingError):
        loader.set_weights(np.ones(5))


@pytest.mark.parametrize("cache", [True, False])
def test_cell_loader_draws_by_weight_and_keeps_idx_as_table_positions(tiny_data, cache, tmp_path):
    """Both loader paths (in-memory cache and file stream): cells of weight 0 never come, ``idx`` names the right
    table row (its pixels are the ones the plain loader gives that row)."""
    unl = unlabeled_table(tiny_data)
    p = tiny_params(tmp_path)
    plain = {int(i): im for b in loader_for(unl, p.data, tiny_data.channels, shuffle=False, seed=0, cache=False)
             for i, im in zip(b["idx"], b["image"], strict=True)}
    loader = loader_for(unl, p.data, tiny_data.channels, shuffle=True, seed=1, cache=cache, batch_size=7)
    w = (np.arange(len(unl)) % 3 == 0).astype(float)
    loader.set_weights(w)
    seen = []
    for batch in loader:
        for i, im in zip(batch["idx"].tolist(), batch["image"], strict=True):
            assert torch.equal(im, plain[i])
            seen.append(i)
    assert len(seen) == len(unl) and all(i % 3 == 0 for i in seen)
    assert len(set(seen)) < len(seen)  # drawn with replacement
    if cache:
        assert seen == sample_order(w, 1, 0).tolist()


class _MeanTeacher(torch.nn.Module):
    """Predicts class 1 for bright cells (mean > 0.5), class 0 otherwise."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1) + self.w


def test_mixed_loader_balances_the_unlabeled_batches_by_the_teachers_predictions():
    g = torch.Generator().manual_seed(0)
    bright = torch.arange(200) < 20  # 10 % bright cells: the teacher's minority class
    u = torch.where(bright[:, None, None, None], 0.9, 0.1) + 0.01 * torch.rand(200, 1, 8, 8, generator=g)
    x, y = torch.rand(16, 1, 8, 8, generator=g), np.arange(16) % 2
    obj = _fixmatch(0.5)
    teacher = _MeanTeacher()
    bal = PredictedClassBalance(obj, _model(), TensorLoader(u, None, 64), len(u))
    mixed = MixedLoader(TensorLoader(x, y, 8, shuffle=True, seed=1), TensorLoader(u, None, 20, shuffle=True, seed=2),
                        10, bal)
    mixed.set_epoch(0)  # no teacher yet: plain shuffling, one pass over the pool
    u_idx = torch.cat([b["u_idx"] for b in mixed])
    assert sorted(u_idx.tolist()) == list(range(200)) and obj.pool_shares is None
    obj.current_teacher = lambda model: teacher  # the teacher now exists
    mixed.set_epoch(1)
    assert bal.counts.tolist() == [180, 20] and obj.pool_shares.tolist() == [0.9, 0.1]
    u_idx = torch.cat([b["u_idx"] for b in mixed])
    assert len(u_idx) == 200 and 80 <= int(bright[u_idx].sum()) <= 120  # about half, not 10 %
    metrics = obj.loss(_model(), {"image": torch.rand(4, 1, 32, 32), "label": torch.arange(4) % 2,
                                  "u_image": torch.rand(8, 1, 32, 32)}, _ctx())[1]
    assert metrics["ssl/pool_pred/0"] == pytest.approx(0.9) and metrics["ssl/pool_pred/1"] == pytest.approx(0.1)


def test_balanced_pool_trains_through_train_member(tiny_data, tmp_path):
    p = tiny_params(tmp_path, **{"train.regime": "semisupervised", "ssl.label_fraction": 0.5, "ssl.threshold": 0.6,
                                 "ssl.balance_unlabeled": "predicted", "train.epochs": 2,
                                 "train.max_steps_per_epoch": 2, "ensemble.members": 1, "train.patience": None})
    logged = []
    *_, res, _ = train_member(0, tiny_data, p, tmp_path, log_metrics=lambda m, e: logged.append(m), progress=False)
    assert res.epochs_run == 2
    assert not any(k.startswith("ssl/pool_pred/") for k in logged[0])  # epoch 0: no teacher yet
    shares = [logged[1][f"ssl/pool_pred/{c}"] for c in tiny_data.classes]
    assert sum(shares) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="balance_unlabeled"):
        train_member(0, tiny_data, tiny_params(tmp_path, **{"train.regime": "semisupervised",
                                                             "ssl.label_fraction": 0.5, "ssl.method": "autoencoder",
                                                             "ssl.balance_unlabeled": "predicted"}),
                     tmp_path / "ae", progress=False)
