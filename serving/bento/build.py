"""Build the Bento that carries a packaged model (``serving.bento.store``).

The build options come from ``bentofile.yaml`` (service, include / exclude, docker, envs, labels); three are set
here: ``models`` (the one store entry, copied into the Bento), the Bento argument ``spatial_model`` (its tag, how the
served Bento finds it) and the Python requirements: the runtime packages ``bentofile.yaml`` lists, with everything
they depend on, pinned at the versions of ``.ci/constraints.txt`` (the set ``make install`` installs), so a Bento
built today installs the same versions next year.
"""

from __future__ import annotations

import os
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from serving.bento.store import BENTO_ARG
from training.errors import ConfigError

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
FREEZE_OMITS = ("pip", "setuptools", "wheel")  # `pip freeze` leaves these out: pinned at the installed version


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: str | os.PathLike) -> dict[str, str]:
    """``name==version`` lines of a pip constraints file, keyed by canonical name."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name = line.split("==", 1)[0].split("[", 1)[0].strip()
            out[canonical(name)] = f"{name}=={line.split('==', 1)[1].strip()}"
    return out


def locked_requirements(roots: list[str], constraints: dict[str, str]) -> list[str]:
    """``roots`` and their installed dependency closure (markers evaluated here, extras not followed unless asked),
    each pinned as in ``constraints``; a package missing there is an error (the lock would be incomplete)."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [(r, frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = canonical(name)
        if key in seen and not extras:
            continue
        if key not in constraints and key in FREEZE_OMITS:
            constraints = {**constraints, key: f"{name}=={metadata.version(name)}"}
        if key not in constraints:
            raise ConfigError(f"{name}: needed by the service but not pinned in .ci/constraints.txt")
        seen[key] = constraints[key]
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            raise ConfigError(f"{name}: pinned but not installed, so its dependencies are unknown") from None
        for spec in requires:
            req = Requirement(spec)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return sorted(seen.values(), key=str.lower)


def check_store_outside(repo: str | os.PathLike) -> None:
    """Refuse a BentoML home inside the build context: a build copies the context while BentoML writes its
    temporary build folder into that home, so it copies into itself until a path is too long, and the tree it leaves
    breaks the next build too."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    home, repo = Path(BentoMLContainer.bentoml_home.get()).resolve(), Path(repo).resolve()
    if home == repo or repo in home.parents:
        raise ConfigError(f"the BentoML home {home} is inside the project folder {repo}, which the Bento is built "
                          "from; keep it outside (e.g. export BENTOML_HOME=~/bentoml)")


def build_bento(model_tag: str, repo: str | os.PathLike, bentofile: str = "bentofile.yaml",
                constraints: str = ".ci/constraints.txt") -> dict[str, Any]:
    """Build the Bento for ``model_tag``; returns its tag, size in bytes, build seconds and the requirement count."""
    import bentoml
    from bentoml._internal.bento.build_config import BentoEnvSchema

    repo = Path(repo).resolve()
    cfg = yaml.safe_load((repo / bentofile).read_text())
    roots = [m.group(1) for p in cfg.get("python", {}).get("packages", []) if (m := _NAME.match(p))]
    reqs = locked_requirements(roots, read_constraints(repo / constraints))
    labels = {**(cfg.get("labels") or {}), "model": model_tag.replace(":", "_")}
    t = time.perf_counter()
    bento = bentoml.bentos.build(
        cfg["service"], name=cfg.get("name"), labels=labels, description=cfg.get("description"),
        include=cfg.get("include"), exclude=cfg.get("exclude"), envs=[BentoEnvSchema(**e) for e in cfg.get("envs") or []], docker=cfg.get("docker"),
        python={"packages": reqs, "lock_packages": False}, models=[model_tag], build_ctx=str(repo),
        args={BENTO_ARG: model_tag},
    )
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in Path(bento.path).rglob("*") if f.is_file())
    return {"bento": str(bento.tag), "model": model_tag, "bytes": size, "build_s": round(seconds, 2),
            "requirements": len(reqs), "path": bento.path}
