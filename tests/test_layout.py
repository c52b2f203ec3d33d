"""The house rules, checked statically with the standard library's ``ast``: no import cycles, and every DVC stage
depends on all the code its command can import (so ``dvc repro`` never says "up to date" over changed code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from layout_tools import closure, cycles, has_code, import_graph, module_files

REPO = Path(__file__).resolve().parents[1]


def test_cycle_finder_finds_a_lazy_cycle(tmp_path: Path) -> None:
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text('"""map"""\n')
    (tmp_path / "training" / "a.py").write_text("from training import b\n")
    (tmp_path / "training" / "b.py").write_text("def f():\n    from training.a import x\n")
    (tmp_path / "training" / "c.py").write_text("import training.a\n")
    assert cycles(import_graph(tmp_path)) == [["training.a", "training.b"]]


def test_no_import_cycles() -> None:
    assert cycles(import_graph(REPO)) == []


def test_packages_import_one_way() -> None:
    """serving (with the command line) -> tuning -> training, never back: ``training`` imported ``serving`` and
    ``tuning`` while the command line lived in ``training/cli``, a cycle between the packages (not between modules)."""
    graph = import_graph(REPO)
    below = {"training": set(), "tuning": {"training"}, "serving": {"training", "tuning"}}
    upward = sorted((m, d) for m, deps in graph.items() for d in deps
                    if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in below[m.split(".")[0]])
    assert upward == []


def test_closure_follows_the_command_and_its_lazy_imports() -> None:
    train = closure(REPO, "spatial train --splits x --no-progress")
    assert {"training.regimes.semisupervised", "training.uncertainty.calibration", "training.workflow",
            "training.sim.synth"} <= train  # synth: read lazily for ssl.truth
    synth = closure(REPO, "spatial synth --no-progress")
    assert "training.sim.synth" in synth and "training.engine" not in synth  # other commands' lazy imports: no
    with pytest.raises(KeyError, match="no spatial command 'nope'"):
        closure(REPO, "spatial nope")


def _pipelines() -> list[Path]:
    skip = {".venv", ".dvc", ".git", "data", "models", "reports", "node_modules"}
    return [p for p in sorted(REPO.rglob("dvc.yaml")) if not skip & set(p.relative_to(REPO).parts[:-1])]


def _covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("pipeline", _pipelines(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_stage_depends_on_the_code_it_runs(pipeline: Path) -> None:
    files = module_files(REPO)
    missing = {}
    for name, stage in yaml.safe_load(pipeline.read_text())["stages"].items():
        stage = stage.get("do", stage)  # a foreach stage: its template
        wdir = (pipeline.parent / stage.get("wdir", ".")).resolve()
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        deps = [(wdir / (next(iter(d)) if isinstance(d, dict) else d)).resolve() for d in stage.get("deps", [])]
        mods = set().union(*(closure(REPO, c) for c in cmds))
        lacking = sorted(str(files[m].relative_to(REPO)) for m in mods
                         if has_code(files[m]) and not _covered(files[m].resolve(), deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"{pipeline.relative_to(REPO)}: stage deps miss code the command imports: {missing}"


def test_al_plot_shows_the_default_strategies() -> None:
    plots = yaml.safe_load((REPO / "benchmarks/studies/dvc.yaml").read_text())["plots"]
    curve = next(p["al_learning_curve"] for p in plots if isinstance(p, dict) and "al_learning_curve" in p)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert curve["y"]["../../reports/al/curve_mean.csv"] == params["al"]["strategies"]
