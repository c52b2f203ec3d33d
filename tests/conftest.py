"""Shared fixtures: a tiny hand-made single-cell dataset (not from the simulator) and a tiny trained ensemble."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from training.config import Params, resolve
from training.io.formats import write_h5sc, write_sparcspy

# `spatial register` saves a new champion into the BentoML model store: never the user's ~/bentoml from tests
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="spatial-tests-bentoml-"))

torch.set_num_threads(2)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

TINY_CLASSES = ("bright", "dim", "spotty")


def make_cells(rng: np.random.Generator, kind: str, n: int, size: int = 32) -> np.ndarray:
    """5-channel cells (2 masks, nucleus, membrane, LC3B) whose LC3B pattern depends on ``kind``."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    cell = (r < size * 0.4).astype(np.float32)
    nuc = (r < size * 0.18).astype(np.float32)
    x = np.zeros((n, 5, size, size), np.float32)
    x[:, 0], x[:, 1] = nuc, cell
    x[:, 2] = nuc * rng.uniform(0.5, 0.9, (n, 1, 1))
    x[:, 3] = ((r > size * 0.35) & (r < size * 0.4)) * rng.uniform(0.3, 0.7, (n, 1, 1))
    level = {"bright": 0.6, "dim": 0.15, "spotty": 0.2}[kind]
    lc3 = cell * rng.uniform(level * 0.7, level * 1.3, (n, 1, 1))
    if kind == "spotty":
        for i in range(n):
            for _ in range(rng.integers(4, 8)):
                cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                lc3[i] += 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    x[:, 4] = np.clip(lc3 + rng.normal(0, 0.03, lc3.shape), 0, 1) * cell
    return x


def write_tiny_dataset(root: Path, n_per_file: int = 60, size: int = 32, seed: int = 0, screen: int = 80) -> Path:
    """Two slides per class (one .h5sc, one SPARCSpy .h5) plus an unlabeled screen slide; returns the manifest."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in TINY_CLASSES:
        for slide, (writer, ext) in enumerate(((write_h5sc, "h5sc"), (write_sparcspy, "h5"))):
            name = f"{kind}_s{slide}.{ext}"
            ids = np.sort(rng.choice(100_000, n_per_file, replace=False)) + 1
            writer(root / name, make_cells(rng, kind, n_per_file, size), ids)
            rows.append({"path": name, "label": kind, "group": f"{kind}_s{slide}", "condition": kind})
    if screen:
        kinds = rng.choice(TINY_CLASSES, screen)
        imgs = np.concatenate([make_cells(rng, k, 1, size) for k in kinds])
        write_h5sc(root / "screen_s0.h5sc", imgs, np.arange(screen) * 7 + 3)
        rows.append({"path": "screen_s0.h5sc", "label": "", "group": "screen_s0", "condition": "screen"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_params(tmp: Path, **overrides: object) -> Params:
    """Params for tests: tiny ConvNeXt at 32x32, few epochs, sqlite MLflow in ``tmp``."""
    base = {
        "split": {"classes": ["bright", "spotty"], "test_fraction": 0.5, "max_per_class": None, "val_fraction": 0.2},
        "data": {"channels": ["LC3B"], "image_size": 32, "batch_size": 16},
        "model": {"dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1]},
        "train": {"epochs": 3, "patience": None},
        "ensemble": {"members": 2},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tests"},
    }
    return resolve(base, {k: v for k, v in overrides.items()})


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: extra threads only add sync overhead (and a shared CI box turns it into spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained 2-member ensemble directory (no MLflow)."""
    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.regimes.ensemble_training import train_ensemble

    out = tmp_path_factory.mktemp("ens")
    params = tiny_params(out)
    table, summary = make_splits(build_index(tiny_manifest, progress=False), params.split)
    data = prepare_data(table, summary["classes"], params)
    train_ensemble(data, params, out / "ensemble", progress=False)
    return out / "ensemble"


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run ``spatial ARGS`` in-process, as the console script does (its error handling included): exit code and
    stderr + stdout."""
    from serving.cli.main import main

    monkeypatch.setattr(sys, "argv", ["spatial", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.err + captured.out
