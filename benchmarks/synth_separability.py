"""Is the simulated screen learnable but not trivial? A small plain-torch CNN on the LC3B channel.

Generates the simulated screen (``training.sim.synth``, default parameters unless ``--set`` is given),
trains on slides 1-2 of each control condition and tests on slide 3 (slide-wise split), for

* 4 classes: stimulated, unstimulated, atg5_ko, ei24_ko (the timecourse is left out: its 0 h cells
  are unstimulated and its 14 h cells stimulated, so as one class it is ambiguous by design; the
  4-class model's P(stimulated) per timepoint is reported instead), and
* 2 classes: stimulated vs atg5_ko (the thesis' "autophagy off" classifier).

It also reports the 4-class model's confidence on screen cells (non-targeting, strongest hit KO,
novel-phenotype KO). With default parameters the montage is copied to
``benchmarks/figures/synth_montage.png``.

    .venv/bin/python benchmarks/synth_separability.py [--set synth.image_size=128 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from training.config import resolve
from training.io.formats import CellFile
from training.sim.synth import load_truth, synthesize

FIGURE = Path(__file__).parent / "figures" / "synth_montage.png"
FOUR = ["stimulated", "unstimulated", "atg5_ko", "ei24_ko"]


def read_lc3(manifest: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """All cells' LC3B channel with their file's manifest row and cell id (read once, small data)."""
    table = pd.read_csv(manifest, keep_default_na=False)
    rows, images = [], []
    for _, entry in table.iterrows():
        with CellFile(manifest.parent / entry["path"]) as f:
            images.append(f.read(0, f.n_cells, f.resolve_channels(["LC3B"]))[:, 0])
            ids = f.cell_ids()
        rows.append(pd.DataFrame({"path": entry["path"], "cell_id": ids, "condition": entry["condition"],
                                  "replicate": int(entry["replicate"])}))
    return pd.concat(rows, ignore_index=True), np.concatenate(images)


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(c_in, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations (cells have no orientation)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if bool(torch.randint(0, 2, (1,), generator=gen)) else x


def train(x: np.ndarray, y: np.ndarray, n_classes: int, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = epochs * int(np.ceil(len(x) / 128))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x[:, None]), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            loss = nn.functional.cross_entropy(model(augment(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(x[:, None])
    return torch.cat([model(xt[i:i + 512]).softmax(1) for i in range(0, len(xt), 512)]).numpy()


def report(name: str, classes: list[str], y: np.ndarray, prob: np.ndarray) -> float:
    pred = prob.argmax(1)
    acc = float((pred == y).mean())
    print(f"\n{name}: test accuracy {acc:.3f} (n={len(y)})")
    for k, c in enumerate(classes):
        m = y == k
        print(f"  {c:13s} {float((pred[m] == k).mean()):.3f}  (n={int(m.sum())})")
    confusion = pd.crosstab(pd.Series([classes[i] for i in y], name="true"),
                            pd.Series([classes[i] for i in pred], name="predicted"))
    print(confusion.reindex(index=classes, columns=classes, fill_value=0).to_string())
    return acc


def run(classes: list[str], cells: pd.DataFrame, images: np.ndarray, epochs: int, seed: int) -> tuple[nn.Module, float]:
    sel = cells["condition"].isin(classes).to_numpy()
    y = cells.loc[sel, "condition"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    test = (cells.loc[sel, "replicate"] == cells.loc[sel, "replicate"].max()).to_numpy()
    x = images[sel]
    t0 = time.perf_counter()
    model = train(x[~test], y[~test], len(classes), epochs, seed)
    print(f"\ntrained {len(classes)}-class CNN on {int((~test).sum())} cells in {time.perf_counter() - t0:.1f} s")
    acc = report(f"{len(classes)} classes, held-out slide", classes, y[test], predict(model, x[test]))
    return model, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="synth override, e.g. synth.image_size=32")
    parser.add_argument("--out", default=None, help="where to write the screen (default: a temporary directory)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = resolve({}, args.set).synth
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "raw"
        t0 = time.perf_counter()
        manifest = synthesize(cfg, out, progress=False)
        print(f"synthesized in {time.perf_counter() - t0:.1f} s ({cfg.image_size} px, {cfg.workers} workers) -> {out}")
        if not args.set:
            FIGURE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.parent / "montage.png", FIGURE)
            print(f"montage copied to {os.path.relpath(FIGURE)}")
        cells, images = read_lc3(manifest)
        truth = load_truth(manifest).set_index(["path", "cell_id"])
        cells = cells.join(truth[["state", "gene", "knockout", "is_novel", "timepoint"]], on=["path", "cell_id"])

        model, _ = run(FOUR, cells, images, args.epochs, args.seed)
        run(["stimulated", "atg5_ko"], cells, images, args.epochs, args.seed)

        tc = cells["condition"] == "timecourse"
        if tc.any():
            p = predict(model, images[tc.to_numpy()])
            frame = pd.DataFrame({"timepoint": cells.loc[tc, "timepoint"].to_numpy(), "p_stim": p[:, 0],
                                  "pred": np.array(FOUR)[p.argmax(1)]})
            print("\ntimecourse under the 4-class model: mean P(stimulated), share predicted stimulated")
            for t, g in frame.groupby("timepoint"):
                print(f"  {t:5g} h  {g['p_stim'].mean():.3f}  {float((g['pred'] == 'stimulated').mean()):.3f}")
        scr = cells["condition"] == "screen"
        if scr.any():
            genes = pd.read_csv(manifest.parent / "truth_genes.csv", keep_default_na=False)
            strongest = genes[genes["role"] == "hit"].sort_values("effect").tail(1)["gene"].tolist()
            p = predict(model, images[scr.to_numpy()])
            s = cells[scr].assign(conf=p.max(1), pred=np.array(FOUR)[p.argmax(1)])
            groups = {
                "non-targeting": s["gene"] == "non-targeting",
                "strongest hit KO": s["gene"].isin(strongest) & s["knockout"],
                "novel KO": s["is_novel"],
            }
            print("\nscreen cells under the 4-class model: n, mean max-softmax, predicted classes")
            for name, m in groups.items():
                g = s[m]
                if len(g):
                    shares = g["pred"].value_counts(normalize=True).round(2).to_dict()
                    print(f"  {name:17s} n={len(g):5d}  conf {g['conf'].mean():.3f}  {shares}")


if __name__ == "__main__":
    main()
