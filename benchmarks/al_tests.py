"""Every declared test of active learning on the unseen configurations, tabled from the files each run wrote.

Issue 13 asks that the default query strategy beat random with a 95 % interval that excludes zero on two simulator
configurations not used to choose it. Each test below was declared in ``benchmarks/FINDINGS.md`` before it ran and
wrote ``reports/<dir>/<configuration>/seeds.json`` (``spatial seeds --al-curve``: per arm the mean area under the
budget curve, AUBC, per other arm the paired difference to random) and ``seeds_at80.json`` (the same, of the balanced
accuracy at 80 labels, the last budget of the tests on the 90 % pool). A test's ``measure`` says which of the two it
declared; rows read afterwards from a test's other file are observations and do not count. This script reads them
all and writes one table, so the README quotes a file rather than copying numbers, and counts how often chance alone
would put an interval above zero. For each row it
also says what the test could see: the seed-to-seed spread of the paired difference (read back from its interval),
the smallest true difference its seeds put above zero with probability 0.8 (``detectable``), and the seeds a rerun
would need for a true difference of the first ``--effect`` (one point of AUBC unless told; ``seeds_needed``).

    python benchmarks/al_tests.py [--out reports/al_tests] [--effect 0.01 0.02]   # writes table.md and tests.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom, nct
from scipy.stats import t as student_t

ROOT = Path(__file__).resolve().parents[1]
POWER = 0.8  # the chance an interval lies above zero, for ``detectable`` and ``seeds_needed``
MOST_SEEDS = 5000  # seeds_needed searches up to here; beyond, it says ">5000"
# per measure (of test balanced accuracy): the file ``spatial seeds`` wrote, and its name in the table
MEASURES = {"aubc": ("seeds.json", "AUBC"), "at80": ("seeds_at80.json", "at 80 labels")}


@dataclass(frozen=True)
class Test:
    """One declared test: its reports directory (or a ``spatial summary`` markdown file), the arm compared with
    random, what it measured and by which of ``MEASURES``."""

    dir: str
    arm: str
    what: str
    configurations: tuple[str, ...] = ("seed1_weak", "seed2_basal")
    counts: bool = True  # a test of the target on both configurations (False: a replication, or an observation)
    measure: str = "aubc"

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure {self.measure!r} is not one of {sorted(MEASURES)}")
        if self.dir.endswith(".md") and self.measure != "aubc":
            raise ValueError(f"{self.dir}: a pipeline summary holds the AUBC only, not {self.measure!r}")


TESTS = (
    Test("benchmarks/studies/results_intel.md", "power_bald",
         "the `al_transfer` stage: the default, 20 + 3 x 20, 10 seeds"),
    Test("al_transfer_issue_budget", "power_bald", "the issue's budget, 30 + 4 x 30, 10 seeds"),
    Test("al_transfer_encoder", "power_bald", "rounds fine-tuned from a SimCLR encoder of the pool, 10 seeds"),
    Test("al_transfer_badge", "badge", "BADGE from the same encoders, 10 seeds"),
    Test("al_first_round", "badge", "BADGE's first query round (20 + 20), 30 fresh seeds"),
    Test("al_encoder_replication", "power_bald", "the one interval above zero, rerun on 30 fresh seeds",
         ("seed2_basal",), counts=False),
    Test("al_transfer_imbalanced", "power_bald", "a pool 70 % stimulated, 10 seeds"),
    Test("al_transfer_320", "power_bald", "20 + 6 x 50 labels, 10 seeds"),
    Test("al_transfer_skewed90", "power_bald", "a pool 90 % stimulated, 20 seeds",
         ("seed1_weak_2000", "seed2_basal")),
    Test("al_skewed90_replication", "power_bald", "the 90 % pool's interval above zero, rerun on 30 fresh seeds",
         ("seed2_basal",), counts=False),
    Test("al_transfer_skewed90", "power_bald",
         "a pool 90 % stimulated, a third configuration added after the second missed, 20 seeds", ("seed3_default",)),
    Test("al_powered", "power_bald", "a pool 90 % stimulated, two new configurations, 35 seeds sized for +1.7 points",
         ("seed4_default", "seed5_3000")),
    *(Test(d, "power_bald", f"{what}, read at 80 labels afterwards (not declared)", configurations, counts=False,
           measure="at80")
      for d, what, configurations in (
          ("al_transfer_skewed90", "a pool 90 % stimulated", ("seed1_weak_2000", "seed2_basal", "seed3_default")),
          ("al_skewed90_replication", "its replication", ("seed2_basal",)),
          ("al_powered", "the test sized for +1.7 points", ("seed4_default", "seed5_3000")))),
    Test("al_last_budget", "power_bald", "a pool 90 % stimulated, the last budget, two new configurations, 40 seeds "
         "sized for +3.5 points", ("seed6_2500", "seed7_ei24"), measure="at80"),
    Test("al_last_budget", "power_bald", "the last-budget test, its AUBC (reported, not counted)",
         ("seed6_2500", "seed7_ei24"), counts=False),
)


def summary_metrics(path: Path, section: str) -> dict[str, float]:
    """The "all metrics" table under ``## <section>`` of a ``spatial summary`` markdown file, as numbers."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    metrics, inside = {}, False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == section
        elif inside and line.startswith("| ") and line.count("|") == 3:
            key, value = (c.strip() for c in line.strip("|").split("|"))
            try:
                metrics[key] = float(value)
            except ValueError:
                continue  # the header and booleans
    if not metrics:
        raise FileNotFoundError(f"{path} has no metrics table under '## {section}'")
    return metrics


