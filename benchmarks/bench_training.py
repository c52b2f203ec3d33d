"""Training throughput of the one engine, per profile, against a bare PyTorch loop measured in the same run.

For each profile (the CPU default and the GPU profile of params.yaml; the SPARCS VGG baseline at the default input
size for comparison) the script times optimizer steps on in-memory batches of masked cells (zero background, as
the real crops are), so file reading is left out (``bench_data.py`` measures that):

* ``bare``: forward + cross-entropy + backward + AdamW step, nothing else (the baseline);
* ``engine``: ``training.engine.fit`` with the supervised objective and the profile's augmentations, warm-up +
  cosine schedule, gradient clipping and the NaN guard, as ``spatial train`` runs it.

On CUDA it adds the GPU profile in fp32 vs bf16 autocast + channels_last, and the resulting time per epoch of the
GPU profile (``--cells-per-class`` x 2 classes, 85 % in training). Usage::

    .venv/bin/python benchmarks/bench_training.py [--steps 20] [--threads N] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from floors import Floors, add_args

from training.config import Params, load_params
from training.data.augment import Augmenter
from training.engine import SupervisedObjective, fit, select_device
from training.models.factory import build_model

ROOT = Path(__file__).resolve().parent.parent


def masked_cells(n: int, size: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cells: a bright disc of texture on a zero background, labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.35) ** 2).float()
    x = torch.rand(n, channels, size, size, generator=g) * mask
    return x, torch.randint(0, 2, (n,), generator=g)


def bare_loop(p: Params, batches: list[dict], device: torch.device) -> float:
    """Cells/s of forward + loss + backward + AdamW, fp32, no engine."""
    model = build_model(p.model, batches[0]["image"].shape[1], 2).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.train.lr)

    def step(b: dict) -> None:
        loss = F.cross_entropy(model(b["image"].to(device)), b["label"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up (allocator, kernels)
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    _sync(device)
    return sum(len(b["label"]) for b in batches) / (time.perf_counter() - t0)


def engine_loop(p: Params, batches: list[dict], amp: bool) -> float:
    """Cells/s of ``fit`` for one epoch over ``batches`` (no validation; one warm-up step excluded)."""
    model = build_model(p.model, batches[0]["image"].shape[1], 2)
    cfg = p.train.model_copy(update={"epochs": 1, "amp": amp, "patience": None, "warmup_epochs": 0.0})
    objective = SupervisedObjective(2, Augmenter(p.data.augment))
    device = select_device(cfg.device)
    fit(model, batches[:1], None, cfg, objective, 2, progress=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    fit(model, batches, None, cfg, objective, 2, progress=False)
    _sync(device)
    return sum(len(b["label"]) for b in batches) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(p: Params, steps: int, batch_size: int, channels: int) -> list[dict]:
    x, y = masked_cells(steps * batch_size, p.data.image_size, channels, seed=0)
    return [{"image": x[i : i + batch_size], "label": y[i : i + batch_size], "idx": torch.arange(i, i + batch_size)}
            for i in range(0, len(x), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps timed per measurement")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the profile's data.batch_size")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cells-per-class", type=int, default=100_000, help="GPU profile epoch size (per class)")
    add_args(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device("auto")
    base = load_params(ROOT / "params.yaml")
    gpu = load_params(ROOT / "params.yaml", ["profile=gpu"])
    vgg = load_params(ROOT / "params.yaml", ["model.name=sparcs_vgg"])
    channels = max(1, len(base.data.channels))
    on_cpu = device.type == "cpu"
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} steps per figure")
    print(f"{'profile':<28}{'batch':>6}{'bare cells/s':>14}{'engine cells/s':>16}{'engine/bare':>13}")
    rows = [("cpu default (custom 64px)", base), ("sparcs_vgg (64px)", vgg), ("gpu profile (nano 128px)", gpu)]
    results = {}
    floors = Floors(args)
    for name, p in rows:
        bs = args.batch_size or (min(p.data.batch_size, 32) if on_cpu else p.data.batch_size)
        steps = max(2, args.steps // (4 if on_cpu and p is not base else 1))
        batches = make_batches(p, steps, bs, channels)
        bare = bare_loop(p, batches, device)
        eng = engine_loop(p, batches, amp=False)
        results[name] = eng
        print(f"{name:<28}{bs:>6}{bare:>14.1f}{eng:>16.1f}{eng / bare:>12.2f}x")
        floors.ratio(f"engine / bare loop, {name}", eng / bare, 0.5)  # the engine also augments
    train_cells = 2 * args.cells_per_class * 0.85
    if device.type == "cuda":
        batches = make_batches(gpu, args.steps, gpu.data.batch_size, channels)
        fp32 = engine_loop(gpu, batches, amp=False)
        bf16 = engine_loop(gpu, batches, amp=True)
        print(f"GPU profile engine: fp32 {fp32:.0f} cells/s, bf16 + channels_last {bf16:.0f} cells/s "
              f"({bf16 / fp32:.2f}x); one epoch of {train_cells:,.0f} cells: {train_cells / bf16 / 60:.1f} min")
    else:
        print(f"no CUDA device: bf16 + channels_last not measured; the GPU profile on this CPU would take "
              f"{train_cells / results['gpu profile (nano 128px)'] / 3600:.1f} h per epoch of {train_cells:,.0f} cells")
    floors.finish()


if __name__ == "__main__":
    main()
