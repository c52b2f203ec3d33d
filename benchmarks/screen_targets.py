"""The hit-calling targets on the simulated screen at realistic size, over ``--seeds`` seeds (default 10).

Needs the binned screen of ``dvc repro bins`` (the classifier's own scores of the rendered screen cells). For each
seed it simulates (``serving.screen.sequencing``, sequence params from params.yaml) two replicates of a virtual
screen of ``sequence.virtual_cells`` cells per replicate, once with the planted hits of ``synth`` and once with
``synth.n_hits = 0``, and calls hits with every method: ours on counts (``spatial``), the published SPARCS statistic
(``sparcs``, uncorrected p < 0.05, and ``sparcs_bh`` with BH), MAGeCK's alpha-RRA (``rra``), and the per-cell genotype mode with propagated
uncertainty (``cells_soft``) and with cells thresholded at 0.5 (``cells_threshold``); where MAGeCK is installed
(``make mageck-env``, or ``--mageck PATH``), also MAGeCK itself (``mageck``: ``mageck test`` with its defaults, the
bin samples as treatment, the library samples as control, the NT gRNAs as ``--control-sgrna``; a gene is called at
its positive-selection FDR)::

    .venv/bin/python benchmarks/screen_targets.py [--bins reports/screen/bins] [--seeds 10] [--mageck PATH] [--check]

Targets (ours): recall of planted hits with effect >= 0.5 at FDR 0.1 >= 0.9 and false discovery proportion <= 0.1
(means over seeds); on screens without hits zero genes called in >= 9 of 10 seeds; NT pseudo-gene and null-gene
p-values uniform (KS figures, QQ plot written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("spatial", "sparcs", "sparcs_bh", "rra", "mageck", "cells_soft", "cells_threshold")
DEFAULT_MAGECK = ROOT / ".venv-mageck" / "bin" / "mageck2"
TAIL = (0.05, 0.01, 0.005, 0.001)  # null-gene p-values below each are counted: BH decides in this tail


def call_mageck(exe: Path, counts: pd.DataFrame, sheet: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """Genes as MAGeCK's own ``mageck test`` calls them (positive selection: enriched in the bins)."""
    with tempfile.TemporaryDirectory() as tmp:
        counts.drop(columns="is_control").to_csv(Path(tmp) / "counts.tsv", sep="\t", index=False)
        (Path(tmp) / "controls.txt").write_text("\n".join(counts.loc[counts["is_control"], "sgRNA"]) + "\n")
        bins = ",".join(sheet.loc[sheet["kind"] == "bin", "sample"])
        libs = ",".join(sheet.loc[sheet["kind"] == "library", "sample"])
        proc = subprocess.run([str(exe), "test", "-k", "counts.tsv", "-t", bins, "-c", libs, "-n", "m",
                               "--control-sgrna", "controls.txt"], cwd=tmp, capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        if proc.returncode:
            raise RuntimeError(f"mageck test failed: {proc.stderr[-2000:]}")
        g = pd.read_csv(Path(tmp) / "m.gene_summary.txt", sep="\t")
    return pd.DataFrame({"gene": g["id"], "p_value": g["pos|p-value"], "fdr": g["pos|fdr"],
                         "is_hit": g["pos|fdr"] <= fdr, "is_control": False})


def t_interval(values: list[float]) -> list[float]:
    """95 % t-interval of the mean over seeds."""
    from scipy import stats

    v = np.asarray(values, float)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return [float(v.mean() - half), float(v.mean() + half)]


def run_seed(bins: pd.DataFrame, truth: pd.DataFrame, library: pd.DataFrame, params, seed: int, n_hits: int | None,
             class_name: str, mageck: Path | None = None) -> dict[str, dict]:
    from serving.screen.counts import SampleSheet
    from serving.screen.hits import (
        CellsInput,
        CountsInput,
        HitsResult,
        call_cells,
        call_counts,
        call_rra,
        call_sparcs,
        truth_metrics,
    )
    from serving.screen.sequencing import simulate

    synth = params.synth if n_hits is None else params.synth.model_copy(update={"n_hits": n_hits})
    res = simulate(bins, truth, library, synth, params.sequence.model_copy(update={"seed": seed}), class_name)
    counts = res["counts"].copy()
    counts.insert(2, "is_control", library["is_control"].to_numpy(bool))
    sheet = res["samples"].assign(bin=lambda d: pd.to_numeric(d["bin"]).astype("Int64"),
                                  replicate=lambda d: d["replicate"].astype(str))
    inp = CountsInput(counts, SampleSheet(sheet))
    hc = params.hits
    out = {"spatial": call_counts(inp, hc.fdr, hc.min_library_reads, hc.null_draws, seed, hc.min_nt_cells,
                                  hc.nt_null, hc.gene_null, hc.quiet_sibling_p)}
    sp = call_sparcs(inp, hc.sparcs_p, hc.fdr)
    out["sparcs"] = sp
    bh_genes = sp.genes.assign(is_hit=sp.genes["fdr"] <= hc.fdr)
    out["sparcs_bh"] = type(sp)("sparcs_bh", bh_genes, sp.grnas, {})
    out["rra"] = call_rra(inp, hc.rra_alpha, hc.fdr, hc.null_draws, seed, hc.min_library_reads)
    if mageck is not None:
        out["mageck"] = HitsResult("mageck", call_mageck(mageck, counts, sheet, hc.fdr), pd.DataFrame())
    lib = library.set_index("grna")
    v = res["virtual_cells"].merge(res["virtual_genotypes"], on=["source_file", "cell_id"])
    cells = pd.DataFrame({"grna": v["grna"], "gene": lib.loc[v["grna"], "gene"].to_numpy(),
                          "is_control": lib.loc[v["grna"], "is_control"].to_numpy(bool),
                          "p": v[f"prob_{class_name}"].to_numpy(float),
                          "epistemic": v["epistemic"].to_numpy(float) if "epistemic" in v else 0.0})
    for mode in ("soft", "threshold"):
        out[f"cells_{mode}"] = call_cells(CellsInput(cells), mode, hc.fdr, hc.min_cells, hc.null_draws, seed,
                                          hc.gene_null, hc.quiet_sibling_p)
    genes_truth = res["genes"]
    null_genes = set(genes_truth.loc[genes_truth["role"] == "neutral", "gene"])
    result = {}
    for name, r in out.items():
        g = r.genes
        result[name] = {**truth_metrics(g, genes_truth),
                        "nt_p": g.loc[g["is_control"], "p_value"].dropna().tolist(),
                        "null_p": g.loc[g["gene"].isin(null_genes), "p_value"].dropna().tolist()}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bins", type=Path, default=ROOT / "reports/screen/bins")
    ap.add_argument("--manifest", type=Path, default=ROOT / "data/raw/manifest.csv")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override key=value")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0, help="planted screens use seeds FIRST..FIRST+SEEDS-1, the "
                    "no-hit screens 1000+FIRST...; another FIRST gives screens never looked at")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/screen/targets")
    ap.add_argument("--mageck", default=str(DEFAULT_MAGECK) if DEFAULT_MAGECK.exists() else "",
                    help="a mageck2 / mageck executable (default: .venv-mageck's, when `make mageck-env` built it; "
                         "'' leaves MAGeCK out)")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    args.mageck = Path(args.mageck) if args.mageck else None
    if args.mageck is not None and not args.mageck.is_file():
        ap.error(f"--mageck {args.mageck}: no such executable (`make mageck-env` builds one)")

    from scipy import stats

    from serving.screen.plots import plot_qq
    from training.config import load_params
    from training.io.tables import read_table
    from training.sim.synth import load_library, load_truth

    params = load_params(args.params, args.overrides)
    bins, meta = read_table(args.bins / "bins.parquet")
    class_name = meta.get("class") or params.bins.class_name
    truth, library = load_truth(args.manifest), load_library(args.manifest)
    t0 = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    planted = [run_seed(bins, truth, library, params, s, None, class_name, args.mageck) for s in seeds]
    null = [run_seed(bins, truth, library, params, 1000 + s, 0, class_name, args.mageck) for s in seeds]
    print(f"{args.seeds} seeds x 2 screens ({params.sequence.virtual_cells:,} virtual cells per replicate, "
          f"{params.sequence.replicates} replicates, {len(library)} gRNAs): {time.perf_counter() - t0:.0f} s")
    summary: dict[str, dict] = {}
    header = (f"{'method':<16}{'recall e>=0.5':>14}{'recall e<0.5':>13}{'FDP':>7}{'called':>8}"
              f"{'null: 0 called':>16}{'KS NT pseudo':>14}{'KS null genes':>15}")
    print(header)
    def mean(m: str, key: str, rows: list[dict]) -> float:
        vals = [r[m][key] for r in rows if r[m][key] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    for m in [m for m in METHODS if m in planted[0]]:

        zero = sum(r[m]["n_called"] == 0 for r in null)
        nt_p = np.concatenate([r[m]["nt_p"] for r in null]) if any(r[m]["nt_p"] for r in null) else np.array([])
        null_p = np.concatenate([r[m]["null_p"] for r in null])
        ks_nt = stats.kstest(nt_p, "uniform").statistic if len(nt_p) > 1 else float("nan")
        ks_null = stats.kstest(null_p, "uniform")
        summary[m] = {"recall_effect_ge_0.5": mean(m, "recall_effect_ge_0.5", planted),
                      "recall_effect_lt_0.5": mean(m, "recall_effect_lt_0.5", planted),
                      "fdp": mean(m, "fdp", planted), "fdp_95ci": t_interval([r[m]["fdp"] for r in planted]),
                      "fdp_per_seed": [r[m]["fdp"] for r in planted], "n_called": mean(m, "n_called", planted),
                      "null_seeds_zero_called": zero, "null_seeds": args.seeds,
                      "ks_nt_pseudo_genes": float(ks_nt), "ks_null_genes": float(ks_null.statistic),
                      "ks_null_genes_p": float(ks_null.pvalue), "n_null_p": int(len(null_p)),
                      "null_p_below": {str(t): int((null_p < t).sum()) for t in TAIL}}
        s = summary[m]
        print(f"{m:<16}{s['recall_effect_ge_0.5']:>14.2f}{s['recall_effect_lt_0.5']:>13.2f}{s['fdp']:>7.3f}"
              f"{s['n_called']:>8.1f}{f'{zero}/{args.seeds}':>16}{ks_nt:>14.3f}{ks_null.statistic:>15.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "targets.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_qq({m: np.concatenate([r[m]["null_p"] for r in null]) for m in ("spatial", "sparcs", "cells_soft")},
            args.out / "qq_null.png", f"null genes, screens without hits ({args.seeds} seeds)")
    print("null-gene p-values below " + ", ".join(f"{t:g}" for t in TAIL) + f" (of {summary['spatial']['n_null_p']};"
          " a uniform null expects " + ", ".join(f"{t * summary['spatial']['n_null_p']:.1f}" for t in TAIL) + "):")
    for m in summary:
        print(f"  {m:<16}" + "".join(f"{n:>7}" for n in summary[m]["null_p_below"].values()))
    lo, hi = summary["spatial"]["fdp_95ci"]
    print(f"false discovery proportion of ours (spatial), mean over the {args.seeds} planted screens: "
          f"{summary['spatial']['fdp']:.3f} [{lo:.3f}, {hi:.3f}] (95 % t-interval)")
    ours = summary["spatial"]
    ok = (ours["recall_effect_ge_0.5"] >= 0.9 and ours["fdp"] <= 0.1
          and ours["null_seeds_zero_called"] >= int(np.ceil(0.9 * args.seeds)))
    print(f"targets (spatial): recall >= 0.9, FDP <= 0.1, zero calls in >= 90 % of null seeds: "
          f"{'met' if ok else 'NOT met'}")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
