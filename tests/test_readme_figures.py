"""The README and benchmarks/RESULTS.md quote figures from files the pipeline and the timed runs wrote; these tests
keep them in step, and keep the documents' links pointing at sections that exist.

The first release's README drifted from what a clean clone measured. Here each quoted figure is formatted from the
committed file it comes from and looked up in the documents, so a rerun that moves a metric, or a timing written by
hand, fails until the text says what the files say.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the README gives a result in a line, RESULTS.md the study behind it; a figure may be quoted in either
README = (REPO / "README.md").read_text() + "\n" + (REPO / "benchmarks/RESULTS.md").read_text()

# (the README's phrase, formatted from the file's keys; the committed file `make run` or a benchmark wrote)
PIPELINE_FIGURES = [
    ("balanced accuracy {balanced_accuracy:.3f}, NLL {nll:.3f}, ECE {ece:.3f}", "metrics/evaluate.json"),
    ("fine-tuned from its SimCLR encoder: {ece:.4f}", "metrics/evaluate.json"),
    ("(`ece_calibration_p` {ece_calibration_p:.2f}:", "metrics/evaluate.json"),
    ("held-out classes {heldout/density/auroc:.2f} pooled with the pipeline's ensemble", "metrics/evaluate.json"),
    ("the pipeline's ensemble on the default screen {heldout/density/auroc:.3f} /", "metrics/evaluate.json"),
    ("the SPARCS VGG baseline {balanced_accuracy:.3f} at", "metrics/baseline_vgg.json"),
    ("top gene of the top cluster on {planted_gene_on_top_at_default} of {screens} simulated screens",
     "reports/discovery_transfer.json"),
]


@pytest.mark.parametrize(("phrase", "source"), PIPELINE_FIGURES, ids=[p for p, _ in PIPELINE_FIGURES])
def test_the_readme_quotes_the_committed_pipeline_metrics(phrase: str, source: str) -> None:
    expected = phrase.format_map(json.loads((REPO / source).read_text()))
    assert expected in README, f"README should say {expected!r} (from {source})"


README_FLAT = " ".join(README.split())  # phrases may wrap across lines


def points(x: float) -> str:
    return f"{100 * x:+.1f}"


@pytest.mark.parametrize("config", ["seed6_2500", "seed7_ei24"])
def test_active_learnings_last_budget_gains_match_their_seed_files(config: str) -> None:
    """Issue 13's "yes" for active learning: power_bald minus random at 80 labels, 40 seeds, per configuration."""
    d = json.loads((REPO / f"reports/al_last_budget/{config}/seeds_at80.json").read_text())
    gain = (f"`{config}` {points(d['power_bald/diff_mean'])} [{points(d['power_bald/diff_ci_low'])}, "
            f"{points(d['power_bald/diff_ci_high'])}]")
    assert d["power_bald/diff_excludes_zero"] and gain in README_FLAT, gain


def test_the_semi_supervised_gain_matches_the_study_table() -> None:
    """Issue 13's "yes" for SSL: the lpft_dlr arm minus supervised in the study summary the pipeline wrote."""
    table = (REPO / "benchmarks/studies/results_intel.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| lpft_dlr | 3 |"))
    diff, low, high = re.search(r"\| ([+-][\d.]+) \| \[([+-][\d.]+), ([+-][\d.]+)\] \| yes \|", row).groups()
    assert f"{points(float(diff))} [{points(float(low))}, {points(float(high))}]" in README_FLAT


def test_the_label_check_figures_match_their_file() -> None:
    d = json.loads((REPO / "reports/label_check.json").read_text())
    said = (f"{d['pool']:,} training and validation cells hold {d['escapers_in_pool']} escapers; all "
            f"{d['first']['40']['escapers']} are in the first 40")
    assert d["first"]["40"]["escapers"] == d["escapers_in_pool"] and said in README_FLAT, said


def test_the_discovery_claim_matches_its_metric() -> None:
    metrics = json.loads((REPO / "metrics/discovery.json").read_text())
    assert metrics["planted_novel_gene_is_top"] is True  # the README's "yes" in issue 13's targets
    assert "| the planted novel gene is the top gene of the top cluster |" in README



def _fdp(s: dict) -> str:
    return f"{s['fdp']:.3f} [{s['fdp_95ci'][0]:.3f}, {s['fdp_95ci'][1]:.3f}]"


def test_the_genome_scale_figures_match_their_files() -> None:
    """The genome-scale rows: ours (the default and the NT null alone) per depth, the NT null's figures the same as
    the first run's, MAGeCK's from the run beside them, and the two declared tests of the gene null."""
    def depths(path: str) -> dict:
        return json.loads((REPO / "reports/screen/genome_scale" / path).read_text())["by_cells_per_replicate"]

    now, before, first = depths("auto_quiet/genome_scale.json"), depths("auto/genome_scale.json"), \
        depths("genome_scale.json")
    for cells, label in (("2000000", "2e6 cells"), ("5000000", "5e6 cells"), ("17000000", "1.7e7 cells")):
        row = _table_row(label if cells != "17000000" else f"{label} (34 M, the larger SPARCS screen)")
        for s in (now[cells]["spatial"], now[cells]["spatial_nt"], before[cells]["mageck"]):
            assert f"| {_fdp(s)} | {s['recall']['4']:.2f} / {s['recall']['2']:.2f} |" in row, label
        assert now[cells]["spatial_nt"]["fdp_per_seed"] == first[cells]["spatial"]["fdp_per_seed"]
        assert before[cells]["spatial_nt"]["fdp_per_seed"] == first[cells]["spatial"]["fdp_per_seed"]
    test = depths("quiet/1.7e7/genome_scale.json")["17000000"]
    quiet, every = test["spatial_quiet"], test["spatial"]
    nt = depths("gene_null/1.7e7/genome_scale.json")["17000000"]["spatial_nt"]
    assert quiet["fdp_95ci"][0] < 0.1 and nt["fdp_95ci"][0] > 0.1  # the README's "honest" and "not honest"
    assert quiet["minus_spatial"]["recall_all"]["95ci"][0] > 0  # the declared gain over every gRNA's null
    said = (f"false discovery proportion **{_fdp(quiet)}** at FDR 0.1, {100 * quiet['recall']['4']:.0f} % of the "
            f"genes with 4x the bin rate found, {100 * quiet['recall']['2']:.0f} % of those with 2x; no call on "
            f"{quiet['null_screens_zero_called']} of {quiet['null_screens']} screens without hits.")
    said_before = (f"{_fdp(every)} and {100 * every['recall']['4']:.0f} % / {100 * every['recall']['2']:.0f} % on "
                   f"the same screens; with the NT pseudo-genes alone, as before that, {_fdp(nt)} on other new screens")
    for text in (said, said_before):
        assert text in README_FLAT, text
    deep = {cells: depths(f"deep/{path}/genome_scale.json")[cells]["spatial"]
            for cells, path in (("50000000", "5e7"), ("100000000", "1e8"))}
    a, b = deep["50000000"], deep["100000000"]
    said = (f"at 5,063 imaged cells per gene it finds {100 * a['recall']['4']:.0f} % of the 4x genes and "
            f"{100 * a['recall']['2']:.0f} % of the 2x genes (FDP {_fdp(a)}), at 10,127 {100 * b['recall']['4']:.0f} % "
            f"and {100 * b['recall']['2']:.0f} % (FDP {_fdp(b)})")
    assert said in README_FLAT, said
    table = README.replace("**", "")
    for cells, path in (("2000000", "quiet/2e6"), ("17000000", "quiet/1.7e7")):
        t = depths(f"{path}/genome_scale.json")[cells]
        for m in ("spatial", "spatial_quiet", "spatial_nt"):
            assert f"| {_fdp(t[m])} |" in table, (path, m)
        gain = t["spatial_quiet"]["minus_spatial"]["recall_all"]
        assert f"| {gain['mean']:+.3f} [{gain['95ci'][0]:+.3f}, {gain['95ci'][1]:+.3f}] |" in table, path


