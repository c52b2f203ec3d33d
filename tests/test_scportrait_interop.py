"""Files as scPortrait itself writes and reads them, not as we think it does.

``tests/data/scportrait_1.8.0/single_cells.h5sc`` was written by scPortrait 1.8.0's own extraction
(``HDF5CellExtraction`` on a synthetic slide, ``python tests/scportrait_side.py extract``); beside it,
``scportrait_view.json`` is what scPortrait's reader sees in it. Those tests run everywhere.

The live tests run scPortrait in its own interpreter (``make scportrait-env`` builds ``.venv-scportrait``; or
``$SPATIAL_SCPORTRAIT_PYTHON``): a fresh extraction, scPortrait reading the files spatiAL writes, and scPortrait's
laser-microdissection selection taking the cell sets ``spatial bins`` writes. ``.ci/run`` builds that interpreter;
without it they skip (scPortrait needs a second PyTorch install, about 7 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_cells, run_main

from training.io.formats import CellFile, write_h5sc, write_sparcspy
from training.uncertainty.ensemble import Ensemble

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "scportrait_1.8.0"
SIDE = ROOT / "tests" / "scportrait_side.py"


def scportrait_python() -> str | None:
    """$SPATIAL_SCPORTRAIT_PYTHON, else ``.venv-scportrait``'s interpreter once ``make scportrait-env`` finished."""
    if os.environ.get("SPATIAL_SCPORTRAIT_PYTHON"):
        return os.environ["SPATIAL_SCPORTRAIT_PYTHON"]
    venv = ROOT / ".venv-scportrait"
    return str(venv / "bin" / "python") if (venv / ".installed").exists() else None


live = pytest.mark.skipif(scportrait_python() is None,
                          reason="no scPortrait interpreter: `make scportrait-env` or $SPATIAL_SCPORTRAIT_PYTHON")


