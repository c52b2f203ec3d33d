"""Scoring on a GPU: bf16 autocast against fp32 on the same cells, and cells/s against the CPU of the same machine.

The one inference path (``training.engine.forward``, which ``Ensemble.raw_outputs`` calls) runs bf16 autocast +
channels_last whenever the input is on CUDA. This script loads a trained ensemble, reads real cells from the files
given (the test slides of the simulated screen by default) and measures:

* agreement: the members' logits with ``amp=True`` (bf16) and ``amp=False`` (fp32) on the GPU, turned into the
  ensemble's calibrated probabilities (``Ensemble.combine``): largest absolute difference of a probability, share
  of cells whose predicted class changes, and the test balanced accuracy of both (labels from the file names);
* throughput of ``Ensemble.predict_images`` (probabilities, uncertainty and the novelty score of every cell) on
  the GPU against the machine's CPU (all its cores), the same cells repeated to ``--cells``.

With ``--pretrain SPLITS`` it also runs `spatial pretrain`'s SimCLR pretraining (``pretrain.*``; the contrastive
loss under bf16 autocast on CUDA) on the four control classes of that split table, on the GPU in bf16 and fp32 and
on the CPU: seconds, cells/s, final loss and pair accuracy, and the encoder's linear probe.

With ``--train`` it also trains the default recipe (``params.yaml``, ``train.seed`` 0, every member) three times on the
split of ``data/index/splits.parquet``: on the GPU with bf16 autocast (what ``train.amp`` does there), on the GPU in
fp32, and on this machine's CPU; each ensemble is calibrated as served (pooled temperature) and measured on the test
cells: balanced accuracy, ECE and NLL with the seconds it took.

Floors (``--check``): bf16 changes no probability by more than 0.02 and the predicted class of at most 0.5 % of the
cells; the GPU scores at least 5x the cells/s of the CPU; with ``--pretrain`` the bf16 encoder's linear probe is at
least 0.95x the fp32 encoder's. Without CUDA it says so and exits 0 (nothing to check).

    python benchmarks/bench_gpu.py --model models/ensemble --check \\
        data/raw/controls/atg5_ko_s2.h5 data/raw/controls/stimulated_s3.h5sc
    python benchmarks/bench_gpu.py --no-scoring --pretrain models/ssl_pretrain_s0.splits.parquet --device cpu  # CPU arm
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from floors import Floors, add_args

from training.config import load_params
from training.data.loader import loader_for
from training.data.trainset import prepare_data
from training.engine import forward, predict
from training.evaluation.metrics import balanced_accuracy, calibration_report
from training.io.formats import CellFile
from training.io.tables import read_table
from training.regimes.contrastive import pretrain_encoder
from training.regimes.ensemble_training import train_member
from training.uncertainty.calibration import fit_pooled_temperature, pooled_log_probs
from training.uncertainty.decompose import softmax
from training.uncertainty.ensemble import Ensemble

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = [ROOT / "data/raw/controls/atg5_ko_s2.h5", ROOT / "data/raw/controls/stimulated_s3.h5sc"]


def read_cells(paths: list[Path], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every cell's full stack of each file and its class index (the class named at the start of the file name)."""
    images, labels = [], []
    for p in paths:
        label = next((k for k, c in enumerate(classes) if p.name.startswith(c)), -1)
        f = CellFile(p)
        try:
            x = f.read(0, f.n_cells)
        finally:
            f.close()
        images.append(x)
        labels.append(np.full(len(x), label))
    return np.concatenate(images), np.concatenate(labels)


def member_logits(ens: Ensemble, x: torch.Tensor, amp: bool, batch: int) -> np.ndarray:
    """(N, M, 1, K) logits of every member, bf16 autocast or fp32."""
    out = []
    for s in range(0, len(x), batch):
        xb = x[s : s + batch].to(ens.device)
        out.append(np.stack([forward(m, xb, with_features=False, amp=amp)[0].cpu().numpy() for m in ens.members],
                            axis=1)[:, :, None])
    return np.concatenate(out)