def _one_coverage(path: Path) -> dict:
    """Each method's figures in a `genome_scale_hits.py` file measured at one coverage."""
    (run,) = json.loads(path.read_text())["by_cells_per_replicate"].values()
    return run


def _honest(s: dict, tails: tuple[str, ...] = ("0.01", "0.001"), max_calls: int = 11) -> bool:
    """The declared library-size tests' honesty for one null at one size (a `genome_scale_hits.py` method): mean FDP
    at most 0.1 or its interval reaching it, at most `max_calls` screens without hits with a call, and the null
    genes' p-values below each of `tails` not above a uniform's Poisson 95 % top."""
    calls = s["null_screens"] - s["null_screens_zero_called"]
    return ((s["fdp"] <= 0.1 or s["fdp_95ci"][0] <= 0.1) and calls <= max_calls
            and all(s["null_genes_below"][t]["observed"] <= s["null_genes_below"][t]["poisson_95"][1] for t in tails))


def _honest_60(s: dict) -> bool:
    """The same on the 60-gene simulated screen (a `screen_targets.py` method, 30 screens without hits)."""
    from scipy import stats

    tops = [stats.poisson.ppf(0.975, float(t) * s["n_null_p"]) for t in ("0.01", "0.001")]
    return ((s["fdp"] <= 0.1 or s["fdp_95ci"][0] <= 0.1) and s["null_seeds_zero_called"] >= 24
            and s["null_p_below"]["0.01"] <= tops[0] and s["null_p_below"]["0.001"] <= tops[1])


def test_the_library_size_figures_match_their_files() -> None:
    """The table of the test at 60-4,000 genes, and the decision it made: the quiet screen null honest at every
    size, the NT null alone not at 60, 250 and 1,000 genes, so the quiet null is the default."""
    from training.config import HitsConfig

    base = REPO / "reports/screen/library_size"
    honest = {}
    for genes, nt_grnas in ((250, 100), (1000, 400), (4000, 1000)):
        run = _one_coverage(base / f"{genes}/genome_scale.json")
        nt, quiet = run["spatial_nt"], run["spatial_quiet"]
        below = [s["null_genes_below"]["0.01"]["observed"] for s in (nt, quiet)]
        # quiet minus NT, paired: `spatial` (the old `auto`) was the NT null at 250 genes, the quiet one above
        if genes == 250:
            d = quiet["minus_spatial"]["recall_all"]
            mean, (lo, hi) = d["mean"], d["95ci"]
        else:
            d = nt["minus_spatial"]["recall_all"]
            mean, (lo, hi) = -d["mean"], sorted(-v for v in d["95ci"])
        row = _table_row(f"{genes:,} ({nt_grnas:,})").replace("**", "")
        cells = (f"| {_fdp(nt)} | {_fdp(quiet)} | {nt['null_screens'] - nt['null_screens_zero_called']} / "
                 f"{quiet['null_screens'] - quiet['null_screens_zero_called']} of 60 | {below[0]:,} / {below[1]:,}")
        assert cells in row, genes
        assert f"| {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in row, genes
        honest[genes, "nt"], honest[genes, "quiet"] = _honest(nt), _honest(quiet)
    for name, path in (("nt", "60_nt"), ("quiet", "60_quiet")):
        s = json.loads((base / f"{path}/targets.json").read_text())["spatial"]
        honest[60, name] = _honest_60(s)
        assert f"{_fdp(s)} |" in _table_row("60 genes (40)"), name
    assert all(honest[g, "quiet"] for g in (60, 250, 1000, 4000))
    assert [g for g in (60, 250, 1000, 4000) if not honest[g, "nt"]] == [60, 250, 1000]
    assert HitsConfig().gene_null == "nt_and_quiet_screen"  # the rule's outcome


def test_the_hit_calling_planning_figures_match_their_files() -> None:
    """The NT-count table of a 1,000-gene library and the 40 screens at 203 cells per gene, from the files."""
    for nt_grnas, path in ((100, "library_size/1000_nt100"), (400, "library_size/1000"),
                           (1000, "library_size/1000_nt1000")):
        r = _one_coverage(REPO / "reports/screen" / path / "genome_scale.json")
        default = r["spatial_quiet"] if nt_grnas == 400 else r["spatial"]  # the 400 run predates the new default
        nt = r["spatial_nt"]
        tail = nt["null_genes_below"]["0.001"]["observed"]
        row = _table_row(f"{nt_grnas:,}").replace("**", "")
        assert (f"| {_fdp(default)} | {default['recall']['4']:.2f} / {default['recall']['2']:.2f} | {_fdp(nt)} | "
                f"{tail} |") in row, nt_grnas
    deep = _one_coverage(REPO / "reports/screen/genome_scale/depth_2e6/genome_scale.json")
    said = (f"40 new planted screens give the default **{_fdp(deep['spatial'])}** ({deep['spatial']['n_called']:.1f} "
            f"calls per screen) and the NT null alone {_fdp(deep['spatial_nt'])}")
    assert said in README_FLAT, said
    assert deep["spatial"]["fdp"] <= 0.1  # "the default holds the FDR there too"
    gains = []
    for path in ("library_size/sibling_250", "library_size/sibling_1000", "genome_scale/sibling_1.7e7"):
        d = _one_coverage(REPO / "reports/screen" / path / "genome_scale.json")["spatial_quiet25"]["minus_spatial"][
            "recall_all"]
        gains.append(f"{d['mean']:+.3f} [{d['95ci'][0]:+.3f}, {d['95ci'][1]:+.3f}]")
        assert d["95ci"][0] <= 0, path  # "no gain beyond noise": the default stays
    said = f"{gains[0]} at 250 genes, {gains[1]} at 1,000, {gains[2]} at 20,000"
    assert said in README_FLAT, said


