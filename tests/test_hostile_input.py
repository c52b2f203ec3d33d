"""Issue 14 without a server: the safe HDF5 opening, the read limits, the shared pixel check, duplicated ids and a
failed `spatial score` recovered by the same command (the HTTP cases are in test_serving.py)."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import hostile
import numpy as np
import pandas as pd
import pytest
from conftest import run_main

from training.errors import DataError
from training.io.atomic import atomic_path, check_destination
from training.io.formats import CellFile
from training.io.hdf5 import ENV_ALLOW_EXTERNAL, LimitExceeded, ReadLimits
from training.io.pixels import bad_cells, describe_cell
from training.io.tables import cell_ids


@pytest.fixture(scope="module")
def screen(tiny_manifest):
    path = tiny_manifest.parent / "screen_s0.h5sc"
    with CellFile(path) as f:
        return path, f.read(0, f.n_cells), f.cell_ids()


@pytest.fixture
def no_env_trust(monkeypatch):
    monkeypatch.delenv(ENV_ALLOW_EXTERNAL, raising=False)


# -- one safe opening function -----------------------------------------------------------------------------------
def test_files_that_read_other_files_are_refused(screen, tmp_path, no_env_trust):
    path, images, _ = screen
    cases = [(hostile.external_storage(tmp_path, images), "external raw storage in"),
             (hostile.external_link(tmp_path, path), "external link to"),
             (hostile.virtual_dataset(tmp_path, path), "virtual dataset")]
    for file, what in cases:
        with pytest.raises(DataError, match=what) as err:
            CellFile(file)
        assert str(file) in str(err.value) and "root:x" not in str(err.value)


def test_own_linked_files_open_when_trusted(screen, tmp_path, monkeypatch):
    path, images, ids = screen
    link, virtual = hostile.external_link(tmp_path, path), hostile.virtual_dataset(tmp_path, path)
    with CellFile(link, allow_external=True) as f:
        np.testing.assert_array_equal(f.cell_ids(), ids)
        np.testing.assert_array_equal(f.read(0, 5), images[:5])
    monkeypatch.setenv(ENV_ALLOW_EXTERNAL, "1")  # what --allow-external-hdf5 sets for loader workers
    with CellFile(virtual) as f:
        np.testing.assert_array_equal(f.read(70, 80), images[70:80])
    with pytest.raises(DataError, match="virtual dataset"):
        CellFile(virtual, allow_external=False)  # an explicit refusal (uploads) wins over the environment


def test_limits_are_checked_from_metadata_before_reading(screen, tmp_path):
    _, images, _ = screen
    many = hostile.claims_many_cells(tmp_path)
    assert many.stat().st_size < 20_000
    with pytest.raises(LimitExceeded, match="200000000 cells; expected at most 1000 \\(max_cells\\)"):
        CellFile(many, limits=ReadLimits(max_cells=1000))
    one = hostile.one_big_chunk(tmp_path, images[:40])
    with pytest.raises(LimitExceeded, match="chunks of 0.4 MB decoded"):
        CellFile(one, limits=ReadLimits(max_chunk_bytes=2**18))
    with pytest.raises(LimitExceeded, match="32x32 pixels; expected at most 16"):
        CellFile(one, limits=ReadLimits(max_side=16))
    with pytest.raises(LimitExceeded, match="5 channels; expected at most 4"):
        CellFile(one, limits=ReadLimits(max_channels=4))
    with CellFile(one, limits=ReadLimits(1000, 32, 5, 2**20, 2**20)) as f:  # within every limit: readable
        np.testing.assert_array_equal(f.read(0, 40), images[:40])


def test_cell_ids_are_read_in_blocks(screen):
    path, _, ids = screen
    with CellFile(path) as f:
        np.testing.assert_array_equal(f.cell_ids(block=7), ids)
        np.testing.assert_array_equal(f.cell_ids(10, 31, block=4), ids[10:31])


# -- one pixel check -------------------------------------------------------------------------------------------------
def test_pixel_check_finds_every_bad_cell():
    x = np.full((6, 1, 4, 4), 0.5, np.float32)
    x[1, 0, 0, 0] = 1e30
    x[3, 0, 1, 1] = np.nan
    x[4, 0, 2, 2] = -0.01
    x[5, 0, 3, 3] = 1.0  # the edges are accepted
    x[0, 0, 0, 1] = 0.0
    assert bad_cells(x).tolist() == [1, 3, 4]
    assert describe_cell(x[1]) == "a pixel value of 1e+30" and describe_cell(x[3]) == "NaN or Inf pixels"


def test_stored_values_outside_0_1_are_refused_with_the_row(screen, tmp_path):
    _, images, ids = screen
    bad = hostile.out_of_range(tmp_path, images, ids, row=33, value=2.5)
    with CellFile(bad) as f, pytest.raises(DataError, match="row 33 holds a pixel value of 2.5; expected finite"):
        f.read(0, 80)


# -- the CLI: exit 2, one line, and the same command recovers -----------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["bins", "--scores", "x.parquet"], "No such option: --scores"),
    (["score"], "Missing argument"),
    (["query", "--n", "ten"], "Invalid value for '--n'"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_cli_usage_errors_exit_2_with_usage_not_a_traceback(args, message, monkeypatch, capsys):
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2 and message in err and "--help' for help." in err and "Traceback" not in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "--port", "99999"], "invalid params: serve.port: Input should be less than or equal to 65535"),
    (["serve", "--port", "0"], "invalid params: serve.port: Input should be greater than or equal to 1"),
    (["label", "--queries", "q.parquet", "--port", "70000"], "invalid params: label.port: Input should be less"),
    (["discover", "--scores", "s.parquet", "--out", "q", "--threshold", "nan"], "--threshold must be a finite number"),
])
def test_cli_options_are_validated_before_anything_starts(args, message, monkeypatch, capsys):
    """``--port`` is ``--set serve.port=``: an impossible port is one line before anything starts (it used to
    bypass validation, and BentoML's workers then failed in a loop); a NaN threshold used to flag nothing, silently."""
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err


def test_cli_servers_refuse_a_taken_port_before_loading_anything(tmp_path, monkeypatch, capsys):
    """The model and the queries do not exist: the port is checked first. Before, `spatial label` ended with uvicorn's
    log line and exit code 3, and `spatial serve` failed after BentoML had started."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (["serve", "--model", str(tmp_path / "none")],
                        ["label", "--queries", str(tmp_path / "none.parquet")]):
            code, err = run_main([*command, "--port", str(port)], monkeypatch, capsys)
            assert code == 2 and err == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                                         "choose another --port or --host\n"), err
    code, err = run_main(["serve", "--model", str(tmp_path / "none"), "--host", "no-such-host.invalid"],
                         monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --host no-such-host.invalid: "), err


def test_cli_a_tracking_server_that_does_not_answer_is_one_line(tiny_ensemble, tmp_path, monkeypatch, capsys):
    """MLflow's client retried a server that is down for minutes, silently, then failed with a traceback. (Retries
    off here, so the old code fails at once too.)"""
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once the block ends
    for command in (["register", "--model", str(tiny_ensemble)],  # the run's tracking store
                    ["discover", "--model", "models:/spatial@champion", "--scores", str(tmp_path / "none.parquet"),
                     "--out", str(tmp_path / "queue")]):  # the registry
        code, err = run_main([*command, "--set", f"mlflow.tracking_uri={uri}"], monkeypatch, capsys)
        assert code == 2 and err.startswith(f"error: MLflow tracking server {uri} does not answer (") and \
            "Connection refused" in err and len(err.strip().splitlines()) == 1, err


def test_a_ray_address_where_nothing_runs_is_one_line(screen, tiny_ensemble, tmp_path, monkeypatch, capsys):
    """ray.init waited for minutes on such an address, printing only Ray's own warnings."""
    import socket

    from training.errors import ConfigError
    from training.ray_cluster import check_reachable

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = tmp_path / "scores.parquet"
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):  # with progress bars: none is drawn
        code, err = run_main(["score", str(screen[0]), "--model", str(tiny_ensemble), "--out", str(out),
                              "--ray-address", address], monkeypatch, capsys)
        assert code == 2 and err.startswith(f"error: cannot reach the Ray cluster at '{address}' (Connection "
                                            "refused)") and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written, not even the chunk plan"
    with pytest.raises(ConfigError, match="Ray address 'head-node': expected HOST:PORT"):
        check_reachable("head-node")


