"""Hostile screen read-outs: counts and sample-sheet numbers beyond int64 (they used to wrap round to negative
counts and a "successful" `spatial hits`), and per-cell scores tables with NaN / non-integer / duplicated cell ids
or NaN uncertainty columns (they used to crash downstream or bin a cell twice)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import run_main

from serving.screen.bins import make_bins, read_scores
from serving.screen.counts import read_count_table, read_sample_sheet
from training.config import BinsConfig
from training.errors import DataError

INT64_MAX = 9223372036854775807


# -- count table and sample sheet ------------------------------------------------------------------------------------
def write_screen(tmp, counts_b1: tuple[str, ...] = ("10", "10", "40", "40"), cells_b1: str = "40",
                 bin_b1: str = "1"):
    """Counts, sample sheet and library written as text, so the hostile numbers reach the readers as typed."""
    rows = zip(["NT1", "NT2", "A_1", "A_2"], ["NT", "NT", "A", "A"], ["100"] * 4, counts_b1, strict=True)
    (tmp / "counts.tsv").write_text("sgRNA\tGene\tlib\tb1\n" + "".join("\t".join(r) + "\n" for r in rows))
    (tmp / "samples.csv").write_text(f"sample,kind,bin,replicate,cells\nlib,library,,r1,1000\n"
                                     f"b1,bin,{bin_b1},r1,{cells_b1}\n")
    (tmp / "library.csv").write_text("grna,gene,is_control\nNT1,NT,true\nNT2,NT,true\nA_1,A,false\nA_2,A,false\n")
    return tmp / "counts.tsv", tmp / "samples.csv", tmp / "library.csv"


HUGE_CASES = {
    "count 2**63": ({"counts_b1": ("10", "9223372036854775808", "40", "40")},
                    ["column 'b1'", "'9223372036854775808'", "sgRNA NT2", "too large"]),
    "count 1e30": ({"counts_b1": ("10", "10", "1e30", "40")}, ["column 'b1'", "'1e30'", "sgRNA A_1", "too large"]),
    "count inf": ({"counts_b1": ("10", "10", "40", "inf")}, ["column 'b1'", "'inf'", "sgRNA A_2", "too large"]),
    "cells 1e300": ({"cells_b1": "1e300"}, ["sample 'b1'", "cells '1e300'", "too large"]),
    "cells 23 digits": ({"cells_b1": "99999999999999999999999"},
                        ["sample 'b1'", "cells '99999999999999999999999'", "too large"]),
    "bin 1e30": ({"bin_b1": "1e30"}, ["sample 'b1'", "bin '1e30'", "too large"]),
}


@pytest.mark.parametrize("case", list(HUGE_CASES))
def test_hits_refuses_numbers_beyond_int64_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    change, words = HUGE_CASES[case]
    counts, samples, library = write_screen(tmp_path, **change)
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    code, err = run_main(["hits", "--counts", str(counts), "--samples", str(samples), "--library", str(library),
                          "--out", str(out), "--metrics", str(metrics)], monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    bad_file = samples if case.startswith(("cells", "bin")) else counts
    assert str(bad_file) in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert not out.exists() and not metrics.exists() and not list(tmp_path.glob(".out*"))


def test_the_int64_maximum_is_read_exactly_and_one_more_is_refused(tmp_path):
    counts, samples, _ = write_screen(tmp_path, counts_b1=("10", str(INT64_MAX), "40", "40"), cells_b1=str(INT64_MAX))
    table = read_count_table(counts)
    assert table["b1"].dtype == np.int64 and table["b1"].tolist() == [10, INT64_MAX, 40, 40]
    assert read_sample_sheet(samples, ["lib", "b1"], counts).table["cells"].tolist() == [1000, INT64_MAX]
    # as float64 2**63 and INT64_MAX are the same number: the check must not compare them as floats
    counts, samples, _ = write_screen(tmp_path, counts_b1=("10", str(INT64_MAX + 1), "40", "40"),
                                      cells_b1=f"{float(2**63)}")
    with pytest.raises(DataError, match=r"column 'b1' holds a count '9223372036854775808' too large"):
        read_count_table(counts)
    with pytest.raises(DataError, match=r"sample 'b1': cells '9.223372036854776e\+18' is too large"):
        read_sample_sheet(samples, ["lib", "b1"], counts)


# -- per-cell scores tables ------------------------------------------------------------------------------------------
def write_scores(tmp, name: str = "scores.parquet", **columns) -> str:
    base = {"source_file": ["/s/a.h5sc", "/s/a.h5sc", "/s/b.h5sc"], "cell_id": [5, 9, 5],
            "prob_on": [0.2, 0.5, 0.9], "prob_off": [0.8, 0.5, 0.1], "novelty": [1.0, 2.0, 3.0],
            "epistemic": [0.0, 0.1, 0.2]}
    path = tmp / name
    pd.DataFrame({**base, **columns}).to_parquet(path)
    return str(path)


SCORE_CASES = {
    "NaN cell_id": ({"cell_id": [5.0, np.nan, 7.0]}, r"column 'cell_id' must hold integer cell ids; row 1 .*nan"),
    "string cell_id": ({"cell_id": ["5", "c9", "7"]}, r"column 'cell_id' must hold integer cell ids; row 0 .*'5'"),
    "fractional cell_id": ({"cell_id": [5.0, 9.5, 7.0]}, r"column 'cell_id' must hold integer cell ids; row 1 .*9\.5"),
    "infinite cell_id": ({"cell_id": [5.0, 9.0, np.inf]}, r"column 'cell_id' must hold integer cell ids; row 2 "),
    "duplicated cell": ({"source_file": ["/s/a.h5sc", "/s/b.h5sc", "/s/a.h5sc"]},
                        r"cell 5 of /s/a\.h5sc is listed twice \(rows 0 and 2.*\(source_file, cell_id\)"),
    "same file spelled twice": ({"source_file": ["/s/a.h5sc", "/s/b.h5sc", "/s/./a.h5sc"]},
                                r"cell 5 of /s/\./a\.h5sc is listed twice \(rows 0 and 2"),
    "NaN epistemic": ({"epistemic": [0.0, np.nan, 0.2]}, r"column 'epistemic' of cell 9 \(/s/a\.h5sc\) is nan"),
    "NaN novelty": ({"novelty": [1.0, 2.0, np.nan]}, r"column 'novelty' of cell 5 \(/s/b\.h5sc\) is nan"),
    "infinite novelty": ({"novelty": [np.inf, 2.0, 3.0]}, r"column 'novelty' of cell 5 \(/s/a\.h5sc\) is inf"),
}


@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_read_scores_refuses_bad_cells(case, tmp_path):
    change, message = SCORE_CASES[case]
    path = write_scores(tmp_path, **change)
    with pytest.raises(DataError, match=message) as err:
        read_scores(path, "off")
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


def test_whole_float_cell_ids_are_read_as_int64(tmp_path):
    df, classes = read_scores(write_scores(tmp_path, cell_id=[5.0, 9.0, 5.0]), "off")
    assert df["cell_id"].dtype == np.int64 and df["cell_id"].tolist() == [5, 9, 5] and classes == ["on", "off"]
    with pytest.raises(DataError, match="column 'cell_id' must hold integer cell ids; row 2"):
        read_scores(write_scores(tmp_path, "u.parquet", cell_id=np.array([5, 9, 2**63], np.uint64)), "off")


def test_hits_cells_uses_epistemic_but_not_novelty(tmp_path):
    # `hits --cells` reads epistemic only: NaN novelty (a model without a novelty model) is not its business
    path = write_scores(tmp_path, novelty=[np.nan] * 3, epistemic=[0.0, np.nan, 0.2])
    with pytest.raises(DataError, match="column 'epistemic' of cell 9"):
        read_scores(path, "off", extra=("epistemic",))
    df, _ = read_scores(write_scores(tmp_path, "ok.parquet", novelty=[np.nan] * 3), "off", extra=("epistemic",))
    assert "novelty" not in df.columns and df["epistemic"].tolist() == pytest.approx([0.0, 0.1, 0.2])


def test_bins_need_finite_novelty_only_to_cut_on_it(tmp_path):
    path = write_scores(tmp_path, novelty=[np.nan] * 3)  # what a model without a novelty model writes
    res = make_bins(path, BinsConfig(class_name="off", mode="thresholds", manifest=None))
    assert res["bins"]["novelty"].isna().all() and res["bins"]["bin"].tolist() == [0, 0, 0]
    with pytest.raises(DataError, match="column 'novelty' of cell 5 \\(/s/a\\.h5sc\\) is nan"):
        make_bins(path, BinsConfig(class_name="off", mode="thresholds", max_novelty=10, manifest=None))
    path = write_scores(tmp_path, "e.parquet", epistemic=[0.0, np.nan, 0.2])
    with pytest.raises(DataError, match="column 'epistemic' of cell 9"):
        make_bins(path, BinsConfig(class_name="off", mode="thresholds", max_epistemic=0.5, manifest=None))


def test_bins_cli_refuses_a_cell_listed_twice(tmp_path, monkeypatch, capsys):
    path = write_scores(tmp_path, source_file=["/s/a.h5sc", "/s/b.h5sc", "/s/a.h5sc"])
    out = tmp_path / "out"
    code, err = run_main(["bins", path, "--class", "off", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is listed twice" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("change, message", [({"epistemic": [0.0, np.nan, 0.2]}, "column 'epistemic' of cell 9"),
                                             ({"cell_id": [5.0, np.nan, 7.0]}, "column 'cell_id' must hold integer"),
                                             ({"cell_id": ["5", "9", "7"]}, "column 'cell_id' must hold integer")])
def test_hits_cells_refuses_a_bad_scores_table(change, message, tmp_path, monkeypatch, capsys):
    path = write_scores(tmp_path, **change)
    (tmp_path / "g.csv").write_text("source_file,cell_id,grna\n/s/a.h5sc,5,NT1\n/s/a.h5sc,9,A_1\n/s/b.h5sc,5,NT1\n")
    (tmp_path / "library.csv").write_text("grna,gene,is_control\nNT1,NT,true\nA_1,A,false\n")
    out = tmp_path / "out"
    code, err = run_main(["hits", "--cells", path, "--genotypes", str(tmp_path / "g.csv"), "--library",
                          str(tmp_path / "library.csv"), "--class", "off", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