def test_the_cells_mode_genome_scale_figures_match_their_file() -> None:
    d = json.loads((REPO / "reports/screen/genome_scale/cells/cells.json").read_text())
    nt, quiet = d["null"]["nt"], d["null"]["nt_and_quiet_screen"]
    planted = {f: d["planted"][f]["nt_and_quiet_screen"] for f in ("2", "3")}
    def calls(s: dict) -> list[tuple[int, int]]:
        return list(zip(s["true"], s["false"], strict=True))

    same = sum(a == b for f in ("2", "3")
               for a, b in zip(calls(d["planted"][f]["nt"]), calls(planted[f]), strict=True))
    said = (f"With the NT null alone {nt['screens_with_a_call']} of 20 screens without hits had a call and the null "
            f"genes' p-values below 0.01 and 0.001 were above a uniform's interval "
            f"({nt['below']['0.01']['observed']:,} and {nt['below']['0.001']['observed']} where the tops are "
            f"{nt['below']['0.01']['poisson_95'][1]:,} and {nt['below']['0.001']['poisson_95'][1]}); with the default "
            f"(the quiet screen null) {quiet['screens_with_a_call']} of 20 and "
            f"{quiet['below']['0.01']['observed']:,} and {quiet['below']['0.001']['observed']}, with the same calls on "
            f"{same} of the 10 planted screens (FDP {_fdp(planted['2'])} with 2x genes, {_fdp(planted['3'])} with 3x; recall "
            f"{planted['2']['recall']:.2f} and {planted['3']['recall']:.2f};")
    assert said in README_FLAT, said
    assert nt["below"]["0.001"]["observed"] > nt["below"]["0.001"]["poisson_95"][1]  # the README's "above"


def _signed_interval(g: dict, digits: int = 3) -> str:
    """A difference as the README writes it: ``+0.027 [+0.015, +0.038]`` from a ``mean_interval`` record."""
    return f"{g['mean']:+.{digits}f} [{g['ci_low']:+.{digits}f}, {g['ci_high']:+.{digits}f}]"


def test_the_pixel_mahalanobis_tests_match_their_files() -> None:
    """The novelty table of five new screens, the second declared test's gain (its interval includes zero: the
    default stayed then) and leave-one-class-out's pick, each from the file the study wrote."""
    base = REPO / "reports/uncertainty_study/intel/pixel_mahalanobis"

    def figure(stats: dict, key: str) -> str:
        return f"{stats[f'{key}/heldout_pooled']['mean']:.3f} / {stats[f'{key}/novel_vs_screen']['mean']:.3f}"

    def gain(stats: dict) -> str:
        return _signed_interval(stats["energy_pixel_mahalanobis_minus_energy_pixel/heldout_pooled"])

    for seed in (8, 1, 11, 12, 13):
        stats = json.loads((base / f"seed{seed}/seeds.json").read_text())["arms"][f"seed{seed}"]
        row = _table_row(f"`synth.seed` {seed}").replace("**", "")
        cells = [figure(stats, "energy_pixel"), figure(stats, "energy_pixel_mahalanobis"), gain(stats),
                 figure(stats, "pixel_knn")]
        assert row.startswith(f"| `synth.seed` {seed} | " + " | ".join(cells) + " |"), (seed, cells)
    test = json.loads((base / "second_test.json").read_text())["arms"]["second_test"]
    low = test["energy_pixel_mahalanobis_minus_energy_pixel/heldout_pooled"]["ci_low"]
    assert low <= 0 and f"**{gain(test)}**" in _table_row("the declared test (12, 13: six ensembles)")
    assert "so the default stayed `energy_pixel` then" in README_FLAT
    loco = json.loads((base / "loco.json").read_text())["mean_auroc"]
    said = (f"puts `energy_pixel_mahalanobis` first ({loco['energy_pixel_mahalanobis']:.3f}, ahead of `energy_pixel` "
            f"on every seed), `pixel_knn_mahalanobis` {loco['pixel_knn_mahalanobis']:.3f} and `pixel_mahalanobis` "
            f"{loco['pixel_mahalanobis']:.3f}")
    assert said in README_FLAT, said


def test_the_third_pixel_mahalanobis_test_decided_the_default() -> None:
    """The third declared test, twelve new screens with the screen as the unit: both parts of its rule from the file,
    the default they decided (config and params.yaml alike), and the seventeen-screen figures the README gives."""
    from training.config import UncertaintyConfig, load_params

    base = REPO / "reports/uncertainty_study/intel/pixel_mahalanobis/third"
    third = json.loads((base / "third_test.json").read_text())
    test = third["arms"]["third"]
    pooled = test["energy_pixel_mahalanobis_minus_energy_pixel/heldout_pooled"]
    novel = test["energy_pixel_mahalanobis_minus_energy_pixel/novel_vs_screen"]
    assert pooled["n"] == 12 and pooled["ci_low"] > 0 and novel["ci_low"] > -0.01  # the rule, (a) and (b)
    assert UncertaintyConfig().novelty == load_params(REPO / "params.yaml").uncertainty.novelty == \
        "energy_pixel_mahalanobis"

    screens = third["per_run"]["third"].values()
    for row, key, g in (("held-out pooled", "heldout_pooled", pooled),
                        ("novel phenotype vs screen cells in a training state", "novel_vs_screen", novel)):
        ahead = sum(r[f"energy_pixel_mahalanobis_minus_energy_pixel/{key}"] > 0 for r in screens)
        means = f"{test[f'energy_pixel/{key}']['mean']:.3f} | {test[f'energy_pixel_mahalanobis/{key}']['mean']:.3f}"
        assert _table_row(row) == f"| {row} | {means} | **{_signed_interval(g)}** | {ahead} of 12 |", row
    every = json.loads((base / "seventeen_screens.json").read_text())
    arm, runs = every["arms"]["all"], every["per_run"]["all"].values()
    flagged = [r["energy_pixel_mahalanobis/heldout_pooled"] for r in runs]
    novel17 = [r["energy_pixel_mahalanobis/novel_vs_screen"] for r in runs]

    def figure(key: str) -> str:
        return f"{arm[key]['mean']:.3f} [{arm[key]['ci_low']:.3f}, {arm[key]['ci_high']:.3f}]"

    said = (f"Over all seventeen new screens the default flags the held-out classes at "
            f"{figure('energy_pixel_mahalanobis/heldout_pooled')} pooled (0.85 or more on "
            f"{sum(v >= 0.85 for v in flagged)} screens) and the screen's novel phenotype at "
            f"{figure('energy_pixel_mahalanobis/novel_vs_screen')} (0.95 or more on {sum(v >= 0.95 for v in novel17)}, "
            f"below 0.9 on {sum(v < 0.9 for v in novel17)}:")
    assert len(flagged) == 17 and said in README_FLAT, said
    gains = [_signed_interval(arm[f"energy_pixel_mahalanobis_minus_{k}"]) for k in
             ("energy_pixel/heldout_pooled", "energy_pixel/novel_vs_screen", "pixel_knn/heldout_pooled",
              "pixel_knn/novel_vs_screen")]
    said = f"it gains {gains[0]} pooled and {gains[1]} on the novel phenotype, and flags the held-out classes at"
    assert said in README_FLAT, said
    assert f"the default minus `pixel_knn` is {gains[2]} pooled and {gains[3]} on the novel phenotype" in README_FLAT