def rows_of(tests: tuple[Test, ...], reports: Path) -> list[dict]:
    """One row per test and configuration: the paired difference of its measure to random and its interval."""
    rows = []
    for t in tests:
        for name in t.configurations:
            if t.dir.endswith(".md"):  # the pipeline's summary has the AUBC only
                s = summary_metrics(reports.parent / t.dir, f"al_transfer_{name}.json")
            else:
                path = reports / t.dir / name / MEASURES[t.measure][0]
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: run the test as benchmarks/FINDINGS.md declares it")
                s = json.loads(path.read_text())
            a = t.arm
            rows.append({"test": t.what, "dir": t.dir, "configuration": name, "arm": a, "counts": t.counts,
                         "measure": t.measure, "seeds": int(s[f"{a}/n"]), "random": s["random/mean"],
                         "strategy": s[f"{a}/mean"], "diff": s[f"{a}/diff_mean"], "ci_low": s[f"{a}/diff_ci_low"],
                         "ci_high": s[f"{a}/diff_ci_high"], "above_zero": s[f"{a}/diff_ci_low"] > 0})
    return rows


def paired_sd(ci_low: float, ci_high: float, n: int) -> float:
    """The seed-to-seed standard deviation of a paired difference, read back from its 95 % t-interval
    (``training.evaluation.seeds.mean_interval``: half-width ``t(0.975, n-1) sd / sqrt(n)``)."""
    return (ci_high - ci_low) / 2 * np.sqrt(n) / student_t.ppf(0.975, n - 1)


def power(effect: float, sd: float, n: np.ndarray | int) -> np.ndarray:
    """The probability that a paired 95 % t-interval over ``n`` seeds lies wholly above zero when the true mean
    difference is ``effect`` and its seed-to-seed SD ``sd`` (noncentral t)."""
    n = np.asarray(n)
    return nct.sf(student_t.ppf(0.975, n - 1), n - 1, effect * np.sqrt(n) / sd)


def detectable(sd: float, n: int, at: float = POWER) -> float:
    """The smallest true mean difference that ``n`` seeds put above zero with probability ``at``."""
    return float(brentq(lambda e: power(e, sd, n) - at, 1e-9, 100 * sd))


def seeds_needed(effect: float, sd: float, at: float = POWER, most: int = MOST_SEEDS) -> int | None:
    """The fewest seeds that put a true mean difference ``effect`` above zero with probability ``at``; None beyond
    ``most``."""
    n = np.arange(2, most + 1)
    reached = power(effect, sd, n) >= at
    return int(n[reached.argmax()]) if reached.any() else None


def add_power(rows: list[dict], effect: float) -> list[dict]:
    """Each row with ``sd`` (of the paired difference), ``detectable`` and ``seeds_needed`` (at ``effect``)."""
    for r in rows:
        r["sd"] = float(paired_sd(r["ci_low"], r["ci_high"], r["seeds"]))
        r["detectable"] = detectable(r["sd"], r["seeds"])
        r["seeds_needed"] = seeds_needed(effect, r["sd"])
    return rows


def pooled_spread(rows: list[dict], effects: list[float]) -> dict:
    """The SD of the paired difference pooled over the rows (variances weighted by their degrees of freedom), and
    the seeds a test at that spread needs for each of ``effects``: figures steadier than any row's own."""
    df = np.array([r["seeds"] - 1 for r in rows])
    sd = float(np.sqrt(np.sum(df * np.array([r["sd"] for r in rows]) ** 2) / df.sum()))
    return {"sd_pooled": sd, "seeds_needed_pooled": {str(e): seeds_needed(e, sd) for e in effects}}


