"""Hit calling at genome scale: is the FDR honest, and how many cells does a screen need?

``screen_targets.py`` measures the hit calls on the simulated screen's 60 genes. A genome-wide SPARCS screen tests
about 20,000 genes, where Benjamini-Hochberg decides at p-values near 1e-5 and the far tail of the null is what
matters. This script builds such screens with ``bench_hits.write_screen`` (by default 80,000 gRNAs: 19,750 genes
of 4 gRNAs and 1,000 non-targeting, ``--genes`` and ``--nt-grnas`` for another library; 1.4 % of the cells in six
bins, as in the larger SPARCS screen; cutting, PCR and background reads of the simulator), once with planted genes
(for each of ``--folds`` a ``--share`` of the genes, 0.5 % by default, their bin rate multiplied by it) and once with
none, at each of ``--cells`` (cells per replicate, 2 replicates), and calls hits with every
method: ours (``spatial``; ``spatial_nt`` with ``hits.gene_null=nt``, the NT pseudo-genes alone; ``spatial_quiet``
with ``nt_and_quiet_screen``, the screen's gRNAs without those of genes whose other gRNAs stand out;
``spatial_quiet25`` the same with ``hits.quiet_sibling_p`` 0.25; ``spatial_quiet_only`` with ``quiet_screen``, that
screen null alone), the published
SPARCS statistic (``sparcs``: uncorrected p < 0.05; ``sparcs_bh``: with BH), our alpha-RRA (``rra``) and, where it
is installed, MAGeCK itself (``mageck``, as in ``screen_targets.py``)::

    .venv/bin/python benchmarks/genome_scale_hits.py [--cells 2000000 5000000 17000000] [--seeds 10]
        [--null-seeds N] [--first-seed 0] [--methods spatial ...] [--genes 19750 --nt-grnas 1000 --share 0.005]
        [--check]

Per coverage and method it writes to ``--out`` (``genome_scale.json``): the false discovery proportion of the
planted screens (mean, 95 % t-interval, per seed), recall per planted fold, the screens without hits on which
nothing was called, and the null genes' p-values below 1e-2 ... 1e-5 pooled over the screens without hits, with a
uniform null's expectation and its Poisson 95 % interval; ``power.png`` draws recall and FDP against cells per gene.
``--check`` exits 1 unless ours keeps the FDR (mean FDP <= the level, or its interval includes it) and calls nothing
on at least 90 % of the screens without hits, at every coverage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TAIL = (1e-2, 1e-3, 1e-4, 1e-5)
METHODS = ("spatial", "spatial_nt", "spatial_quiet", "spatial_quiet25", "spatial_quiet_only", "sparcs", "sparcs_bh",
           "rra", "mageck")
GENES, N_NT = 19_750, 1_000  # the genome-scale library: 80,000 gRNAs, 4 per gene


def cells_per_gene(cells_per_replicate: int, genes: int = GENES) -> float:
    """Imaged cells per targeting gene over the 2 replicates."""
    return cells_per_replicate * 2 / genes


def call_all(screen, fdr: float, seed: int, mageck: Path | None, methods: set[str]) -> dict[str, pd.DataFrame]:
    """Gene tables (``gene, p_value, is_hit, is_control``) of ``methods`` on one screen."""
    from screen_targets import call_mageck

    from serving.screen.calling import load_counts_input
    from serving.screen.hits import call_counts, call_rra, call_sparcs
    from training.config import HitsConfig

    hc = HitsConfig(fdr=fdr)
    inp = load_counts_input(screen.counts, screen.samples, screen.library, hc)

    def ours(gene_null: str, sibling_p: float = hc.quiet_sibling_p) -> pd.DataFrame:
        return call_counts(inp, hc.fdr, hc.min_library_reads, hc.null_draws, seed, hc.min_nt_cells, hc.nt_null,
                           gene_null, sibling_p).genes

    def sparcs(bh: bool) -> pd.DataFrame:
        g = call_sparcs(inp, hc.sparcs_p, hc.fdr).genes
        return g.assign(is_hit=g["fdr"] <= hc.fdr) if bh else g

    calls = {"spatial": lambda: ours(hc.gene_null), "spatial_nt": lambda: ours("nt"),
             "spatial_quiet": lambda: ours("nt_and_quiet_screen"),
             "spatial_quiet25": lambda: ours("nt_and_quiet_screen", 0.25),
             "spatial_quiet_only": lambda: ours("quiet_screen"),
             "sparcs": lambda: sparcs(False), "sparcs_bh": lambda: sparcs(True),
             "rra": lambda: call_rra(inp, hc.rra_alpha, hc.fdr, hc.null_draws, seed, hc.min_library_reads).genes}
    out = {m: call() for m, call in calls.items() if m in methods}
    if mageck is not None and "mageck" in methods:
        try:
            out["mageck"] = call_mageck(mageck, inp.counts, pd.read_csv(screen.samples), hc.fdr)
        except RuntimeError as e:  # too sparse a screen for its normalisation: reported, not counted
            print(f"  mageck failed on this screen (left out): {str(e).splitlines()[-1][:200]}")
    return out


def measure(genes: pd.DataFrame, truth: pd.DataFrame, folds: tuple[float, ...]) -> dict:
    """False discovery proportion, recall per planted fold, and the null genes' p-values of one call."""
    from serving.screen.hits import truth_metrics

    called = set(genes.loc[genes["is_hit"] & ~genes["is_control"], "gene"])
    m = truth_metrics(genes, truth)
    recall = {f"{f:g}": float(np.mean([g in called for g in genes_f]))
              for f in folds if len(genes_f := truth.loc[truth["effect"] == f, "gene"])}
    null = truth.loc[truth["role"] == "neutral", "gene"]
    p = genes.set_index("gene")["p_value"].reindex(null).dropna().to_numpy(float)
    return {"n_called": m["n_called"], "false": m["false_discoveries"], "fdp": m["fdp"], "recall": recall,
            "recall_all": m["recall_all_hits"],
            "null_below": {f"{t:g}": int((p < t).sum()) for t in TAIL}, "n_null": int(len(p))}