def test_the_discovery_queue_against_the_model_matches_its_file() -> None:
    """RESULTS' figures for the queue against the model's own novelty and against the controls, each a range over
    the five screens of the file the benchmark wrote."""
    runs = json.loads((REPO / "reports/discovery_transfer.json").read_text())["runs"].values()

    def span(queue: str, key: str, fmt: str = "{:.3f}") -> str:
        values = [r[queue][key] for r in runs]
        return f"{fmt.format(min(values))}-{fmt.format(max(values))}"

    on_top = sum(r["model@0.95"]["planted_gene_on_top"] for r in runs)
    said = (f"separates it at {span('model@0.95', 'auroc_novel_vs_trained_states')}, and a queue against it puts the "
            f"planted gene on top on {on_top} of {len(runs)} screens, but flags only "
            f"{span('model@0.95', 'n_flagged_novel', '{}')} of the novel cells against the controls reference's "
            f"{span('controls@0.95', 'n_flagged_novel', '{}')}")
    assert said in README_FLAT, said
    assert f"phenotype at {span('controls@0.95', 'auroc_novel_vs_trained_states')} (" in README_FLAT
    assert f"untrained networks: {span('controls@0.95', 'cells_per_second', '{:,.0f}')} cells/s" in README_FLAT


def test_the_pipeline_ensembles_novelty_rows_match_their_studies() -> None:
    """The novelty table's rows for the pipeline's ensemble, the default score and the one before it, each from the
    study run on that ensemble; the default's study reproduces what `make run` evaluated."""
    base = REPO / "reports/uncertainty_study/intel"
    evaluated = json.loads((REPO / "metrics/evaluate.json").read_text())["heldout/density/auroc"]
    for label, study, score in (
            ("`energy_pixel_mahalanobis` (the default), the pipeline's ensemble on the default screen",
             "pixel_mahalanobis/pipeline", "energy_pixel_mahalanobis"),
            ("`energy_pixel`, the same ensemble", "pixel/pipeline", "energy_pixel")):
        got = json.loads((base / study / "calibration.json").read_text())["summary"]
        keys = ("heldout_pooled", "heldout_unstimulated", "heldout_ei24_ko", "heldout_timecourse",
                "novel_vs_screen_trained_states")
        figures = " | ".join(f"{got[f'novelty/{score}/{k}']:.3f}" for k in keys)
        assert _table_row(label) == f"| {label} | {figures} |", label
        if score == "energy_pixel_mahalanobis":
            assert f"{got[f'novelty/{score}/heldout_pooled']:.6f}" == f"{evaluated:.6f}"


def test_the_pooled_calibration_count_matches_the_study_files() -> None:
    """Issue 13's "never worse than the mean member beyond noise": every ensemble in every calibration study."""
    runs = [r["pooled"] for f in sorted((REPO / "reports/uncertainty_study").rglob("calibration.json"))
            for r in json.loads(f.read_text()).get("runs", []) if "ece_diff_ci_low" in r.get("pooled", {})]
    worse, better = sum(r["ece_diff_ci_low"] > 0 for r in runs), sum(r["ece_diff_ci_high"] < 0 for r in runs)
    pipeline = json.loads((REPO / "metrics/evaluate.json").read_text())
    assert worse == 0 and not pipeline["ensemble_vs_single/ece_diff_ci_low"] > 0
    said = (f"{len(runs)} measurements in `reports/uncertainty_study/` (a few of them the same ensemble measured "
            f"again), {better} of them better than the mean member beyond noise")
    assert said in README_FLAT, said
    screens = [r for seed in (8, 1, 11, 12, 13) for r in json.loads(
        (REPO / f"reports/uncertainty_study/intel/pixel_mahalanobis/seed{seed}/calibration.json").read_text())["runs"]]
    ece, atc = [r["pooled"]["ece"] for r in screens], [r["label_free"]["ece"] for r in screens]
    said = (f"on five new screens (the novelty tests, `intel/pixel_mahalanobis/`) {sum(e <= 0.015 for e in ece)} of "
            f"{len(ece)} at or below 0.015, mean {sum(ece) / len(ece):.4f}, ATC's label-free temperature no help there "
            f"(mean {sum(atc) / len(atc):.4f})")
    assert said in README_FLAT, said
    third = json.loads((REPO / "reports/uncertainty_study/intel/pixel_mahalanobis/third/third_test.json").read_text())
    runs = list(third["per_run"]["third"].values())
    ece, atc = [r["ece"] for r in runs], [r["ece_label_free"] for r in runs]
    said = (f"on twelve more (one ensemble each, `intel/pixel_mahalanobis/third/`) {sum(e <= 0.015 for e in ece)} of "
            f"{len(ece)}, mean {sum(ece) / len(ece):.4f} (ATC's temperature mean {sum(atc) / len(atc):.4f})")
    assert said in README_FLAT, said


def test_the_slide_shift_explanation_matches_its_file() -> None:
    """Why the seed-11 screen's novel cells were missed: one slide's LC3B gain beyond the training slides'."""
    d = json.loads((REPO / "reports/uncertainty_study/intel/pixel_mahalanobis/slide_shift.json").read_text())
    s11 = d["data/nov11@11"]
    shifted, other = s11["screen_slides"]["screen_s2"], s11["screen_slides"]["screen_s1"]
    low, high = s11["training_slides"]["lc3b_gain"]
    assert shifted["lc3b_gain"] > high  # the README's "above"
    said = (f"LC3B camera gain of {shifted['lc3b_gain']:.2f}, above the {low:.2f}-{high:.2f} of every slide the training "
            f"cells came from, so all its cells look new. `pixel_knn` flags the novel cells at "
            f"{other['pixel_knn_auroc']:.3f} on the other slide and {shifted['pixel_knn_auroc']:.3f} on that one")
    assert said in README_FLAT, said
    scaled = (f"own cells does not undo it ({s11['pixel_knn_all_slides']:.3f} -> "
              f"{s11['pixel_knn_all_slides_scaled_per_slide']:.3f})")
    assert scaled in README_FLAT, scaled
    assert len(d) == 6 and all(r["queue"]["controls"]["planted_gene_on_top"] for r in d.values())  # "all six screens"
    missed = sorted(k for k, r in d.items() if not r["queue"]["model"]["planted_gene_on_top"])
    assert missed == ["data/nov11@11", "data/nov12@12"]  # "misses it on that screen and on `synth.seed` 12"