def cells_per_second(ens: Ensemble, images: np.ndarray, batch: int, repeats: int = 2) -> float:
    ens.predict_images(images[:batch], batch_size=batch)  # warm-up: kernels, allocator
    best = float("inf")
    for _ in range(repeats):
        if ens.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ens.predict_images(images, batch_size=batch)
        if ens.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def train_arm(splits: Path, overrides: list[str], workdir: Path) -> dict:
    """Train the default-recipe ensemble with ``overrides``; its pooled-calibrated test metrics and seconds."""
    params = load_params(ROOT / "params.yaml", ["uncertainty.novelty=none", *overrides])
    classes = list(params.split.classes)
    cells, _ = read_table(splits)
    cells = cells[cells["split"].isin(["train", "val", "test"]) & cells["label"].isin(classes)].reset_index(drop=True)
    data = prepare_data(cells, classes, params)
    t0 = time.perf_counter()
    members, val_logits, val_y = [], [], None
    for k in range(params.ensemble.members):
        model, _, _, _, (vl, val_y) = train_member(k, data, params, workdir, progress=False)
        members.append(model)
        val_logits.append(vl)
    seconds = time.perf_counter() - t0
    test = data.split("test")
    loader = loader_for(test, params.data, data.channels, shuffle=False, seed=0, cache=False, batch_size=256)
    logits = np.stack([predict(m, loader, device="cpu", with_features=False, amp=False)["logits"] for m in members],
                      axis=1)
    t = fit_pooled_temperature(np.stack(val_logits, axis=1), val_y)
    probs = softmax(pooled_log_probs(logits) / t)
    y = test["y"].to_numpy()
    cal = calibration_report(probs, y, 15)
    return {"balanced_accuracy": float(balanced_accuracy(y, probs.argmax(1))), "ece": cal["ece"], "nll": cal["nll"],
            "pooled_temperature": float(t), "train_seconds": seconds}


def pretrain_arm(splits: Path, overrides: list[str], workdir: Path) -> dict:
    """`spatial pretrain`'s SimCLR run on the four control classes of ``splits`` with ``overrides``: its seconds (all,
    the probes included; and per epoch after the first, the steady rate), final loss and pair accuracy, and the
    linear probe of the encoder (validation balanced accuracy)."""
    classes = ["stimulated", "unstimulated", "atg5_ko", "ei24_ko"]
    params = load_params(ROOT / "params.yaml", [f"split.classes=[{','.join(classes)}]", *overrides])
    cells, _ = read_table(splits)
    cells = cells[cells["split"].isin(["train", "val"]) & cells["label"].isin(classes)].reset_index(drop=True)
    data = prepare_data(cells, classes, params)
    epoch_ends: list[float] = []
    t0 = time.perf_counter()
    summary = pretrain_encoder(data, params, workdir, progress=False,
                               log_metrics=lambda metrics, epoch: epoch_ends.append(time.perf_counter()))
    seconds = time.perf_counter() - t0
    steady = (epoch_ends[-1] - epoch_ends[0]) / (len(epoch_ends) - 1) if len(epoch_ends) > 1 else float("nan")
    return {"seconds": seconds, "cells": summary["cells"], "epochs": summary["epochs"],
            "seconds_per_epoch_after_the_first": steady, "cells_per_s": summary["cells"] / steady,
            "final_loss": summary["final_loss"],
            "final_pair_accuracy": summary["final_pair_accuracy"],
            "probe_val_balanced_accuracy": summary["probe_val_balanced_accuracy"],
            "probe_random_init": summary["probe_val_balanced_accuracy_random_init"]}