def null_tail(null: list[dict]) -> dict:
    """Null genes' p-values below each of ``TAIL``, pooled over the screens without hits, against a uniform null."""
    from scipy import stats

    n_null = sum(r["n_null"] for r in null)
    tail = {}
    for t in TAIL:
        expected = t * n_null
        tail[f"{t:g}"] = {"observed": sum(r["null_below"][f"{t:g}"] for r in null), "expected": expected,
                          "poisson_95": [int(stats.poisson.ppf(0.025, expected)),
                                         int(stats.poisson.ppf(0.975, expected))]}
    return tail


def summarise(planted: list[dict], null: list[dict], folds: tuple[float, ...]) -> dict:
    """One method at one coverage, over the seeds."""
    from screen_targets import t_interval

    out = {"planted_screens": len(planted), "null_screens": len(null),
           "null_screens_zero_called": int(sum(r["n_called"] == 0 for r in null)),
           "null_genes_below": null_tail(null), "n_null_p": sum(r["n_null"] for r in null)}
    if planted:
        fdp = [r["fdp"] for r in planted]
        out |= {"fdp": float(np.mean(fdp)), "fdp_95ci": t_interval(fdp), "fdp_per_seed": fdp,
                "n_called": float(np.mean([r["n_called"] for r in planted])),
                "recall": {f"{f:g}": float(np.mean([r["recall"][f"{f:g}"] for r in planted])) for f in folds},
                "recall_95ci": {f"{f:g}": t_interval([r["recall"][f"{f:g}"] for r in planted]) for f in folds},
                "recall_all_per_seed": [r["recall_all"] for r in planted]}
    return out