def test_the_seed_20_slides_match_their_file() -> None:
    """Why the third test's hardest screen is hard: its two slides' batch effects beyond the training slides', and
    the shifted seed-14 slide whose novel cells are flagged anyway, as the exploratory run wrote them."""
    d = json.loads((REPO / "reports/uncertainty_study/intel/pixel_mahalanobis/third/slide_shift.json").read_text())
    s20, s14 = d["data/nov20@20"], d["data/nov14@14"]
    one, two = s20["screen_slides"]["screen_s1"], s20["screen_slides"]["screen_s2"]
    expression, blur = s20["training_slides"]["lc3_expression"], s20["training_slides"]["blur_px"]
    size = s20["training_slides"]["cell_size"][1]
    assert one["lc3_expression"] > expression[1] and two["blur_px"] > blur[1]  # "beyond every training slide's"
    assert one["cell_size"] > size and two["cell_size"] > size  # "cells larger on both"
    said = (f"(one LC3 expression {one['lc3_expression']:.2f} against the training slides' {expression[0]:.2f}-"
            f"{expression[1]:.2f}, the other focus blur {two['blur_px']:.2f} px against {blur[0]:.2f}-{blur[1]:.2f}, and "
            f"cells larger on both), and `pixel_knn` flags the novel cells at {one['pixel_knn_auroc']:.3f} and "
            f"{two['pixel_knn_auroc']:.3f} on them")
    assert said in README_FLAT, said
    shifted, train14 = s14["screen_slides"]["screen_s1"], s14["training_slides"]
    assert shifted["lc3_expression"] < train14["lc3_expression"][0] and shifted["blur_px"] < train14["blur_px"][0]
    gain = train14["lc3b_gain"]
    said = (f"(LC3B gain {shifted['lc3b_gain']:.2f} against {gain[0]:.2f}-{gain[1]:.2f}, LC3 expression and focus blur "
            f"below theirs) and its novel cells are flagged at {shifted['pixel_knn_auroc']:.3f}")
    assert said in README_FLAT, said


def test_the_pixel_mahalanobis_scoring_speeds_match_their_file() -> None:
    speed = {k: v["cells_per_second"] for k, v in json.loads(
        (REPO / "reports/uncertainty_study/intel/pixel_mahalanobis/novelty_scores.json").read_text())["kinds"].items()}
    said = (f"`energy` scored {speed['energy']:,.0f} cells/s, `energy_pixel` {speed['energy_pixel']:,.0f} "
            f"({speed['energy_pixel'] / speed['energy']:.2f}x), `energy_pixel_mahalanobis` "
            f"{speed['energy_pixel_mahalanobis']:,.0f} ({speed['energy_pixel_mahalanobis'] / speed['energy']:.2f}x), "
            f"`pixel_knn` {speed['pixel_knn']:,.0f} ({speed['pixel_knn'] / speed['energy']:.2f}x) and "
            f"`pixel_knn_mahalanobis` {speed['pixel_knn_mahalanobis']:,.0f} "
            f"({speed['pixel_knn_mahalanobis'] / speed['energy']:.2f}x)")
    assert said in README_FLAT, said