def spread_by_measure(rows: list[dict], effects: list[float]) -> dict[str, dict]:
    """``pooled_spread`` of each measure's rows: an AUBC and an accuracy at one budget spread differently."""
    return {m: pooled_spread([r for r in rows if r["measure"] == m], effects)
            for m in dict.fromkeys(r["measure"] for r in rows)}


def tally(rows: list[dict]) -> dict:
    """How many intervals of the counted tests exclude zero from above, against what chance alone gives: with no
    effect, each 95 % interval lies wholly above zero with probability 0.025 (treated as independent, which tests
    sharing configurations only approximate)."""
    counted = [r for r in rows if r["counts"]]
    n, k = len(counted), sum(r["above_zero"] for r in counted)
    per_test = {t: [r["above_zero"] for r in counted if r["test"] == t] for t in dict.fromkeys(r["test"] for r in counted)}
    met = {t: len(v) >= 2 and all(v) for t, v in per_test.items()}  # the target asks for two configurations
    return {"tests": len(met), "intervals": n, "above_zero": k,
            "chance_of_one_or_more_above_zero": float(binom.sf(0, n, 0.025)),
            "chance_of_as_many_above_zero": float(binom.sf(k - 1, n, 0.025)),
            "tests_above_zero_on_two_configurations": [t for t, ok in met.items() if ok]}


def markdown(rows: list[dict], summary: dict, effect: float) -> str:
    pts = 100  # differences in points of balanced accuracy
    pooled = "; ".join(
        f"{MEASURES[m][1]}: SD {pts * s['sd_pooled']:.1f} points, seeds for "
        + ", ".join(f"{pts * float(e):+.1f} points {n or f'more than {MOST_SEEDS}'}"
                    for e, n in s["seeds_needed_pooled"].items())
        for m, s in summary["spread"].items())
    lines = ["| test (declared in benchmarks/FINDINGS.md) | configuration | measure of balanced accuracy | random | strategy | "
             "strategy minus random, points [95 % CI] | above zero | seeds | SD of the difference, points | "
             f"smallest difference its seeds find {100 * POWER:.0f} % of the time, points | "
             f"seeds needed for {pts * effect:+.1f} points |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['test']} ({r['arm']}) | `{r['configuration']}` | {MEASURES[r['measure']][1]} "
                     f"| {r['random']:.3f} | {r['strategy']:.3f} "
                     f"| {pts * r['diff']:+.1f} [{pts * r['ci_low']:+.1f}, {pts * r['ci_high']:+.1f}] "
                     f"| {'**yes**' if r['above_zero'] else 'no'} | {r['seeds']} | {pts * r['sd']:.1f} "
                     f"| {pts * r['detectable']:.1f} | {r['seeds_needed'] or f'>{MOST_SEEDS}'} |")
    lines.append("")
    lines.append(f"{summary['tests']} tests, {summary['intervals']} intervals, "
                 f"{summary['above_zero']} above zero; with no effect at all, at least one of {summary['intervals']} "
                 f"would be above zero with probability {summary['chance_of_one_or_more_above_zero']:.2f}, "
                 f"{summary['above_zero']} or more with probability {summary['chance_of_as_many_above_zero']:.2g}. "
                 f"Tests "
                 f"above zero on two configurations or more: {', '.join(summary['tests_above_zero_on_two_configurations']) or 'none'}. "
                 f"The seed-to-seed SD of the paired difference pooled over the rows of each measure, and the seeds per "
                 f"configuration a test needs to find a true difference {100 * POWER:.0f} % of the time: {pooled}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=Path, default=ROOT / "reports")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "al_tests")
    ap.add_argument("--effect", type=float, nargs="+", default=[0.01, 0.02],
                    help="true differences to plan for (default 0.01 0.02: one and two points); the first sets the "
                         "table's seeds-needed column")
    args = ap.parse_args(argv)
    if not all(0 < e < 1 for e in args.effect):
        print(f"error: --effect takes differences of balanced accuracy between 0 and 1, got {args.effect}",
              file=sys.stderr)
        return 2
    try:
        rows = add_power(rows_of(TESTS, args.reports), args.effect[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {**tally(rows), "spread": spread_by_measure(rows, args.effect)}
    text = markdown(rows, summary, args.effect[0])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tests.json").write_text(json.dumps({"rows": rows, "effects": args.effect, **summary}, indent=1) + "\n")
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