def against_default(by_method: dict[str, dict]) -> None:
    """Each method's paired difference to ours with the default (``spatial``) on the same planted screens: recall of
    every planted gene and FDP, mean and 95 % t-interval over the seeds (added to each method's summary)."""
    from screen_targets import t_interval

    base = by_method.get("spatial")
    if base is None or not base["planted_screens"]:
        return
    for m, s in by_method.items():
        if m == "spatial":
            continue
        d = {}
        for key, per_seed in (("recall_all", "recall_all_per_seed"), ("fdp", "fdp_per_seed")):
            diff = np.subtract(s[per_seed], base[per_seed])
            d[key] = {"mean": float(diff.mean()), "95ci": t_interval(list(diff))}
        s["minus_spatial"] = d


def plot_power(result: dict, folds: tuple[float, ...], fdr: float, genes: int, path: Path) -> None:
    """Recall per planted fold and FDP against cells per gene, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cov = sorted(result, key=int)
    per_gene = [cells_per_gene(int(c), genes) for c in cov]
    fig, axes = plt.subplots(1, len(folds) + 1, figsize=(4 * (len(folds) + 1), 3.6), constrained_layout=True)
    for m in result[cov[0]]:
        for ax, f in zip(axes, folds, strict=False):
            ax.plot(per_gene, [result[c][m]["recall"][f"{f:g}"] for c in cov], marker="o", label=m)
            ax.set_title(f"recall, genes with a {f:g}x bin rate", fontsize=10)
        axes[-1].plot(per_gene, [result[c][m]["fdp"] for c in cov], marker="o", label=m)
    axes[-1].axhline(fdr, c="k", lw=1, ls="--")
    axes[-1].set_ylim(bottom=0)
    axes[-1].set_title(f"false discovery proportion (FDR {fdr:g})", fontsize=10)
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(per_gene, [f"{x:,.0f}" for x in per_gene])
        ax.set_xlabel("imaged cells per gene")
    for ax in axes[:-1]:
        ax.set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[2_000_000, 5_000_000, 17_000_000],
                    help="cells per replicate (2 replicates); 17e6 is the larger SPARCS screen's 34 M")
    ap.add_argument("--folds", type=float, nargs="+", default=[4.0, 2.0], help="planted bin-rate folds")
    ap.add_argument("--seeds", type=int, default=10, help="planted screens (seeds FIRST, FIRST+1, ...)")
    ap.add_argument("--null-seeds", type=int, default=None, help="screens without hits (seeds 1000+FIRST, ...; "
                    "default: as many as --seeds)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--genes", type=int, default=GENES, help="targeting genes of the library (4 gRNAs each)")
    ap.add_argument("--nt-grnas", type=int, default=N_NT, help="non-targeting gRNAs of the library")
    ap.add_argument("--share", type=float, default=0.005, help="share of the genes planted at each fold")
    ap.add_argument("--fdr", type=float, default=0.1)
    ap.add_argument("--mageck", default=None, help="a mageck2 executable (default: .venv-mageck's where `make "
                    "mageck-env` built it; '' leaves MAGeCK out)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/screen/genome_scale")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.genes < 1 or args.nt_grnas < 2 or not 0 < args.share * len(args.folds) < 1:
        ap.error("--genes must be >= 1, --nt-grnas >= 2, and --share times the number of folds between 0 and 1")
    if int(args.genes * args.share) < 1 and args.seeds:
        ap.error(f"--share {args.share:g} of {args.genes} genes plants no gene: raise --share or --genes")

    from bench_hits import write_screen
    from screen_targets import DEFAULT_MAGECK

    if args.mageck is None:
        args.mageck = str(DEFAULT_MAGECK) if DEFAULT_MAGECK.exists() else ""
    mageck = Path(args.mageck) if args.mageck else None
    if mageck is not None and not mageck.is_file():
        ap.error(f"--mageck {mageck}: no such executable (`make mageck-env` builds one)")
    folds = tuple(args.folds)
    n_null = args.seeds if args.null_seeds is None else args.null_seeds
    screens = [("planted", s, folds) for s in range(args.first_seed, args.first_seed + args.seeds)]
    screens += [("null", 1000 + s, ()) for s in range(args.first_seed, args.first_seed + n_null)]
    result: dict[str, dict] = {}
    ok = True
    for cells in args.cells:
        t0 = time.perf_counter()
        rows: dict[str, dict[str, list]] = {}
        for kind, seed, planted in screens:
            with tempfile.TemporaryDirectory() as d:
                screen = write_screen(Path(d), cells, 4 * args.genes + args.nt_grnas, args.nt_grnas, seed, planted,
                                      args.share)
                for m, genes in call_all(screen, args.fdr, seed, mageck, set(args.methods)).items():
                    rows.setdefault(m, {"planted": [], "null": []})[kind].append(measure(genes, screen.truth, folds))
        result[str(cells)] = {m: summarise(r["planted"], r["null"], folds) for m, r in rows.items()
                              if len(r["planted"]) == args.seeds and r["null"]}
        against_default(result[str(cells)])
        print(f"\n{cells:,} cells per replicate x 2 ({cells_per_gene(cells, args.genes):,.0f} per gene), {args.seeds} planted screens and "
              f"{n_null} without hits: {time.perf_counter() - t0:.0f} s")
        print_table(result[str(cells)], folds)
        ours = result[str(cells)].get("spatial")
        if ours is not None:
            ok &= ours["null_screens_zero_called"] >= int(np.ceil(0.9 * ours["null_screens"]))
            if args.seeds:
                ok &= ours["fdp"] <= args.fdr or ours["fdp_95ci"][0] <= args.fdr
    print("\np<t columns: null genes' p-values below t on the screens without hits (a uniform null's expectation, "
          "the top of its Poisson 95 % interval)")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"grnas": 4 * args.genes + args.nt_grnas, "genes": args.genes, "nt_grnas": args.nt_grnas,
            "share": args.share, "folds": list(folds), "fdr": args.fdr, "methods": args.methods,
            "planted_seeds": [s for k, s, _ in screens if k == "planted"],
            "null_seeds": [s for k, s, _ in screens if k == "null"], "mageck": mageck is not None}
    (args.out / "genome_scale.json").write_text(json.dumps({"setup": meta, "by_cells_per_replicate": result},
                                                           indent=2) + "\n")
    if args.seeds:
        plot_power(result, folds, args.fdr, args.genes, args.out / "power.png")
    print(f"wrote {args.out}; ours keeps the FDR at every coverage: {'yes' if ok else 'NO'}")
    return 1 if args.check and not ok else 0


def print_table(by_method: dict[str, dict], folds: tuple[float, ...]) -> None:
    planted = any(s["planted_screens"] for s in by_method.values())
    head = f"{'method':<14}"
    if planted:
        head += f"{'called':>8}{'FDP [95 % CI]':>24}" + "".join(f"{'recall ' + f'{f:g}x':>12}" for f in folds)
    print(head + f"{'0 called':>10}" + "".join(f"{'p<' + f'{t:g}':>16}" for t in TAIL))
    for m, s in by_method.items():
        line = f"{m:<14}"
        if planted:
            lo, hi = s["fdp_95ci"]
            fdp = f"{s['fdp']:.3f} [{lo:.3f}, {hi:.3f}]"
            line += f"{s['n_called']:>8.1f}{fdp:>24}"
            line += "".join(f"{s['recall'][f'{f:g}']:>12.2f}" for f in folds)
        line += f"{s['null_screens_zero_called']}/{s['null_screens']}".rjust(10)
        line += "".join(f"{v['observed']:>6} ({v['expected']:.0f}, {v['poisson_95'][1]})".rjust(16)
                        for v in s["null_genes_below"].values())
        print(line)
    for m, s in by_method.items():
        if "minus_spatial" in s:
            r, f = s["minus_spatial"]["recall_all"], s["minus_spatial"]["fdp"]
            print(f"{m} minus spatial, same screens: recall {r['mean']:+.3f} [{r['95ci'][0]:+.3f}, {r['95ci'][1]:+.3f}], "
                  f"FDP {f['mean']:+.3f} [{f['95ci'][0]:+.3f}, {f['95ci'][1]:+.3f}]")


if __name__ == "__main__":
    sys.exit(main())
