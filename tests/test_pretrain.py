"""Contrastive pretraining: the NT-Xent loss on hand-made views, the cells it may see, and pretrain -> fine-tune."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params
from typer.testing import CliRunner

from serving.cli.main import app
from training.data.cellindex import build_index
from training.data.splits import make_splits
from training.data.trainset import keep_label_fraction, prepare_data
from training.errors import TrainingError
from training.models.factory import build_model
from training.regimes.contrastive import (
    ENCODER,
    SUMMARY,
    linear_probe,
    nt_xent,
    pretrain_encoder,
    pretraining_cells,
    probe_loaders,
)


def test_nt_xent_on_orthogonal_views_matches_the_hand_computed_loss():
    # two cells, both views identical, the cells orthogonal: each view's partner has cosine 1, the two others 0
    z = torch.eye(2, 3)
    loss, hit = nt_xent(z, z.clone(), temperature=0.5)
    assert loss.item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + 2)), rel=1e-6)
    assert hit.tolist() == [True] * 4
    # swap the partners: every view now is most similar to a non-partner and the loss is higher
    loss_swapped, hit_swapped = nt_xent(z, z.flip(0), temperature=0.5)
    assert hit_swapped.tolist() == [False] * 4
    assert loss_swapped.item() == pytest.approx(-math.log(1 / (math.e**2 + 2)), rel=1e-6)


def test_nt_xent_needs_two_matching_views():
    with pytest.raises(TrainingError, match="two"):
        nt_xent(torch.zeros(4, 3), torch.zeros(5, 3), 0.2)
    with pytest.raises(TrainingError, match="B >= 2"):
        nt_xent(torch.zeros(1, 3), torch.zeros(1, 3), 0.2)


@pytest.fixture(scope="module")
def tiny_data(tiny_manifest, tmp_path_factory):
    params = tiny_params(tmp_path_factory.mktemp("pre"))
    table, summary = make_splits(build_index(tiny_manifest, progress=False), params.split)
    return prepare_data(table, summary["classes"], params)


def test_pretraining_cells_are_train_and_unlabeled_only_without_labels(tiny_data):
    cells = pretraining_cells(tiny_data, None, seed=0)
    assert set(cells["split"]) == {"train", "unlabeled"}
    assert (cells["y"] == -1).all()
    expected = tiny_data.cells["split"].isin(["train", "unlabeled"]).sum()
    assert len(cells) == expected
    few = pretraining_cells(tiny_data, 50, seed=0)
    assert len(few) == 50 and few["cell_id"].tolist() == pretraining_cells(tiny_data, 50, seed=0)["cell_id"].tolist()
    assert few["cell_id"].tolist() != pretraining_cells(tiny_data, 50, seed=1)["cell_id"].tolist()


def test_pretrain_then_fine_tune_from_the_encoder(tiny_data, tmp_path, one_thread):
    params = tiny_params(tmp_path, pretrain={"epochs": 4, "batch_size": 32, "max_cells": None})
    summary = pretrain_encoder(tiny_data, params, tmp_path / "pre", progress=False)
    losses = [h["train_loss"] for h in summary["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert summary["cells"] == len(pretraining_cells(tiny_data, None, 0))
    assert json.loads((tmp_path / "pre" / SUMMARY).read_text())["final_loss"] == pytest.approx(losses[-1])
    # the encoder is what fine-tuning starts from: model.pretrained loads it tensor for tensor
    saved = torch.load(tmp_path / "pre" / ENCODER, map_location="cpu")["state_dict"]
    tuned_cfg = params.model.model_copy(update={"pretrained": str(tmp_path / "pre" / ENCODER)})
    model = build_model(tuned_cfg, len(tiny_data.channels), len(tiny_data.classes))
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    torch.manual_seed(params.train.seed)
    fresh = build_model(params.model, len(tiny_data.channels), len(tiny_data.classes))
    assert not torch.equal(fresh.stages[0].blocks[0].conv_dw.weight, model.stages[0].blocks[0].conv_dw.weight)
    # the two probes in the summary are of the saved encoder and of the random init it started from
    probes = probe_loaders(tiny_data, params)
    assert summary["probe_val_balanced_accuracy"] == linear_probe(model, probes, torch.device("cpu"))
    assert summary["probe_val_balanced_accuracy_random_init"] == linear_probe(fresh, probes, torch.device("cpu"))
    with torch.no_grad():  # a model with constant features: the probe can only call one class for every cell
        for weight in fresh.parameters():
            weight.zero_()
    assert linear_probe(fresh, probes, torch.device("cpu")) == pytest.approx(1 / len(tiny_data.classes))
    # the same seed gives the same encoder, bit for bit, and the same file, byte for byte (DVC's hash of it holds)
    again = pretrain_encoder(tiny_data, params, tmp_path / "again", progress=False)
    assert again["history"] == summary["history"]
    assert all(torch.equal(v, torch.load(tmp_path / "again" / ENCODER)["state_dict"][k]) for k, v in saved.items())
    assert (tmp_path / "again" / ENCODER).read_bytes() == (tmp_path / "pre" / ENCODER).read_bytes()


def test_pretraining_never_sees_validation_or_test_pixels(tiny_data, tmp_path, monkeypatch, one_thread):
    import training.regimes.contrastive as contrastive

    seen = []
    real = contrastive.loader_for

    def spy(table, *args, **kwargs):
        if kwargs.get("shuffle"):
            seen.append(set(table["split"]))
        return real(table, *args, **kwargs)

    monkeypatch.setattr(contrastive, "loader_for", spy)
    params = tiny_params(tmp_path, pretrain={"epochs": 1, "batch_size": 32, "max_cells": None})
    pretrain_encoder(tiny_data, params, tmp_path / "pre", progress=False)
    assert seen == [{"train", "unlabeled"}]
    hidden = keep_label_fraction(tiny_data, 0.5, 0)
    assert set(pretraining_cells(hidden, None, 0)["cell_id"]) == set(pretraining_cells(tiny_data, None, 0)["cell_id"])


def test_cli_pretrain_writes_the_encoder_and_train_starts_from_it(tiny_manifest, tmp_path, one_thread):
    params = {
        "split": {"classes": ["bright", "spotty"], "test_fraction": 0.5, "max_per_class": None},
        "data": {"channels": ["LC3B"], "image_size": 32, "batch_size": 16},
        "model": {"dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1]},
        "train": {"epochs": 1}, "ensemble": {"members": 1},
        "pretrain": {"epochs": 1, "batch_size": 32},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "pre"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    res = runner.invoke(app, ["pretrain", "--params", str(tmp_path / "params.yaml"), "--manifest", str(tiny_manifest),
                              "--out", str(tmp_path / "pre"), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "linear probe" in res.output and (tmp_path / "pre" / ENCODER).is_file()
    res = runner.invoke(app, ["train", "--params", str(tmp_path / "params.yaml"), "--manifest", str(tiny_manifest),
                              "--set", f"model.pretrained={tmp_path / 'pre' / ENCODER}", "--out", str(tmp_path / "ens"),
                              "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "ens" / "spec.json").read_text())
    assert spec["model"]["pretrained"] == str(tmp_path / "pre" / ENCODER)
    # too few cells for a batch: one line naming the setting, exit 2, nothing written
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "pretrain", "--params", str(tmp_path / "params.yaml"),
                           "--manifest", str(tiny_manifest), "--set", "pretrain.batch_size=100000",
                           "--out", str(tmp_path / "none")], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"})
    assert proc.returncode == 2 and "pretrain.batch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "none" / ENCODER).exists()
    assert np.isfinite(json.loads((tmp_path / "pre" / SUMMARY).read_text())["final_loss"])


def test_active_learning_cold_start_embeds_with_the_pretrained_encoder(tmp_path):
    from training.active.campaign import TensorLoader, cold_start_embeddings
    from training.engine import predict

    params = tiny_params(tmp_path)
    images = torch.rand(40, 1, 32, 32)
    torch.manual_seed(123)
    encoder = build_model(params.model, 1, 3)
    torch.save({"state_dict": encoder.state_dict()}, tmp_path / ENCODER)
    with_encoder = params.model_copy(update={"model": params.model.model_copy(
        update={"pretrained": str(tmp_path / ENCODER)})})
    feats = predict(encoder, TensorLoader(images, None, 16), with_features=True)["features"]
    expected = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    np.testing.assert_allclose(cold_start_embeddings(images, with_encoder, seed=0), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(cold_start_embeddings(images, params, seed=0), expected, atol=1e-3)


def test_novelty_on_the_encoders_features_averaged_over_them(tiny_data, tmp_path, one_thread):
    from training.data.loader import loader_for
    from training.engine import predict
    from training.regimes.ensemble_training import member_seed, refit_novelty, train_ensemble
    from training.uncertainty.ensemble import Ensemble
    from training.uncertainty.novelty import KNNNovelty

    files = []
    for seed in (0, 1):  # two encoders from two pretraining seeds
        p = tiny_params(tmp_path, pretrain={"epochs": 2, "batch_size": 32, "max_cells": None}, train={"seed": seed})
        pretrain_encoder(tiny_data, p, tmp_path / f"pre{seed}", progress=False)
        files.append(str(tmp_path / f"pre{seed}" / ENCODER))
    params = tiny_params(tmp_path, ensemble={"members": 1}, train={"epochs": 1, "patience": None},
                         uncertainty={"novelty": "knn", "encoders": files})
    train_ensemble(tiny_data, params, tmp_path / "ens", progress=False)
    ens = Ensemble.load(tmp_path / "ens")
    assert ens.spec.n_encoders == 2 and len(ens.novelty) == 2 and len(ens.members) == 1
    assert (tmp_path / "ens" / "encoder_1.pt").is_file()
    test = loader_for(tiny_data.split("test"), params.data, tiny_data.channels, shuffle=False, seed=0)
    got = ens.predict_batches(test)["novelty"]
    # by hand: each encoder's kNN distance, its bank the training cells' features, then the mean over encoders
    train = loader_for(tiny_data.split("train"), params.data, tiny_data.channels, shuffle=False, seed=0)
    expected = []
    for j, f in enumerate(files):
        enc = build_model(params.model.model_copy(update={"pretrained": f}), len(tiny_data.channels),
                          len(tiny_data.classes))
        knn = KNNNovelty(params.uncertainty.knn_k, params.uncertainty.knn_bank, member_seed(params, j))
        knn.fit(predict(enc, train)["features"])
        expected.append(knn.score(predict(enc, test)["features"]))
    assert not np.allclose(expected[0], expected[1])
    np.testing.assert_allclose(got, np.mean(expected, axis=0), rtol=1e-5)
    # refitting without encoders switches back to the members' own features (and drops the encoders)
    members_only = params.model_copy(update={"uncertainty": params.uncertainty.model_copy(update={"encoders": []})})
    back = refit_novelty(ens, tiny_data, members_only)
    back.save(tmp_path / "back")
    back = Ensemble.load(tmp_path / "back")
    assert back.spec.n_encoders == 0 and not (tmp_path / "back" / "encoder_0.pt").exists()
    assert not np.allclose(back.predict_batches(test)["novelty"], got)


def test_encoder_settings_fail_with_a_clear_error(tiny_data, tmp_path):
    from training.errors import ConfigError, ModelError
    from training.regimes.ensemble_training import load_encoders

    with pytest.raises(ConfigError, match="uncertainty.encoders needs uncertainty.novelty knn or multistage_knn"):
        tiny_params(tmp_path, uncertainty={"novelty": "energy", "encoders": ["e.pt"]})
    params = tiny_params(tmp_path, uncertainty={"novelty": "knn", "encoders": [str(tmp_path / "missing.pt")]})
    with pytest.raises(ModelError, match="uncertainty.encoders: encoder file .*missing.pt not found"):
        load_encoders(params, tiny_data)
    # an encoder of another architecture: the setting and what does not fit
    other = build_model(params.model.model_copy(update={"dims": [16, 16, 16, 32]}), len(tiny_data.channels), 2)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.pt")
    params = tiny_params(tmp_path, uncertainty={"novelty": "knn", "encoders": [str(tmp_path / "other.pt")]})
    with pytest.raises(ModelError, match=r"^uncertainty.encoders: .*other.pt: checkpoint does not fit model"):
        load_encoders(params, tiny_data)


def test_an_ensemble_fine_tuned_from_an_encoder_loads_without_the_encoder_file(tiny_data, tmp_path, one_thread):
    from training.regimes.ensemble_training import train_ensemble
    from training.uncertainty.ensemble import Ensemble

    params = tiny_params(tmp_path, pretrain={"epochs": 1, "batch_size": 32, "max_cells": None})
    pretrain_encoder(tiny_data, params, tmp_path / "pre", progress=False)
    tuned = tiny_params(tmp_path, ensemble={"members": 1}, train={"epochs": 1, "patience": None})
    tuned = tuned.model_copy(update={"model": tuned.model.model_copy(update={"pretrained": str(tmp_path / "pre" / ENCODER)})})
    trained = train_ensemble(tiny_data, tuned, tmp_path / "ens", progress=False)
    (tmp_path / "pre" / ENCODER).unlink()  # the artifact is scored elsewhere, without the pretraining files
    loaded = Ensemble.load(tmp_path / "ens")
    for a, b in zip(trained.members[0].state_dict().values(), loaded.members[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the discovery queue's feature networks stay random: the same as from a spec without the checkpoint
    from serving.discovery.controls import random_filter_network

    plain = loaded.spec.model | {"pretrained": None}
    spec_plain = type(loaded.spec)(**{**loaded.spec.__dict__, "model": plain})
    for a, b in zip(random_filter_network(loaded.spec, 3).state_dict().values(),
                    random_filter_network(spec_plain, 3).state_dict().values(), strict=True):
        assert torch.equal(a, b)
