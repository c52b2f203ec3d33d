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

HEADLINE = {  # per metrics file: the keys shown in the main table (fnmatch patterns); everything is in the details
    "evaluate.json": ["balanced_accuracy", "nll", "ece", "calibration/*/ece", "calibration/*/ece_diff*",
                      "heldout/density/auroc", "heldout_*/density/auroc", "heldout/mutual_info/auroc"],
    "discovery.json": ["n_novel", "n_clusters", "top_cluster_n_cells", "top_cluster_top_gene",
                       "top_cluster_top_gene_fdr", "planted_novel_gene_is_top"],
    "ssl.json": ["*"], "al_seeds.json": ["*"], "hits.json": ["*"],
    # the al_transfer study, one file per unseen simulator configuration: per arm the AUBC and its interval, the
    # paired difference to random and whether its interval excludes zero
    "al_transfer_*.json": ["*/mean", "*/ci_low", "*/ci_high", "*/diff_*"],
}


def headline(name: str) -> list[str]:
    """The headline key patterns of a metrics file: its exact name's, else the first file-name pattern it matches."""
    if name in HEADLINE:
        return HEADLINE[name]
    return next((v for k, v in HEADLINE.items() if fnmatch.fnmatch(name, k)), [])


def machine() -> dict[str, str]:
    """Commit (with ``-dirty`` when the work tree differs), platform, CPU model, Python and torch versions."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
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


def write_summary(metrics_dir: str | os.PathLike, out: str | os.PathLike, info: dict[str, str] | None = None) -> Path:
    """One section per ``metrics_dir/*.json``: the headline keys as a table, all keys in a collapsed block."""
    from training.io.atomic import atomic_path

    info = info or machine()
    files = sorted(Path(metrics_dir).glob("*.json"))
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
        if head:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(flat[k])} |" for k in head] + [""]
        lines += ["<details><summary>all metrics</summary>", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
        lines += ["", "</details>"]
    with atomic_path(out, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return Path(out)