def run_scportrait(*args: object) -> dict:
    """``tests/scportrait_side.py ARGS`` under scPortrait's interpreter; its one JSON line."""
    proc = subprocess.run([scportrait_python(), str(SIDE), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_reads_as_scportrait_does(path: Path, view: dict) -> None:
    """spatiAL's reader sees the ids, channel names, kinds and pixels scPortrait's reader saw."""
    with CellFile(path) as f:
        assert f.format == "h5sc"
        assert f.cell_ids().tolist() == view["cell_ids"]
        assert f.info.channel_names == view["channel_names"]
        assert f.info.channel_kinds == view["channel_mapping"]
        pixels = f.read(0, f.n_cells).astype(np.float64)
    assert list(pixels.shape) == view["shape"]
    np.testing.assert_allclose(pixels.sum(axis=(2, 3)), np.array(view["pixel_sums"]), rtol=1e-6, atol=1e-3)


def score_and_bin(h5sc: Path, model: Path, out: Path, monkeypatch, capsys) -> dict:
    """``spatial score`` and ``spatial bins`` on one file; the cell sets ``bins`` wrote."""
    scores = out / "scores.parquet"
    code, text = run_main(["score", str(h5sc), "--model", str(model), "--out", str(scores), "--no-progress"],
                          monkeypatch, capsys)
    assert code == 0, text
    code, text = run_main(["bins", str(scores), "--class", "spotty", "--out", str(out / "bins"),
                           "--set", "bins.manifest=null", "--set", "bins.quantiles=[0.25,0.5]"], monkeypatch, capsys)
    assert code == 0, text
    return {"scores": pd.read_parquet(scores), "sets": json.loads((out / "bins" / "cell_sets.json").read_text())}


# -- the committed file, written by scPortrait 1.8.0 -------------------------------------------------------------
def test_reads_the_file_scportrait_extraction_wrote():
    view = json.loads((FIXTURE / "scportrait_view.json").read_text())
    assert view["cell_ids"] == view["segmented_ids"]  # scPortrait kept every segmented cell, by its mask id
    assert_reads_as_scportrait_does(FIXTURE / "single_cells.h5sc", view)


def test_scores_and_bins_the_file_scportrait_wrote(tiny_ensemble, tmp_path, monkeypatch, capsys):
    """The tiny model was trained on spatiAL's own files; it scores scPortrait's (LC3B found among scPortrait's
    channel names, float16 pixels) and ``bins`` names scPortrait's cell ids."""
    view = json.loads((FIXTURE / "scportrait_view.json").read_text())
    got = score_and_bin(FIXTURE / "single_cells.h5sc", tiny_ensemble, tmp_path, monkeypatch, capsys)
    assert got["scores"]["cell_id"].tolist() == view["cell_ids"]
    # the scores are the model's on the channel scPortrait named LC3B, picked here from the file's own name list
    ens = Ensemble.load(tiny_ensemble)
    with CellFile(FIXTURE / "single_cells.h5sc") as f:
        pixels = f.read(0, f.n_cells)
    names = [n.lower() for n in view["channel_names"]]
    want = ens.predict_images(pixels[:, [names.index(c.lower()) for c in ens.spec.channels]])["mean_probs"]
    np.testing.assert_allclose(got["scores"]["prob_spotty"], want[:, ens.spec.classes.index("spotty")], rtol=1e-4,
                               atol=1e-5)
    in_sets = [cid for s in got["sets"] for cid in s["classes"]]
    top = got["scores"].nlargest(len(in_sets), "prob_spotty")["cell_id"]
    assert sorted(in_sets) == sorted(top.tolist()) and set(in_sets) <= set(view["cell_ids"])


# -- live: scPortrait itself ---------------------------------------------------------------------------------------
@live
def test_scportrait_extraction_today_matches_the_committed_file(tmp_path):
    fresh = run_scportrait("extract", tmp_path)
    committed = json.loads((FIXTURE / "scportrait_view.json").read_text())
    assert_reads_as_scportrait_does(tmp_path / "single_cells.h5sc", fresh)
    for key in ("cell_ids", "channel_names", "channel_mapping", "shape", "dtype"):
        assert fresh[key] == committed[key], key
    np.testing.assert_allclose(fresh["pixel_sums"], committed["pixel_sums"], atol=1e-3)


@live
def test_scportrait_reads_the_files_spatial_writes(tmp_path):
    rng = np.random.default_rng(3)
    x = make_cells(rng, "spotty", 6)
    ids = np.arange(6) * 5 + 11
    names = ["seg_all_nucleus", "seg_all_cytosol", "Hoechst", "WGA", "LC3B"]
    kinds = ["mask", "mask", "image_channel", "image_channel", "image_channel"]
    files = [write_h5sc(tmp_path / "ours.h5sc", x, ids, names, kinds),
             write_h5sc(tmp_path / "ours_lzf.h5sc", x, ids, names, kinds, compression="lzf"),
             write_sparcspy(tmp_path / "ours.h5", x, ids)]
    got = run_scportrait("read", tmp_path / "scportrait", *files)["read"]
    for f in files:
        back = np.load(tmp_path / "scportrait" / f"{f.name}.npz")
        assert back["ids"].tolist() == ids.tolist()
        np.testing.assert_allclose(back["images"], x, atol=5e-4)  # both store float16
        if f.suffix == ".h5sc":
            assert got[str(f)]["channel_names"] == got[str(f)]["var_channels"] == names
            assert Path(got[str(f)]["cell_grid"]).stat().st_size > 0  # scPortrait's plot needs uns n_channels


@live
def test_scportrait_selection_cuts_the_cells_spatial_binned(tiny_ensemble, tmp_path, monkeypatch, capsys):
    extracted = run_scportrait("extract", tmp_path / "extract")
    got = score_and_bin(Path(extracted["file"]), tiny_ensemble, tmp_path, monkeypatch, capsys)
    n_cells = sum(len(s["classes"]) for s in got["sets"])
    assert n_cells > 0
    sets_file = tmp_path / "bins" / "cell_sets.json"
    selected = run_scportrait("select", extracted["project"], sets_file, tmp_path / "lmd")
    assert selected["sets"] == [s["name"] for s in got["sets"]]
    assert [Path(x).name for x in selected["xml"]] == ["spatial_bins.xml"]
    assert selected["shapes"] == [n_cells]  # one cutting shape per binned cell