def _table_row(first_cell: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"one README table row should start with {first_cell!r}"
    return rows[0]


def _row_after(head: str) -> str:
    """The table row right below the one that starts ``| head |`` (the same measurement on another machine)."""
    lines = README.splitlines()
    after = lines[lines.index(_table_row(head)) + 1]
    assert after.startswith("| the same |"), after[:80]
    return after


NUMBER_WORDS = {"three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
SPAN = r"(\d+) min (\d+) s to (\d+) min (\d+) s"


def _span(said: re.Match, first: int) -> tuple[int, int]:
    """Seconds of the ``A min B s to C min D s`` groups starting at group ``first``."""
    g = [int(said[first + i]) for i in range(4)]
    return g[0] * 60 + g[1], g[2] * 60 + g[3]


def test_make_run_timings_match_their_records() -> None:
    """The README's `make run` rows (Intel, then AMD below it): the last run and the span of the runs it names before
    it, as their records' seconds."""
    head = "`make run` (`make install` with pip's cache warm, then `dvc repro`)"
    for machine, row in (("intel", _table_row(head)), ("amd", _row_after(head))):
        said = re.search(rf"\| (\d+) min (\d+) s at `(\w+)`; the (\w+) runs before it, {SPAN} \(([^)]*)\)", row)
        assert said, row[:160]
        seconds = {}
        for sha in [said[3], *re.findall(r"`(\w+)`", said[9])]:
            record = json.loads((REPO / f"reports/make_run/{machine}_{sha}.json").read_text())
            assert record["commit"] == sha and record["rc"] == 0
            seconds[sha] = record["seconds"]
        latest = seconds.pop(said[3])
        assert (int(said[1]), int(said[2])) == divmod(latest, 60), (machine, said[0])
        assert NUMBER_WORDS[said[4]] == len(seconds), (machine, said[4], sorted(seconds))
        assert _span(said, 5) == (min(seconds.values()), max(seconds.values())), (machine, seconds)


def _wall_seconds(wall: str) -> float:
    m, s = re.match(r"(\d+)m([\d.]+)s", wall).groups()
    return int(m) * 60 + float(s)


def _matches(said: tuple[int, int], wall: float) -> bool:
    """\"12m12.8s\" reads as 12 min 12 s or 13 s (the records' history holds both roundings)."""
    return said[0] * 60 + said[1] in (int(wall), round(wall))


def test_ci_timings_and_counts_match_their_records() -> None:
    """The README's CI rows: the last run's wall clock, test time and counts, and the span of the runs before it, as
    `reports/make_run/ci_intel.json` and `ci_amd.json` have them."""
    head = "`.ci/run` (install, then `make test`'s suite)"
    for machine, row in (("intel", _table_row(head)), ("amd", _row_after(head))):
        runs = json.loads((REPO / f"reports/make_run/ci_{machine}.json").read_text())["runs"]
        latest = runs[-1]
        said = re.search(r"\| (\d+) min (\d+) s \(the tests (\d+) min (\d+) s[^)]*?: (\d+ passed, \d+ skipped)[^)]*\) "
                         r"at `(\w+)`", row)
        assert said and said[6] == latest["commit"], row[:160]
        assert _matches((int(said[1]), int(said[2])), _wall_seconds(latest["wall"]))
        assert latest["pytest"].startswith(said[5])
        pytest_time = re.search(r"\(0:(\d+):(\d+)\)", latest["pytest"])
        assert (int(said[3]), int(said[4])) in {(int(pytest_time[1]), int(pytest_time[2])),
                                                divmod(round(float(re.search(r"in ([\d.]+)s", latest["pytest"])[1])), 60)}
        if machine == "intel":
            span = re.search(rf"the last (\d+) runs, {SPAN}", row)
            before = runs[-int(span[1]):]
            spans = [(span, before)]
        else:
            span = re.search(rf"the (\d+) runs since the suite runs in two workers \(`(\w+)` on\), {SPAN}", row)
            first = [r["commit"] for r in runs].index(span[2])
            assert len(runs) - first == int(span[1])
            one_process = re.search(rf"the three before them, in one process, {SPAN}", row)
            spans = [(span, runs[first:]), (one_process, runs[:first])]
            assert len(runs[:first]) == 3
        for said_span, group in spans:
            walls = [_wall_seconds(r["wall"]) for r in group]
            low, high = _span(said_span, said_span.re.groups - 3)
            assert _matches(divmod(low, 60), min(walls)) and _matches(divmod(high, 60), max(walls)), (machine, low, high)


def test_the_readmes_own_headline_table_matches_the_files() -> None:
    """The README's short answers (RESULTS.md has the full ones) are checked on the README alone, row by row."""
    readme = (REPO / "README.md").read_text()
    def row(question: str) -> str:
        rows = [line for line in readme.splitlines() if line.startswith(f"| {question}")]
        assert len(rows) == 1, question
        return rows[0]

    ev = json.loads((REPO / "metrics/evaluate.json").read_text())
    vgg = json.loads((REPO / "metrics/baseline_vgg.json").read_text())
    said = row("Is the classifier good?")
    assert f"balanced accuracy {ev['balanced_accuracy']:.3f}, ECE {ev['ece']:.3f} (" in said
    assert f"the SPARCS VGG baseline {vgg['balanced_accuracy']:.3f} at" in said

    targets = REPO / "reports/screen/targets"
    ours = json.loads((targets / "seeds30_quiet/targets.json").read_text())["spatial"]  # today's default null
    mageck = json.loads((targets / "seeds30/targets.json").read_text())["mageck"]  # the same 30 screens' counts
    assert ours["recall_effect_ge_0.5"] == 1.0  # "every hit of effect >= 0.5 found"
    assert (f"false discovery proportion {_fdp(ours)} at FDR 0.1 over {len(ours['fdp_per_seed'])} simulated "
            f"screens, no call on {ours['null_seeds_zero_called']} of {ours['null_seeds']} screens without hits; "
            f"MAGeCK on the same counts {mageck['fdp']:.3f}") in row("Are the screen's genes found")

    quiet = json.loads((REPO / "reports/screen/genome_scale/quiet/1.7e7/genome_scale.json").read_text())
    quiet = quiet["by_cells_per_replicate"]["17000000"]["spatial_quiet"]
    assert (f"{_fdp(quiet)} at FDR 0.1, {100 * quiet['recall']['4']:.0f} % of the genes with 4x the bin rate found, "
            f"{100 * quiet['recall']['2']:.0f} % of those with 2x") in row("Is the FDR still honest at genome scale?")

    transfer = json.loads((REPO / "reports/discovery_transfer.json").read_text())
    assert (f"top cluster on {transfer['planted_gene_on_top_at_default']} of {transfer['screens']} simulated screens"
            in row("Does the discovery queue find"))

    table = (REPO / "benchmarks/studies/results_intel.md").read_text()
    lpft = next(line for line in table.splitlines() if line.startswith("| lpft_dlr | 3 |"))
    diff, low, high = re.search(r"\| ([+-][\d.]+) \| \[([+-][\d.]+), ([+-][\d.]+)\] \| yes \|", lpft).groups()
    assert f"{points(float(diff))} points of balanced accuracy [{points(float(low))}, {points(float(high))}]" in row(
        "Do unlabeled cells help")

    al = row("Does active learning beat random?")
    for config in ("seed6_2500", "seed7_ei24"):
        d = json.loads((REPO / f"reports/al_last_budget/{config}/seeds_at80.json").read_text())
        assert d["power_bald/diff_excludes_zero"]
        assert f"{points(d['power_bald/diff_mean'])} [{points(d['power_bald/diff_ci_low'])}, " \
               f"{points(d['power_bald/diff_ci_high'])}]" in al, config


def test_the_refit_novelty_example_matches_its_evaluation() -> None:
    """`spatial refit-novelty` to pixel_knn on the pipeline's champion, then `spatial evaluate`: the README's figures
    from the evaluate file; the members (so the probabilities) are the same, and the held-out AUROC is the one the
    novelty study measured for pixel_knn on the same ensemble through ``refit_novelty`` in Python."""
    refit = json.loads((REPO / "reports/uncertainty_study/intel/refit_pixel_knn/evaluate.json").read_text())
    default = json.loads((REPO / "metrics/evaluate.json").read_text())
    study = json.loads((REPO / "reports/uncertainty_study/intel/pixel/pipeline/calibration.json").read_text())
    assert refit["balanced_accuracy"] == default["balanced_accuracy"] and refit["nll"] == default["nll"]
    assert f"{refit['heldout/density/auroc']:.6f}" == f"{study['summary']['novelty/pixel_knn/heldout_pooled']:.6f}"
    said = (f"held-out classes at {refit['heldout/density/auroc']:.3f} pooled, to the last digit what the novelty study "
            f"measured for `pixel_knn` on this ensemble, with the same balanced accuracy "
            f"{refit['balanced_accuracy']:.3f} and ECE {refit['ece']:.3f}")
    assert said in README_FLAT, said


def test_the_encoder_ensembles_true_error_rate_figures_match_their_files() -> None:
    """What one temperature lacks on new slides (issue 13's ECE target): label_free_posthoc.py's files for the 18
    encoder ensembles, and the validation errors ATC's threshold rests on, counted in their saved logits."""
    import numpy as np

    from training.uncertainty.calibration import pooled_log_probs

    folds = [REPO / f"reports/uncertainty_study/intel/{d}" for d in ("folds_encoder", "folds_encoder_rep")]
    runs = [r for d in folds for r in json.loads((d / "label_free_posthoc.json").read_text())["runs"]]
    true, atc = np.array([r["ece"]["true"] for r in runs]), np.array([r["ece"]["atc"] for r in runs])
    gap = np.array([r["predicted_error"]["atc"] - r["predicted_error"]["true"] for r in runs])
    assert len(runs) == 18 and (true <= 0.015).all() and gap.mean() < 0  # "all 18", "too low"
    errors = []
    for d in folds:
        for path in sorted(d.glob("*/logits_seed*.npz")):
            with np.load(path) as f:
                errors.append(int((pooled_log_probs(f["val_logits"]).argmax(1) != f["val_y"]).sum()))
    assert len(errors) == 18
    for said in (
        f"one temperature would reach it on all 18 ({true.mean():.4f}), so what is missing is that rate, which ATC "
        f"under-predicts by {-gap.mean() * 100:.2f} points on average",
        f"all 18 encoder ensembles would meet it ({true.mean():.4f}): what is missing is that rate, which ATC "
        f"under-predicts by {-gap.mean() * 100:.2f} points on average",
        f"one temperature would give {true.mean():.4f} and all 18 at or below 0.015 (at most {true.max():.4f}), where "
        f"ATC predicts it too low on {(gap < 0).sum()} of 18, by {-gap.mean() * 100:.2f} points on average, from a "
        f"threshold set by {min(errors)} to {max(errors)} validation errors among 240 cells",
        f"ATC's label-free one, {(atc <= 0.015).sum()} of 18 at or below 0.015",
    ):
        assert said in README_FLAT, said


def test_the_amd_make_run_figures_match_its_files() -> None:
    """The Determinism paragraph's run on another kind of CPU: its figures from the metrics that run wrote, beside the
    committed (Intel) ones."""
    amd = {n: json.loads((REPO / f"reports/make_run/amd_fcaa842/{n}.json").read_text()) for n in ("evaluate", "hits")}
    intel = {n: json.loads((REPO / f"metrics/{n}.json").read_text()) for n in ("evaluate", "hits")}
    a, i = amd["evaluate"], intel["evaluate"]
    said = (f"balanced accuracy {a['balanced_accuracy']:.3f} against {i['balanced_accuracy']:.3f}, ECE {a['ece']:.4f} "
            f"against {i['ece']:.4f} (`ece_calibration_p` {a['ece_calibration_p']:.3f}: beyond what sampling noise "
            f"gives) and held-out classes {a['heldout/density/auroc']:.3f} against {i['heldout/density/auroc']:.3f}; "
            f"the hit caller makes {amd['hits']['spatial/n_called']} calls with no false one against "
            f"{intel['hits']['spatial/n_called']} with one")
    assert said in README_FLAT, said
    assert amd["hits"]["spatial/false_discoveries"] == 0 and intel["hits"]["spatial/false_discoveries"] == 1
    assert a["ece"] > 0.015 >= i["ece"] and a["ece_calibration_p"] < 0.05  # "the ECE target is missed" there
    same_pair = [r["pooled"]["ece"] for d in ("intel/folds_encoder", "intel/folds_encoder_rep", "amd/folds_encoder_rep2")
                 for r in json.loads((REPO / f"reports/uncertainty_study/{d}/s2s3/calibration.json").read_text())["runs"]]
    said = (f"nine study ensembles fine-tuned from an encoder (three encoders; six ensembles on Intel, three on AMD) "
            f"score {min(same_pair):.4f} to {max(same_pair):.4f}")
    assert len(same_pair) == 9 and said in README_FLAT, said


def test_the_jeffreys_prior_atc_test_matches_its_files() -> None:
    """The declared test of ATC with Jeffreys' prior: the rule's outcome read from its files (plain ATC ships), the
    fresh nine's figures, and the study's own label-free ECE equal to the script's ATC arm on the same logits."""
    import inspect

    from training.uncertainty.shift import atc_threshold

    sets = {n: json.loads((REPO / f"reports/uncertainty_study/atc_jeffreys/{n}.json").read_text())
            for n in ("fresh", "scratch_folds", "others", "folds27", "encoder27")}
    gain = {n: d["summary"]["minus_atc/atc_jeffreys"] for n, d in sets.items()}
    assert gain["folds27"]["n"] == 27 and gain["others"]["n"] == 16
    adopt = gain["folds27"]["ci_high"] < 0 and not gain["others"]["ci_low"] > 0
    assert not adopt and "prior" not in inspect.signature(atc_threshold).parameters  # plain ATC ships
    fresh, enc = sets["fresh"]["summary"], sets["encoder27"]["summary"]
    study = [r["label_free"]["ece"] for f in sorted((REPO / "reports/uncertainty_study/amd/folds_encoder_rep2").glob(
        "*/calibration.json")) for r in json.loads(f.read_text())["runs"]]
    assert sorted(study) == pytest.approx(sorted(r["ece"]["atc"] for r in sets["fresh"]["runs"]))

    for said in (
        f"ATC {fresh['ece/atc']:.4f}, **{fresh['at_most_0.015/atc']} of 9** at or below 0.015, so the target stays "
        f"unmet; with the prior {fresh['ece/atc_jeffreys']:.4f} and {fresh['at_most_0.015/atc_jeffreys']} of 9",
        f"changes ECE by {_signed_interval(gain['folds27'], 4)}, on sixteen other ensembles by "
        f"{_signed_interval(gain['others'], 4)}",
        f"ATC gives {enc['ece/atc']:.4f} and {enc['at_most_0.015/atc']} of 27",
        f"one temperature gives {fresh['at_most_0.015/true']} of the fresh 9 ({enc['at_most_0.015/true']} of 27",
        f"sets it from the slide's unlabeled cells ({enc['ece/atc']:.3f} on average over 27 ensembles, "
        f"{enc['at_most_0.015/atc']} at or below 0.015)",
        f"ATC {fresh['at_most_0.015/atc']} of 9 ({enc['at_most_0.015/atc']} of 27 in all, {enc['ece/atc']:.4f}), the "
        f"true rate matched {fresh['at_most_0.015/true']} of 9",
    ):
        assert said in README_FLAT, said


def test_the_quiet_screen_alone_test_matches_its_files() -> None:
    """The declared test of `hits.gene_null: quiet_screen` against the default: honesty per size read from the
    files, the rule's outcome (the default stays), and the figures RESULTS quotes."""
    from training.config import HitsConfig

    runs = {g: _one_coverage(REPO / f"reports/screen/library_size/quiet_only_{g}/genome_scale.json")
            for g in (250, 1000, 4000)}
    runs[20000] = _one_coverage(REPO / "reports/screen/genome_scale/quiet_only_1.7e7/genome_scale.json")
    honest, gain = {}, {}
    for genes, run in runs.items():
        q = run["spatial_quiet_only"]
        honest[genes] = (_honest(q, ("0.01", "0.001", "0.0001", "1e-05"), 3) if genes == 20000 else _honest(q))
        d = q["minus_spatial"]["recall_all"]
        gain[genes] = d
        assert f"{d['mean']:+.3f} [{d['95ci'][0]:+.3f}, {d['95ci'][1]:+.3f}]" in README_FLAT, genes
    honest[60] = _honest_60(json.loads((REPO / "reports/screen/library_size/60_quiet_only/targets.json").read_text())[
        "spatial"])
    assert [g for g in (60, 250, 1000, 4000, 20000) if not honest[g]] == [250, 4000]
    assert all(gain[g]["95ci"][0] > 0 for g in (250, 1000))  # part (2) held; part (1) did not
    assert HitsConfig().gene_null == "nt_and_quiet_screen"  # the rule's outcome
    q250, q4000 = runs[250]["spatial_quiet_only"], runs[4000]["spatial_quiet_only"]
    b250 = q250["null_genes_below"]
    for said in (
        f"({b250['0.01']['observed']} against {b250['0.01']['expected']:.0f} expected at 250 genes; the default "
        f"{runs[250]['spatial']['null_genes_below']['0.01']['observed']})",
        f"at 250 genes {q250['null_screens'] - q250['null_screens_zero_called']} of 60 screens without hits had",
        f"the quiet screen null alone: {gain[250]['mean'] * 100:.1f} points more recall at 250 genes",
        f"({b250['0.001']['observed']} against {b250['0.001']['poisson_95'][1]}, "
        f"{q4000['null_genes_below']['0.001']['observed']:,} against {q4000['null_genes_below']['0.001']['poisson_95'][1]:,})",
    ):
        assert said in README_FLAT, said


def test_the_test_worker_figures_match_their_record() -> None:
    """`make test`'s two workers against one process: both pytest durations and the count from the timed record."""
    record = json.loads((REPO / "reports/make_run/test_workers_amd.json").read_text())
    runs = {run["workers"]: run for run in record["runs"]}

    def minutes(run: dict) -> str:
        m, s = re.search(r"\((\d+):(\d+):(\d+)\)", run["pytest"]).groups()[1:]
        return f"{int(m)} min {int(s)} s"

    (passed,) = {re.match(r"(\d+) passed", run["pytest"])[1] for run in runs.values()}  # the same count in both
    said = (f"one clone of `{record['commit']}`, back to back: {minutes(runs[0])} in one process, {minutes(runs[2])} "
            f"in two, the same {passed} tests passing")
    assert said in README_FLAT, said
    assert all(run["rc"] == 0 for run in runs.values())


def test_the_second_amd_make_run_wrote_the_first_ones_metrics() -> None:
    """Same seeds, same kind of CPU, a later session: the metrics files the record hashes are the first AMD run's."""
    import hashlib

    for later in ("3a2a767", "f5116dc", "8cb9bf1", "0397b22", "bc5746c", "fc450fc", "447e91d"):  # f5116dc: after this session's bad-input fixes in training/ and serving/
        record = json.loads((REPO / f"reports/make_run/amd_{later}.json").read_text())
        for name, md5 in record["md5"].items():
            kept = REPO / "reports/make_run/amd_fcaa842" / Path(name).name
            assert hashlib.md5(kept.read_bytes()).hexdigest() == md5, (later, name)
    record = json.loads((REPO / "reports/make_run/amd_3a2a767.json").read_text())
    said = (f"a `make run` in a later session (`reports/make_run/amd_{record['commit']}.json`) wrote "
            "`metrics/evaluate.json`, `hits.json` and `discovery.json` byte for byte as the first")
    assert said in README_FLAT, said


def test_the_untrained_network_study_matches_its_file() -> None:
    """Leave-one-class-out of untrained networks against `pixel_knn`: the declared rule's outcome (no architecture
    0.02 above `pixel_knn`, so its step 2 did not run), `pixel_knn` the Intel run's on every fold, and RESULTS' figures."""
    loco = json.loads((REPO / "reports/uncertainty_study/amd/random_features/loco.json").read_text())["result"]
    intel = json.loads((REPO / "reports/uncertainty_study/intel/pixel/loco.json").read_text())["seeds"][0]  # no model
    mean = loco["mean_auroc"]
    assert {f: loco["folds"][f]["pixel_knn"] for f in intel["folds"]} == pytest.approx(
        {f: v["pixel_knn"] for f, v in intel["folds"].items()}, abs=1e-3)
    assert not [a for a in ("random_vgg", "random_convnext_p1", "random_convnext") if mean[a] >= mean["pixel_knn"] + 0.02]
    low, high = sorted((mean["random_convnext"], mean["random_convnext_p1"]))
    said = (f"an untrained VGG scores {mean['random_vgg']:.3f}, below `pixel_knn`'s {mean['pixel_knn']:.3f} on the same "
            f"cells, and untrained ConvNeXts at either stem {low:.2f}-{high:.2f}, near chance")
    assert said in README_FLAT, said


def test_the_zen3_make_runs_match_their_records_and_files() -> None:
    """The third kind of CPU: the timing row's two runs as their records have them, both runs' metrics the kept
    files to the byte, and the Determinism paragraph's figures from those files."""
    import hashlib

    lines = README.splitlines()
    row = lines[lines.index(_row_after("`make run` (`make install` with pip's cache warm, then `dvc repro`)")) + 1]
    assert row.startswith("| the same |") and "family 25 model 1" in row, row[:80]  # the row below the AMD one
    said = re.search(r"\| (\d+) min (\d+) s at `(\w+)`; the run before it, (\d+) min (\d+) s \(`(\w+)`\)", row)
    assert said, row[:120]
    for minutes, seconds, sha in ((said[1], said[2], said[3]), (said[4], said[5], said[6])):
        record = json.loads((REPO / f"reports/make_run/zen3_{sha}.json").read_text())
        assert record["commit"] == sha and record["rc"] == 0 and "family 25 model 1" in record["machine"]
        assert divmod(record["seconds"], 60) == (int(minutes), int(seconds)), sha
        for name, md5 in record["md5"].items():
            kept = REPO / "reports/make_run/zen3_d10f119" / Path(name).name
            assert hashlib.md5(kept.read_bytes()).hexdigest() == md5, (sha, name)
    kept = {n: json.loads((REPO / f"reports/make_run/zen3_d10f119/{n}.json").read_text()) for n in ("evaluate", "hits")}
    e, h = kept["evaluate"], kept["hits"]
    said = (f"balanced accuracy {e['balanced_accuracy']:.3f}, ECE {e['ece']:.4f} (`ece_calibration_p` "
            f"{e['ece_calibration_p']:.3f}), held-out classes {e['heldout/density/auroc']:.3f}, "
            f"{h['spatial/n_called']} hit calls with no false one")
    assert said in README_FLAT, said
    assert h["spatial/false_discoveries"] == 0
    assert "| cpu_kernels | AVX2 |" in (REPO / "reports/make_run/zen3_d10f119/summary.md").read_text()
    ci = json.loads((REPO / "reports/make_run/ci_zen3.json").read_text())["runs"][-1]
    head = "`.ci/run` (install, then `make test`'s suite)"
    row = lines[lines.index(_row_after(head)) + 1]
    said = re.search(r"\| (\d+) min (\d+) s \(the tests (\d+) min (\d+) s in two pytest workers: (\d+ passed, \d+ skipped);"
                     r"[^)]*\) at `(\w+)` \| AMD EPYC family 25 model 1", row)
    assert said and said[6] == ci["commit"] and ci["rc"] == 0, row[:120]
    assert _matches((int(said[1]), int(said[2])), _wall_seconds(ci["wall"])) and ci["pytest"].startswith(said[5])
    assert f"(0:{int(said[3]):02d}:{int(said[4]):02d})" in ci["pytest"]