def scoring_figures(a: argparse.Namespace) -> dict:
    """bf16 against fp32 scoring of the files' cells by the ensemble, and GPU against CPU cells per second."""
    gpu = Ensemble.load(a.model, device=a.device)
    images, y = read_cells(a.files, list(gpu.spec.classes))
    x = gpu.preprocess(gpu.select_channels(images))
    bf16 = gpu.combine(member_logits(gpu, x, True, a.batch_size))["mean_probs"]
    fp32 = gpu.combine(member_logits(gpu, x, False, a.batch_size))["mean_probs"]
    keep = y >= 0
    res = {
        "cells_compared": int(len(x)),
        "max_abs_prob_diff": float(np.abs(bf16 - fp32).max()),
        "mean_abs_prob_diff": float(np.abs(bf16 - fp32).mean()),
        "argmax_changed": float((bf16.argmax(1) != fp32.argmax(1)).mean()),
        "balanced_accuracy_bf16": float(balanced_accuracy(y[keep], bf16[keep].argmax(1))),
        "balanced_accuracy_fp32": float(balanced_accuracy(y[keep], fp32[keep].argmax(1))),
    }
    reps = int(np.ceil(a.cells / len(images)))
    many = np.concatenate([images] * reps)[: a.cells]
    res["gpu_cells_per_s"] = cells_per_second(gpu, many, a.batch_size)
    cpu = Ensemble.load(a.model, device="cpu")
    res["cpu_threads"] = torch.get_num_threads()
    res["cpu_cells_per_s"] = cells_per_second(cpu, many[: a.cpu_cells], min(a.batch_size, 256), repeats=1)
    res["gpu_over_cpu"] = res["gpu_cells_per_s"] / res["cpu_cells_per_s"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=DEFAULT_FILES)
    ap.add_argument("--model", type=Path, default=ROOT / "models/ensemble")
    ap.add_argument("--cells", type=int, default=65_536, help="cells scored per throughput figure")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--cpu-cells", type=int, default=8192, help="cells of the CPU throughput figure")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run of the script)")
    ap.add_argument("--train", action="store_true", help="also train the default ensemble: GPU bf16, GPU fp32, CPU")
    ap.add_argument("--splits", type=Path, default=ROOT / "data/index/splits.parquet")
    ap.add_argument("--pretrain", type=Path, default=None, metavar="SPLITS",
                    help="also run SimCLR pretraining (params.yaml pretrain.*) on the four control classes of this "
                         "split table (their train and val files are enough): GPU bf16, GPU fp32, CPU")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for the training arms (pretrain.epochs=5)")
    ap.add_argument("--no-scoring", action="store_true", help="skip the scoring figures (no ensemble or files needed)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    add_args(ap)
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (bf16 autocast is used on CUDA only)")
        return 0
    floors = Floors(a)
    res = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__}
    if not a.no_scoring:
        res.update(scoring_figures(a))
    arms = (("gpu_bf16", ["train.amp=true"]), ("gpu_fp32", ["train.amp=false"]), ("cpu_fp32", ["train.device=cpu"]))
    for what, run, splits in (("train", train_arm, a.splits if a.train else None), ("pretrain", pretrain_arm, a.pretrain)):
        if splits is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for name, overrides in arms:
                if name.startswith("gpu") and a.device != "cuda":
                    continue
                res[f"{what}_{name}"] = run(splits, [*overrides, *a.set], Path(tmp) / name)
                print(what, name, json.dumps(res[f"{what}_{name}"]), flush=True)
    print(json.dumps(res, indent=2))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    if not a.no_scoring:
        floors.ratio("bf16: at most 0.02 off any fp32 probability (1 - max diff)", 1 - res["max_abs_prob_diff"], 0.98)
        floors.ratio("bf16: predicted class unchanged (share of cells)", 1 - res["argmax_changed"], 0.995)
        floors.ratio("GPU / CPU cells per second", res["gpu_over_cpu"], 5.0)
    if "pretrain_gpu_bf16" in res:
        floors.ratio("bf16 pretraining: linear probe / fp32's", res["pretrain_gpu_bf16"]["probe_val_balanced_accuracy"]
                     / res["pretrain_gpu_fp32"]["probe_val_balanced_accuracy"], 0.95)
    floors.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
