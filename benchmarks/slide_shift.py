"""Is a screen's novel phenotype missed because a whole slide is unlike the training slides?

For simulated data sets written by ``spatial synth`` (``--screen DIR@SEED`` per data set: its raw files, index and
splits under DIR/raw and DIR/index, written with ``synth.seed`` SEED; without ``@SEED`` the seed of params.yaml):
the simulator's batch effects of each screen slide against those of the slides the training cells came from (the
LC3B camera gain and expression, focus blur, cell size); per screen slide the AUROC of ``pixel_knn`` (no model:
fitted on the data set's own training cells) for the novel cells against the slide's cells in a training state,
with the median score of those ordinary cells; over all screen slides the same AUROC as scored and with each score
scaled by its own slide's cells (every state: median, interquartile range). With ``--model`` also the discovery
queue on each screen against the model's own novelty and against the slide's own non-targeting controls (the
default), both at the default quantile: is the planted gene the top gene of the top cluster. An exploratory
measurement: it decides nothing.

    python benchmarks/slide_shift.py --screen data --screen data/nov11@11 --model models/ensemble \\
        --out reports/uncertainty_study/intel/pixel_mahalanobis/slide_shift.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from discovery_transfer import queue
from pixel_probe import auroc, images
from uncertainty_study import screen_cells

from serving.cli.options import write_json
from serving.model import ServedModel
from training.config import resolve
from training.data.splits import make_splits
from training.data.trainset import prepare_data
from training.io.tables import read_table
from training.sim.synth import MODEL, Slide, plan_files
from training.uncertainty.novelty import make_novelty
from training.uncertainty.pixel_descriptor import pixel_descriptor

LC3B = 2  # the simulator's channel order of the slide gains: nucleus, membrane, LC3B


def data_params(raw: dict, spec: str):
    """The pipeline's parameters pointed at the data set ``DIR[@SEED]`` (DIR/raw, DIR/index; ``synth.seed``)."""
    base, _, seed = spec.partition("@")
    if seed and not seed.isdigit():
        raise SystemExit(f"--screen {spec}: expected DIR or DIR@SEED with SEED a whole number")
    base = Path(base)
    return resolve(raw, {"synth.out": str(base / "raw"), "index.manifest": str(base / "raw/manifest.csv"),
                         "index.out": str(base / "index/cells.parquet"),
                         "split.out": str(base / "index/splits.parquet"),
                         **({"synth.seed": int(seed)} if seed else {})})


def batch_effects(params) -> dict[str, dict[str, float]]:
    """Each slide's batch effects as ``spatial synth`` drew them, by slide (the index's ``group``)."""
    effects = {}
    for spec in plan_files(params.synth):
        s = Slide.draw(np.random.default_rng([params.synth.seed, 1, spec.slide]), MODEL)
        effects[spec.group] = {"lc3b_gain": float(s.gain[LC3B]), "lc3_expression": float(s.lc3),
                               "blur_px": float(s.blur_px), "cell_size": float(s.size)}
    return effects


def per_slide_scaled(score: np.ndarray, slide: np.ndarray) -> np.ndarray:
    """Each score minus the median of its slide's, over their interquartile range: a whole-slide shift removed."""
    out = np.empty_like(score)
    for name in set(slide):
        on = slide == name
        q25, q50, q75 = np.quantile(score[on], [0.25, 0.5, 0.75])
        out[on] = (score[on] - q50) / (q75 - q25 if q75 > q25 else 1.0)
    return out


def per_slide(params) -> dict:
    """Per screen slide: its batch effects, ``pixel_knn``'s AUROC of novel against training-state cells, and the
    median score of those ordinary cells; beside them the training slides' range of each batch effect. Over all
    screen slides: the AUROC of the score as it is, and scaled by each slide's own cells (every state)."""
    index, _ = read_table(params.index.out)
    splits, _ = make_splits(index, params.split)
    data = prepare_data(splits, list(params.split.classes), params)
    screen = screen_cells(index, Path(params.synth.out))
    train = data.split("train")
    model = make_novelty("pixel_knn").fit(pixel_descriptor(images(train, params, data.channels)), train["y"].to_numpy())
    effects = batch_effects(params)
    slide = screen["group"].to_numpy()
    score = model.score(pixel_descriptor(images(screen, params, data.channels)))
    scaled = per_slide_scaled(score, slide)
    is_novel = screen["is_novel"].fillna(False).astype(bool).to_numpy()
    ordinary = screen["state"].isin(["on", "blocked"]).to_numpy() & ~is_novel  # the training classes' states
    trained = [effects[g] for g in sorted(set(train["group"]))]
    out = {"training_slides": {k: [min(t[k] for t in trained), max(t[k] for t in trained)] for k in trained[0]},
           "pixel_knn_all_slides": auroc(score[ordinary], score[is_novel]),
           "pixel_knn_all_slides_scaled_per_slide": auroc(scaled[ordinary], scaled[is_novel]), "screen_slides": {}}
    for name in sorted(set(slide)):
        on = slide == name
        out["screen_slides"][name] = {**effects[name],
                                      "pixel_knn_auroc": auroc(score[on & ordinary], score[on & is_novel]),
                                      "ordinary_median_score": float(np.median(score[on & ordinary]))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--screen", action="append", required=True, help="a data set DIR[@SEED]: DIR/raw, DIR/index")
    ap.add_argument("--model", type=Path, default=None, help="also queue each screen with this ensemble")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    raw = yaml.safe_load(a.params.read_text())
    result = {}
    model = ServedModel.open(a.model) if a.model is not None else None
    with tempfile.TemporaryDirectory(prefix="slide_shift_") as tmp:
        for spec in a.screen:
            params = data_params(raw, spec)
            result[spec] = r = per_slide(params)
            if model is not None:
                r["queue"] = {ref: queue(Path(params.synth.out), f"screen{len(result)}", model, Path(tmp), params, ref,
                                         params.discover.quantile, params.discover.networks if ref == "controls" else 1)
                              for ref in ("model", "controls")}
            print(spec, json.dumps({"pixel_knn_all_slides": round(r["pixel_knn_all_slides"], 3),
                                    "scaled_per_slide": round(r["pixel_knn_all_slides_scaled_per_slide"], 3),
                                    "training_slides": r["training_slides"]}), flush=True)
            for name, s in r["screen_slides"].items():
                print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()), flush=True)
            for ref, q in r.get("queue", {}).items():
                print(f"  queue against {ref}: planted gene on top {q['planted_gene_on_top']} (top {q['top_gene']})")
    if a.out:
        write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
