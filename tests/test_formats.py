"""Both single-cell file formats: round trips, scPortrait's exact layout, and every malformed-file case."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from training.errors import DataError
from training.io.formats import CellFile, contiguous_runs, inspect_file, write_h5sc, write_sparcspy


def _cells(n: int = 12, c: int = 5, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, c, size, size)).astype(np.float32)


@pytest.mark.parametrize("compression", ["gzip", "lzf"])  # lzf: what scPortrait usually writes
@pytest.mark.parametrize("writer", [write_h5sc, write_sparcspy])
def test_round_trip_keeps_pixels_ids_and_channels(tmp_path, writer, compression):
    x = _cells()
    ids = np.arange(12) * 5 + 1000
    path = writer(tmp_path / "cells", x, ids, compression=compression)
    with CellFile(path) as f:
        assert f.info.channel_names == ["nucleus_mask", "cytosol_mask", "nucleus", "membrane", "LC3B"]
        assert f.info.image_channels == [2, 3, 4]
        assert f.info.chunks == (1, 1, 16, 16) and f.info.compression == compression
        np.testing.assert_array_equal(f.cell_ids(), ids)
        got = f.read(3, 9, f.resolve_channels(["LC3B", "nucleus"]))
        np.testing.assert_allclose(got, x[3:9][:, [4, 2]], atol=1e-3)  # float16 storage
        rows = np.array([7, 1, 2, 11, 2])
        np.testing.assert_allclose(f.read_rows(rows, [4]), x[rows][:, [4]], atol=1e-3)
        assert f.resolve_channels([]) == [2, 3, 4]
        assert f.resolve_channels([4, "0"]) == [4, 0]
        np.testing.assert_array_equal(f.rows_of([1055, 1000, 1005, 1055]), [11, 0, 1, 11])  # in the asked order
        with pytest.raises(DataError, match=r"cells.*: 2 cell\(s\) are not in the file, e.g. cell_id \[1, 2\]"):
            f.rows_of([1000, 1, 2])


def test_custom_channel_names_and_obs_columns(tmp_path):
    x = _cells(c=3)
    obs = pd.DataFrame({"condition": ["a"] * 6 + ["b"] * 6, "timepoint": np.arange(12.0)})
    write_h5sc(tmp_path / "x.h5sc", x, np.arange(12), ["dapi", "gfp", "seg"], ["image_channel", "image_channel", "mask"],
               obs=obs)
    with CellFile(tmp_path / "x.h5sc") as f:
        assert f.info.channel_names == ["dapi", "gfp", "seg"]
        assert f.resolve_channels(None) == [0, 1]
        table = f.obs_table()
        assert list(table["condition"]) == list(obs["condition"])
        np.testing.assert_array_equal(table["timepoint"], obs["timepoint"])
    assert inspect_file(tmp_path / "x.h5sc")["annotations"] == {
        "condition": {"distinct": 2, "missing": 0, "values": ["a", "b"]},
        "timepoint": {"distinct": 12, "missing": 0, "values": [0.0, 1.0, 2.0, 3.0, 4.0]}}


def test_inspect_shows_sparcspy_labels_in_number_order_and_names_a_table_of_the_wrong_length(tmp_path):
    """SPARCSpy's labelled index holds text: its numbers are shown as numbers order them ("2.0" before "10.0"); a
    table that is not one row per cell is a warning naming it, never a traceback."""
    labels = pd.DataFrame({"condition": ["ko"] * 6 + ["wt"] * 6, "timepoint": [f"{t:.1f}" for t in range(12)]})
    path = write_sparcspy(tmp_path / "y.h5", _cells(), np.arange(12), labels=labels)
    r = inspect_file(path)
    assert r["annotations"]["timepoint"]["values"] == ["0.0", "1.0", "2.0", "3.0", "4.0"]
    assert r["annotations"]["condition"] == {"distinct": 2, "missing": 0, "values": ["ko", "wt"]}
    with h5py.File(path, "r+") as h5:
        del h5["single_cell_index_labelled"]
        h5["single_cell_index_labelled"] = np.array([[b"ko"], [b"wt"]])
    r = inspect_file(path)
    assert r["annotations"] == {}
    assert r["warnings"] == [f"{path}: 'single_cell_index_labelled' has shape (2, 1); expected one row per cell (12)"]


def test_inspect_reads_anndata_categorical_obs_columns(tmp_path):
    """AnnData (and so scPortrait) writes text columns as categoricals: codes and categories, -1 for missing."""
    anndata = pytest.importorskip("anndata")
    obs = pd.DataFrame({"scportrait_cell_id": np.arange(4) + 7, "well": pd.Categorical(["B2", "A1", None, "A1"])},
                       index=[str(i) for i in range(4)])
    path = tmp_path / "cat.h5sc"
    anndata.AnnData(obs=obs).write_h5ad(path)
    with h5py.File(path, "r+") as h5:
        h5.create_dataset("obsm/single_cell_images", data=_cells(4, c=3).astype(np.float16))
        h5["obsm/single_cell_images"].attrs["channel_names"] = ["a", "b", "c"]
    with CellFile(path) as f:
        assert list(f.obs_table()["well"]) == ["B2", "A1", None, "A1"]
    assert inspect_file(path)["annotations"] == {"well": {"distinct": 2, "missing": 1, "values": ["A1", "B2"]}}
    with h5py.File(path, "r+") as h5:
        h5["obs/well/codes"][0] = 5
    r = inspect_file(path)
    assert r["annotations"] == {} and r["warnings"] == [f"{path}: obs column 'well' has codes beyond its 2 categories"]


def test_reads_file_written_by_anndata_like_scportrait(tmp_path):
    """A .h5sc written by AnnData itself (as scPortrait does), metadata only in ``uns`` and ``var``."""
    anndata = pytest.importorskip("anndata")
    n = 10
    x = _cells(n).astype(np.float16)
    obs = pd.DataFrame({"scportrait_cell_id": np.arange(n) * 3 + 7}, index=[str(i) for i in range(n)])
    var = pd.DataFrame(index=["seg_all_nucleus", "seg_all_cytosol", "ch0", "ch1", "ch2"])
    adata = anndata.AnnData(obs=obs, var=var)
    adata.obsm["single_cell_images"] = x
    adata.uns["single_cell_images"] = {
        "channel_names": np.array(var.index),
        "channel_mapping": np.array(["mask", "mask", "image_channel", "image_channel", "image_channel"]),
        "n_masks": 2,
        "n_image_channels": 3,
    }
    path = tmp_path / "single_cells.h5sc"
    adata.write_h5ad(path, compression="lzf")  # scPortrait's choice
    with CellFile(path) as f:
        assert f.format == "h5sc" and f.info.compression == "lzf"
        np.testing.assert_array_equal(f.cell_ids(), obs["scportrait_cell_id"].to_numpy())
        assert f.info.channel_names == list(var.index)
        assert f.resolve_channels([]) == [2, 3, 4]
        np.testing.assert_array_equal(f.read(0, n, [4]), x[:, [4]].astype(np.float32))
    # and the reverse: AnnData reads what we write
    write_h5sc(tmp_path / "ours.h5sc", x, np.arange(n) + 1)
    back = anndata.read_h5ad(tmp_path / "ours.h5sc")
    assert back.obsm["single_cell_images"].shape == x.shape
    assert list(back.obs["scportrait_cell_id"]) == list(range(1, n + 1))


def _h5(path, **datasets):
    with h5py.File(path, "w") as h5:
        for name, data in datasets.items():
            h5.create_dataset(name, data=data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.h5", "file not found"),
        (lambda p: (p / "text.h5").write_text("not hdf5") and p / "text.h5", "not a readable HDF5"),
        (lambda p: _h5(p / "empty.h5", other=np.zeros(3)), "no single-cell images found"),
        (lambda p: _h5(p / "noidx.h5", single_cell_data=np.zeros((2, 1, 4, 4), np.float16)), "single_cell_index' missing"),
        (lambda p: _h5(p / "rank.h5", single_cell_data=np.zeros((2, 4, 4), np.float16),
                       single_cell_index=np.zeros((2, 2))), "expected rank 4"),
        (lambda p: _h5(p / "dtype.h5", single_cell_data=np.zeros((2, 1, 4, 4), np.uint8),
                       single_cell_index=np.zeros((2, 2))), "expected float16/float32"),
        (lambda p: _h5(p / "rows.h5", single_cell_data=np.zeros((3, 1, 4, 4), np.float16),
                       single_cell_index=np.zeros((2, 2))), "has 2 rows"),
    ],
)
def test_malformed_files_raise_data_error_naming_the_problem(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError, match=message) as exc:
        CellFile(path)
    assert str(path) in str(exc.value)


def test_truncated_file_is_a_data_error(tmp_path):
    path = write_h5sc(tmp_path / "full.h5sc", _cells(40, size=32), np.arange(40))
    data = path.read_bytes()
    (tmp_path / "cut.h5sc").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.h5sc"), CellFile(tmp_path / "cut.h5sc") as f:
        f.read(0, 40)


def test_nan_pixels_are_reported_with_file_and_row(tmp_path):
    x = _cells()
    x[5, 4, 3, 3] = np.nan
    path = write_sparcspy(tmp_path / "nan.h5", x, np.arange(12))
    with CellFile(path) as f:
        f.read(0, 5)
        with pytest.raises(DataError, match=r"row 5 holds NaN"):
            f.read(0, 12)
    report = inspect_file(path)
    assert any("NaN" in w for w in report["warnings"])


def test_unknown_channel_and_writer_checks(tmp_path):
    path = write_h5sc(tmp_path / "x.h5sc", _cells(), np.arange(12))
    with CellFile(path) as f, pytest.raises(DataError, match="no channel named 'GFP'"):
        f.resolve_channels(["GFP"])
    with pytest.raises(DataError, match="not unique"):
        write_h5sc(tmp_path / "dup.h5sc", _cells(), np.zeros(12))
    assert not (tmp_path / "dup.h5sc").exists()
    assert not list(tmp_path.glob(".dup*")), "no temporary file may be left behind"


def test_inspect_reports_layout_and_warnings(tmp_path):
    x = _cells(c=5)
    x[0, 3, 0, 0] = 1.7
    path = write_h5sc(tmp_path / "x.h5sc", x, np.arange(12) + 40)
    r = inspect_file(path)
    assert (r["format"], r["n_cells"], r["n_channels"], r["height"], r["width"]) == ("h5sc", 12, 5, 16, 16)
    assert (r["cell_id_min"], r["cell_id_max"], r["dtype"]) == (40, 51, "float16")
    assert r["chunks"] == [1, 1, 16, 16] and r["compression"] == "gzip"
    assert any("outside [0, 1]" in w for w in r["warnings"])
    with h5py.File(tmp_path / "dups.h5", "w") as h5:
        h5["single_cell_data"] = x.astype(np.float16)
        h5["single_cell_index"] = np.stack([np.arange(12), np.zeros(12)], 1)
    assert any("duplicated cell ids" in w for w in inspect_file(tmp_path / "dups.h5")["warnings"])


def test_contiguous_runs():
    assert contiguous_runs(np.array([1, 2, 3, 7, 8, 20])) == [(0, 3), (3, 5), (5, 6)]
    assert contiguous_runs(np.array([1, 3, 20]), max_gap=4) == [(0, 2), (2, 3)]
    assert contiguous_runs(np.array([], dtype=int)) == []
