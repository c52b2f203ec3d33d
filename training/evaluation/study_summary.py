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
    """Commit, platform, CPU model, Python and torch versions, and the CPU kernels torch runs.

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
    return {"commit": commit, "platform": platform.platform(), "cpu": cpu_model(), "cpus": str(os.cpu_count()),
            "python": platform.python_version(), **torch_build()}


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's name with its x86 family and model: a cloud's "AMD EPYC" names several generations, whose kernels
    and speed differ (family 25 model 1 is Zen 3)."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def torch_build() -> dict[str, str]:
    """PyTorch's version and the CPU kernels it dispatches to (``AVX2``, ``AVX512``, ...): runs on machines whose
    kernels differ add up floating-point sums in another order, and their metrics differ in the last digits or more."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {"torch": "not installed", "cpu_kernels": "unknown"}
    return {"torch": torch.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


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
