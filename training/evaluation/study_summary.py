"""``reports/summary.md``: the figures of a pipeline run, written from ``metrics/*.json`` with the commit and machine
they came from, so the README can point at it instead of hand-copied numbers."""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import os
import platform
import subprocess
from pathlib import Path

from training.errors import DataError

HEADLINE = {  # per metrics file: the keys shown in the main table (fnmatch patterns); everything is in the details
    "evaluate.json": ["balanced_accuracy", "nll", "ece", "ece_if_calibrated_q95", "ece_calibration_p",
                      "calibration/*/ece", "calibration/*/ece_diff*", "label_free/*",
                      "heldout/density/auroc", "heldout_*/density/auroc", "heldout/mutual_info/auroc"],
    "discovery.json": ["n_novel", "n_clusters", "top_cluster_n_cells", "top_cluster_top_gene",
                       "top_cluster_top_gene_fdr", "planted_novel_gene_is_top"],
    "hits.json": ["*"],  # `spatial seeds` results (ssl.json, al_seeds.json, ...) get the arm table instead
}


def headline(name: str) -> list[str]:
    """The headline key patterns of a metrics file: its exact name's, else the first file-name pattern it matches."""
    if name in HEADLINE:
        return HEADLINE[name]
    return next((v for k, v in HEADLINE.items() if fnmatch.fnmatch(name, k)), [])


RUN_OUTPUTS = ("dvc.lock", "metrics/", "reports/")  # what a run itself writes into the work tree


def machine(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Commit, platform, CPU model, Python and torch versions.

    The commit gets ``-dirty`` when a tracked file other than a run's own outputs (:data:`RUN_OUTPUTS`) differs from
    it: a ``make run`` rewrites ``dvc.lock`` and the metrics, which says nothing about the code that ran."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    if any(not line[3:].split(" -> ")[-1].startswith(RUN_OUTPUTS) for line in changed):
        commit += "-dirty"
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = "not installed"
    return {"commit": commit, "platform": platform.platform(), "cpu": cpu or "unknown",
            "cpus": str(os.cpu_count()), "python": platform.python_version(), "torch": torch_version}


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v)


def arm_table(flat: dict) -> list[str]:
    """Markdown rows for a ``spatial seeds`` result (``<arm>/mean``, ``<arm>/ci_low``, ... ``<arm>/diff_*``): per arm
    the mean with its 95 % interval, and the paired difference to the baseline with its interval and whether the
    interval excludes zero. Empty when ``flat`` holds no arms."""
    arms = [k[: -len("/mean")] for k in flat if k.endswith("/mean") and f"{k[:-len('/mean')]}/ci_low" in flat]
    if not arms:
        return []

    def ci(arm: str, pre: str = "") -> str:
        lo, hi = flat.get(f"{arm}/{pre}ci_low"), flat.get(f"{arm}/{pre}ci_high")
        return "" if lo is None or lo != lo else f"[{lo:+.4f}, {hi:+.4f}]" if pre else f"[{lo:.4f}, {hi:.4f}]"

    rows = ["| arm | seeds | mean | 95 % interval | difference to baseline | 95 % interval | excludes zero |",
            "|---|---|---|---|---|---|---|"]
    for arm in arms:
        diff = flat.get(f"{arm}/diff_mean")
        rows.append(f"| {arm} | {flat.get(f'{arm}/n', '')} | {flat[f'{arm}/mean']:.4f} | {ci(arm)} | "
                    + ("baseline | | |" if diff is None else
                       f"{diff:+.4f} | {ci(arm, 'diff_')} | {'yes' if flat.get(f'{arm}/diff_excludes_zero') else 'no'} |"))
    return rows + [""]


def write_summary(metrics_dir: str | os.PathLike, out: str | os.PathLike, info: dict[str, str] | None = None) -> Path:
    """One section per ``metrics_dir/*.json``: the headline keys as a table, all keys in a collapsed block."""
    from training.io.atomic import atomic_path

    if not Path(metrics_dir).is_dir():
        raise DataError(f"{metrics_dir}: no such folder (the metrics JSON files the summary reads)")
    files = sorted(Path(metrics_dir).glob("*.json"))
    if not files:
        raise DataError(f"{metrics_dir}: no metrics JSON files (*.json) to summarise")
    info = info or machine()
    lines = ["# spatiAL run summary", "",
             f"Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC} from `{metrics_dir}/*.json` by the `summary` stage.",
             "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            lines += ["", f"## {f.name}", "", f"unreadable: {exc}"]
            continue
        if not isinstance(data, dict):
            continue
        flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
        patterns = headline(f.name)
        head = [k for k in flat if any(fnmatch.fnmatch(k, p) for p in patterns)]
        lines += ["", f"## {f.name}", ""]
        lines += arm_table(flat)
        if head:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(flat[k])} |" for k in head] + [""]
        lines += ["<details><summary>all metrics</summary>", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
        lines += ["", "</details>"]
    with atomic_path(out, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return Path(out)