@pytest.mark.parametrize(("command", "message"), [
    (["serve", "--port", "0"], None),  # the port is replaced by a free one below
    (["train"], "data/index/splits.parquet: split table not found; `spatial split` writes it (`dvc repro split`)"),
    (["evaluate"], "models/ensemble: no ensemble here; `spatial train` writes one (`dvc repro train`, a stage of "
                   "`make run`)"),
    (["split"], "data/index/cells.parquet: cell index not found; `spatial index` writes it (`dvc repro index`)"),
    (["index"], "data/raw/manifest.csv: manifest not found; `spatial synth` writes the simulated screen's (`dvc "
                "repro synth`); for your own files write one (README: Your own data)"),
])
def test_a_fresh_project_names_the_command_that_writes_what_is_missing(command, message, tmp_path, monkeypatch,
                                                                       capsys):
    """A newcomer's first commands before `make run`: each missing input says which command (and stage) makes it."""
    import socket

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if command[0] == "serve":
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            command = ["serve", "--port", str(free.getsockname()[1])]
        message = ("model URI 'models:/spatial-phenotype@champion' does not resolve in sqlite:///"
                   f"{tmp_path / 'mlflow.db'}: Registered Model with name=spatial-phenotype not found; `spatial "
                   "register` registers one (`dvc repro register`, a stage of `make run`)")
    code, err = run_main(command, monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {message}", err


def _nan_probability(tmp: Path) -> Path:
    pd.DataFrame({"source_file": ["a.h5", "a.h5"], "cell_id": [4, 7], "prob_on": [0.2, np.nan],
                  "prob_off": [0.8, 0.1]}).to_parquet(tmp / "scores.parquet")
    return tmp / "scores.parquet"


def _not_an_index(tmp: Path) -> Path:
    pd.DataFrame({"source_file": ["a.h5"], "cell_id": [1]}).to_parquet(tmp / "index.parquet")
    return tmp / "index.parquet"


@pytest.mark.parametrize(("command", "make_input", "message"), [
    (["bins", "{input}", "--class", "on", "--out", "{out}"], _nan_probability,
     "prob_on of cell 7 (a.h5) is nan; probabilities must be in [0, 1]"),
    (["split", "--index", "{input}", "--out", "{out}"], _not_an_index,
     "missing column(s) row, label, group; expected a cell index"),
    (["summary", "--metrics-dir", "{input}", "--out", "{out}"], lambda tmp: tmp / "no_such_folder",
     "no such folder"),
    (["summary", "--metrics-dir", "{input}", "--out", "{out}"], lambda tmp: tmp, "no metrics JSON files"),
])
def test_cli_bad_tables_exit_2_naming_the_file_and_write_nothing(command, make_input, message, tmp_path,
                                                                   monkeypatch, capsys):
    source, out = make_input(tmp_path), tmp_path / "out"
    args = [a.format(input=source, out=out) for a in command]
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2 and f"error: {source}: " in err and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_atomic_output_never_swaps_a_folder_for_a_file_or_back(tmp_path):
    folder, file = tmp_path / "reports", tmp_path / "out.csv"
    folder.mkdir()
    (folder / "keep.txt").write_text("kept")
    file.write_text("kept")
    with pytest.raises(DataError, match="reports: is a folder; this writes a file there"), atomic_path(folder) as tmp:
        tmp.write_text("new")
    with pytest.raises(DataError, match="out.csv: is a file; this writes a folder there"), atomic_path(file) as tmp:
        tmp.mkdir()
    with pytest.raises(DataError, match="out.csv: is a file, not a folder"), atomic_path(file / "a.json") as tmp:
        tmp.write_text("new")
    assert (folder / "keep.txt").read_text() == "kept" and file.read_text() == "kept"
    with atomic_path(folder) as tmp:  # a folder still replaces a folder, a file a file
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    with atomic_path(file) as tmp:
        tmp.write_text("new")
    assert [f.name for f in folder.iterdir()] == ["new.txt"] and file.read_text() == "new"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.csv", "reports"]


# Each command's inputs are missing: a command that looked at its outputs only when writing them fails on the input
# (or, worse, after its work); it must fail on the output first, before anything is read.
@pytest.mark.parametrize("command", [
    ["synth", "--out", "{file}"],
    ["synth", "--out", "{file}/screen"],
    ["split", "--index", "{missing}", "--out", "{folder}"],
    ["split", "--index", "{missing}", "--out", "{new}", "--metrics", "{folder}"],
    ["train", "--splits", "{missing}", "--out", "{file}"],
    ["train", "--splits", "{missing}", "--out", "{new}", "--metrics", "{folder}"],
    ["pretrain", "--splits", "{missing}", "--out", "{file}"],
    ["evaluate", "--model", "{missing}", "--out", "{file}"],
    ["register", "--model", "{missing}", "--out", "{folder}"],
    ["al", "--manifest", "{missing}", "--out", "{file}"],
    ["tune", "--splits", "{missing}", "--out", "{file}"],
    ["bins", "{missing}", "--out", "{file}"],
    ["hits", "--counts", "{missing}", "--samples", "{missing}", "--library", "{missing}", "--out", "{file}"],
    ["discover", "--scores", "{missing}", "--model", "{missing}", "--out", "{file}"],
    ["genotypes", "--truth", "{missing}", "--out", "{folder}"],
    ["query", "--manifest", "{missing}", "--model", "{missing}", "--out", "{folder}"],
    ["recalibrate", "--manifest", "{missing}", "--model", "{missing}", "--out", "{file}"],
    ["refit-novelty", "--splits", "{missing}", "--model", "{missing}", "--out", "{file}"],
    ["report", "--root", "{missing}", "--out", "{folder}"],
    ["seeds", "--al-curve", "{missing}", "--baseline", "random", "--out", "{folder}"],
    ["score", "{missing}", "--model", "{missing}", "--out", "{new}", "--metrics", "{folder}"],
    ["label", "--queries", "{missing}", "--labels", "{folder}"],
])
def test_cli_refuses_a_wrong_kind_of_output_before_its_work(command, tmp_path, monkeypatch, capsys):
    folder, file = tmp_path / "folder", tmp_path / "file.csv"
    folder.mkdir()
    file.write_text("kept")
    paths = {"file": file, "folder": folder, "missing": tmp_path / "missing", "new": tmp_path / "new"}
    args = [a.format(**paths) for a in command]
    code, err = run_main(args, monkeypatch, capsys)
    wrong = next(a for a in args if a.startswith((str(file), str(folder))))
    expected = (f"{file}: is a file, not a folder" if wrong.startswith(f"{file}/")
                else f"{wrong}: is a {'file' if wrong == str(file) else 'folder'}; this writes")
    assert code == 2 and err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.csv", "folder"] and file.read_text() == "kept"


def test_one_rule_for_a_cell_id_column():
    """Whole numbers within int64 pass, as int64; NaN, inf, fractions, text and overflow are flagged, never cast."""
    text = pd.Series(["3", "-4", "7.0", "inf", "1e30", "2.5", "c9", "", "99999999999999999999"])
    ids, bad = cell_ids(text)
    assert bad.tolist() == [False, False, False, True, True, True, True, True, True]
    assert ids[~bad].tolist() == [3, -4, 7] and ids.dtype == np.int64
    ids, bad = cell_ids(pd.Series(["5", "6"]), numeric_only=True)  # a table the project writes: text is refused
    assert bad.all()
    ids, bad = cell_ids(pd.Series(np.array([1, 2**63], np.uint64)))
    assert bad.tolist() == [False, True] and ids[0] == 1
    ids, bad = cell_ids(pd.Series([7, None], dtype="Int64"))
    assert bad.tolist() == [False, True] and ids[0] == 7
    ids, bad = cell_ids(pd.Series([2.0**53, 2.0**53 + 2, np.nan]))  # a float past 2**53 need not be the id written
    assert bad.tolist() == [False, True, True] and ids[0] == 2**53
    assert cell_ids(pd.Series([2**62 + 1]))[0].tolist() == [2**62 + 1]  # integers are exact at any size


def _labels_history(path: Path, cid: str) -> None:
    path.write_text(f"source_file,cell_id,label,annotator,time\nf.h5,1,a,x,t\nf.h5,{cid},a,x,t\n")


def _queries(path: Path, cid: str) -> None:
    path.write_text(f"source_file,cell_id\nf.h5,1\nf.h5,{cid}\n")


def _oracle_labels(path: Path, cid: str) -> None:
    path.write_text(f"source_file,cell_id,label\nf.h5,1,a\nf.h5,{cid},a\n")


def _genotypes(path: Path, cid: str) -> None:
    path.write_text(f"source_file,cell_id,grna\nf.h5,1,NT1\nf.h5,{cid},NT1\n")


def _read(kind: str, path: Path) -> object:
    from serving.labeling.app import read_queries
    from serving.screen.counts import read_genotypes
    from training.active.oracle import read_labels_csv
    from training.data.labels import read_history

    library = pd.DataFrame({"grna": ["NT1"], "gene": ["NT"], "is_control": [True]})
    return {"labels history": read_history, "queries": read_queries, "oracle labels": read_labels_csv,
            "genotypes": lambda p: read_genotypes(p, library, "library.csv")}[kind](path)


CELL_ID_READERS = {  # {cid}: the text as written; {parsed}: as pandas parses it (two readers parse the column)
    "labels history": (_labels_history, "line 3: cell_id '{cid}' is not an integer"),
    "queries": (_queries, "cell_id must be an integer, got '{parsed}' (row 2 of the queries)"),
    "oracle labels": (_oracle_labels, "cell_id must be integers, got e.g. [{parsed}]"),
    "genotypes": (_genotypes, "cell_id must be an integer, got '{cid}'"),
}


@pytest.mark.parametrize("cid", ["inf", "1e30", "9223372036854775808"])
@pytest.mark.parametrize("kind", list(CELL_ID_READERS))
def test_every_table_with_cell_ids_refuses_what_no_cast_can_keep(kind, cid, tmp_path):
    """inf was a pandas traceback in three of these readers, 1e30 a silently wrapped id in all four."""
    write, message = CELL_ID_READERS[kind]
    path = tmp_path / "t.csv"
    write(path, cid)
    parsed = pd.read_csv(io.StringIO(f"x\n{cid}\n"))["x"].iloc[0]
    with pytest.raises(DataError, match=re.escape(f"{path}: {message.format(cid=cid, parsed=parsed)}")):
        _read(kind, path)
    write(path, "12")
    table = _read(kind, path)
    assert table["cell_id"].dtype == np.int64 and 12 in table["cell_id"].tolist()


UNWRITABLE = Path("/sys/spatial-test")  # sysfs: no process may create a file there, root included
DENIED = r"\((Permission denied|Read-only file system)\)"  # sysfs mounted read-write, or read-only (containers)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys")
def test_an_output_in_a_folder_no_one_can_write_is_named_as_asked_not_by_its_temporary_name():
    with pytest.raises(DataError, match=rf"^/sys/spatial-test/m\.json: cannot write in /sys {DENIED}$"):
        check_destination(UNWRITABLE / "m.json", folder=False)
    refused = pytest.raises(DataError, match=rf"^/sys/m\.json: cannot write in /sys {DENIED}$")
    with refused, atomic_path("/sys/m.json") as tmp:
        tmp.write_text("{}")


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys")
@pytest.mark.parametrize("command", [
    ["synth", "--out", "{bad}"],
    ["split", "--index", "{missing}", "--out", "{new}", "--metrics", "{bad}"],
    ["train", "--splits", "{missing}", "--out", "{new}", "--metrics", "{bad}"],
    ["hits", "--counts", "{missing}", "--samples", "{missing}", "--library", "{missing}", "--out", "{new}",
     "--metrics", "{bad}"],
    ["score", "{missing}", "--model", "{missing}", "--out", "{new}", "--metrics", "{bad}"],
    ["score", "{missing}", "--model", "{missing}", "--out", "{bad}"],
])
def test_cli_refuses_an_output_it_cannot_write_before_its_work(command, tmp_path, monkeypatch, capsys):
    """The finding this answers: ``--metrics`` in an unwritable folder failed after ``--out`` was written, named
    by its temporary file. Now the command stops first, on the path as given."""
    bad = UNWRITABLE / "m.json"
    args = [a.format(bad=bad, missing=tmp_path / "missing", new=tmp_path / "new") for a in command]
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2 and re.fullmatch(rf"error: {bad}: cannot write in /sys {DENIED}\n", err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_settings_that_contradict_each_other_are_refused_before_a_split_is_written(command, tmp_path, monkeypatch,
                                                                                   capsys):
    """``--manifest`` makes the split now, beside ``--out``: an LP-FT probe longer than the training left that file
    behind before the engine refused it; the params refuse it at load."""
    code, err = run_main([command, "--manifest", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "m"),
                          "--set", "train.probe_epochs=10", "--set", "train.epochs=2"], monkeypatch, capsys)
    assert code == 2 and "train.probe_epochs=10 exceeds train.epochs=2" in err and list(tmp_path.iterdir()) == []


def test_cli_what_the_system_refuses_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """An OSError (here a file name over the file system's 255 bytes; as well permission denied, a full disk) is
    the user's to fix: one line naming the path, exit 2."""
    long_name = tmp_path / ("x" * 300)
    for command in (["synth", "--out", str(long_name)], ["summary", "--metrics-dir", str(long_name)]):
        code, err = run_main(command, monkeypatch, capsys)
        assert code == 2 and err.startswith("error: [Errno 36] File name too long") and "x" * 300 in err, err
        assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == [], err


def test_cli_score_refuses_hostile_files_and_recovers(screen, tiny_ensemble, tmp_path, monkeypatch, capsys,
                                                      no_env_trust, one_thread):
    path, images, ids = screen
    out = tmp_path / "scores.parquet"
    base = ["--model", str(tiny_ensemble), "--out", str(out), "--set", "score.chunk_size=16", "--no-progress"]
    link = hostile.external_link(tmp_path, path)
    code, err = run_main(["score", str(link), *base], monkeypatch, capsys)
    assert code == 2 and "external link to" in err and "--allow-external-hdf5" in err and "Traceback" not in err
    dup = hostile.duplicated_ids(tmp_path, images, ids)
    code, err = run_main(["score", str(dup), *base], monkeypatch, capsys)
    assert code == 2 and "1 duplicated cell id(s)" in err and not out.exists()

    # a value of 1e30 (inf in float16) in the third chunk: exit 2 naming the row, the first chunks kept ...
    bad = hostile.out_of_range(tmp_path, images, ids, row=40, value=1e30, name="slide.h5sc")
    code, err = run_main(["score", str(bad), *base], monkeypatch, capsys)
    assert code == 2 and "row 40 holds NaN or Inf pixels" in err and err.count("\n") == 1, err
    assert not out.exists() and (tmp_path / "scores.parquet.parts" / "plan.json").is_file()
    # ... the file is fixed and the same command finishes the run (the stale parts are discarded, not mixed in)
    hostile.out_of_range(tmp_path, images, ids, row=40, value=0.5, name="slide.h5sc")
    code, msg = run_main(["score", str(bad), *base], monkeypatch, capsys)
    assert code == 0 and "80 cells" in msg and "were discarded" in msg, msg
    df = pd.read_parquet(out)
    assert df["cell_id"].tolist() == ids.tolist()

    code, msg = run_main(["score", str(link), *base[:2], "--out", str(tmp_path / "linked.parquet"), "--allow-external-hdf5",
                          "--no-progress"], monkeypatch, capsys)
    assert code == 0 and "80 cells" in msg, msg
    code, err = run_main(["score", str(path), *base[:2], "--out", str(tmp_path), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and f"{tmp_path}: is a folder; this writes a file there" in err, err


# -- failure isolation inside an adaptive batch, and the retry log -----------------------------------------------
class _FailsOnLarge:
    """An ensemble stand-in that fails on any batch holding a value over 10 (like the novelty model on 1e30)."""

    class spec:  # noqa: N801
        classes = ["a", "b"]

    def predict_tensor(self, x):
        if float(x.max()) > 10:
            raise ValueError("Input contains infinity")
        n = len(x)
        return {"mean_probs": np.full((n, 2), 0.5), **{k: np.zeros(n) for k in
                ("confidence", "entropy", "aleatoric", "epistemic", "novelty")}}


def test_a_failing_cell_fails_only_its_rows_of_the_batch():
    from serving.service.api import EnsembleRunner

    runner = type("R", (), {"ensemble": _FailsOnLarge()})()
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 0, 0] = 1e30
    out = EnsembleRunner.inner.infer.func(runner, x)
    assert out.shape == (4, 7)
    assert np.isnan(out[2, :2]).all() and not np.isnan(out[[0, 1, 3], :2]).any()


def test_dropped_runner_calls_are_logged_once_per_interval(caplog):
    from serving.service.api import RetryLog

    retry = RetryLog(every_s=3600)
    with caplog.at_level(logging.WARNING, logger="serving.service.api"):
        for _ in range(141):
            retry.dropped(RuntimeError("Session is closed"))
    assert len(caplog.records) == 1 and retry.count == 140
