"""A damaged ensemble directory (a missing or junk weight or novelty file, impossible temperatures, weights that do
not fit the architecture in spec.json) is one ModelError line when it is loaded, and `spatial serve` exits 2 with that
line before BentoML starts (instead of a worker that fails and restarts forever)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.errors import ModelError
from training.uncertainty.ensemble import Ensemble

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ensemble(tiny_ensemble: Path, tmp_path: Path) -> Path:
    """A copy of the tiny ensemble to damage."""
    return Path(shutil.copytree(tiny_ensemble, tmp_path / "ensemble"))


def edit_spec(folder: Path, edit) -> None:
    spec_file = folder / "spec.json"
    spec = json.loads(spec_file.read_text())
    edit(spec)
    spec_file.write_text(json.dumps(spec, indent=2))  # NaN is written as the JSON extension `NaN`, as json reads it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_error(folder: Path) -> str:
    with pytest.raises(ModelError) as err:
        Ensemble.load(folder)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# -- spatial serve ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "junk"])
def test_serve_with_a_damaged_member_exits_2_before_bentoml(ensemble, damage):
    member = ensemble / "member_1.pt"
    if damage == "missing":
        member.unlink()
    else:
        member.write_text("junk\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "True"}
    out_file, err_file = ensemble.parent / "serve.out", ensemble.parent / "serve.err"
    # output to files, not pipes: BentoML's workers (their own sessions) would hold pipes open after a timeout
    with open(out_file, "w") as out_fh, open(err_file, "w") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--model", str(ensemble),
                                 "--port", str(free_port())], cwd=ROOT, env=env, stdout=out_fh, stderr=err_fh,
                                start_new_session=True)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # BentoML stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"spatial serve did not exit within 60 s (stdout: {out_file.read_text()[-500:]!r})")
    out, err = out_file.read_text(), err_file.read_text()
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err
    assert "serving" not in out  # failed before BentoML was started
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "member_1.pt" in lines[0] and str(ensemble) in lines[0]


# -- Ensemble.load ---------------------------------------------------------------------------------------------------
def test_a_junk_member_file_is_a_model_error(ensemble):
    (ensemble / "member_1.pt").write_text("junk\n")
    message = load_error(ensemble)
    assert str(ensemble) in message and "member_1.pt" in message


def test_a_missing_member_file_is_a_model_error(ensemble):
    (ensemble / "member_0.pt").unlink()
    message = load_error(ensemble)
    assert str(ensemble) in message and "member_0.pt is missing" in message


@pytest.mark.parametrize("content", ["junk", "pickled", "no_arrays"])
def test_a_junk_novelty_file_is_a_model_error(ensemble, content):
    file = ensemble / "novelty_1.npz"
    assert file.is_file()
    if content == "junk":
        file.write_text("junk\n")
    elif content == "pickled":
        np.savez(file, kind=np.array([{"a": 1}], dtype=object))
    else:
        np.savez(file, other=np.zeros(3))
    message = load_error(ensemble)
    assert str(ensemble) in message and "novelty_1.npz" in message
    assert "unsafely" not in message  # no advice to load an untrusted file with pickle


@pytest.mark.parametrize(("field", "value"), [
    ("pooled_temperature", float("nan")), ("pooled_temperature", 0), ("pooled_temperature", -1.0),
    ("pooled_temperature", float("inf")), ("temperatures", float("nan")), ("temperatures", 0.0),
    ("temperatures", -2.0),
])
def test_impossible_temperatures_in_the_spec_are_a_model_error(ensemble, field, value):
    def edit(spec):
        if field == "temperatures":
            spec["temperatures"][1] = value
        else:
            spec[field] = value

    edit_spec(ensemble, edit)
    message = load_error(ensemble)
    assert str(ensemble / "spec.json") in message
    assert (f"{field}[1]" if field == "temperatures" else field) in message


def test_weights_that_do_not_fit_the_architecture_are_one_line(ensemble):
    def edit(spec):
        spec["model"]["dims"] = [d * 2 for d in spec["model"]["dims"]]

    edit_spec(ensemble, edit)
    message = load_error(ensemble)
    assert str(ensemble) in message and "member_0.pt" in message and "spec.json" in message
    assert "do not fit" in message and len(message) < 400

