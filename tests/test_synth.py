"""The simulated SPARCS screen: layout, truth, determinism, phenotype direction, atomic output."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

import training.sim.synth as synth
from training.config import SynthConfig
from training.errors import ConfigError
from training.io.formats import THESIS_CHANNELS, THESIS_KINDS, CellFile
from training.sim.synth import load_library, load_truth, synthesize

TINY = dict(
    image_size=32, format="both", cells_per_class=40, slides_per_condition=2, timecourse_hours=[0, 14],
    cells_per_timepoint=30, screen_slides=1, cells_per_screen_slide=80, max_cells_per_file=50, n_genes=8,
    grnas_per_gene=2, n_controls=4, n_hits=2, novel_fraction=0.2, workers=1, seed=3,
)


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(SynthConfig(**TINY), tmp_path_factory.mktemp("synth") / "raw", progress=False)


def read_all(manifest: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    table = pd.read_csv(manifest, keep_default_na=False)
    out = {}
    for p in table["path"]:
        with CellFile(manifest.parent / p) as f:
            out[p] = (f.cell_ids(), f.read(0, f.n_cells))
    return out


def test_manifest_lists_readable_files_with_thesis_channels(screen: Path) -> None:
    table = pd.read_csv(screen, keep_default_na=False)
    assert list(table.columns) == ["path", "label", "group", "condition", "timepoint", "replicate"]
    assert set(table["condition"]) == {"stimulated", "unstimulated", "atg5_ko", "ei24_ko", "timecourse", "screen"}
    formats = set()
    for _, row in table.iterrows():
        with CellFile(screen.parent / row["path"]) as f:
            formats.add(f.format)
            assert f.info.channel_names == THESIS_CHANNELS
            assert f.info.channel_kinds == THESIS_KINDS
            assert f.info.dtype == "float16" and f.info.height == f.info.width == 32
            x = f.read(0, f.n_cells)
            assert x.min() >= 0 and x.max() <= 1 and x[:, 4].max() == 1.0
            # the nucleus channel is cut out by the nucleus mask, LC3B by the cytosol mask
            assert (x[:, 2][x[:, 0] == 0] == 0).all() and (x[:, 4][x[:, 1] == 0] == 0).all()
        assert row["label"] == ("" if row["condition"] == "screen" else row["condition"])
        assert (row["timepoint"] != "") == (row["condition"] == "timecourse")
    assert formats == {"h5sc", "sparcspy"}  # format "both" alternates
    controls = table[table["condition"] == "stimulated"]
    assert list(controls["group"]) == ["stimulated_s1", "stimulated_s2"] and list(controls["replicate"]) == [1, 2]
    # a slide larger than max_cells_per_file is split into parts of one group
    parts = table[table["condition"] == "screen"]
    assert len(parts) == 2 and set(parts["group"]) == {"screen_s1"}
    assert sorted(table[table["condition"] == "timecourse"]["timepoint"].astype(float)) == [0.0, 14.0]


def test_cell_ids_unique_and_not_row_numbers(screen: Path) -> None:
    for ids, _ in read_all(screen).values():
        assert len(np.unique(ids)) == len(ids)
        assert (ids != np.arange(len(ids))).all()


def test_truth_covers_every_cell_once(screen: Path) -> None:
    truth = load_truth(screen)
    files = read_all(screen)
    assert len(truth) == sum(len(ids) for ids, _ in files.values())
    assert not truth.duplicated(["path", "cell_id"]).any()
    for path, (ids, _) in files.items():
        sub = truth[truth["path"] == path]
        assert (sub["cell_id"].to_numpy() == ids).all()
        assert set(sub["source_file"]) == {os.path.normpath(os.path.join(os.path.dirname(screen), path))}
    assert set(truth["state"]) <= set(synth.STATES)
    assert truth["autophagy"].between(0, 1).all()


def test_library_matches_truth_and_images_hold_no_grnas(screen: Path) -> None:
    lib = load_library(screen)
    truth = load_truth(screen)
    assert list(lib.columns) == ["grna", "gene", "is_control"] and lib["grna"].is_unique
    assert lib.loc[lib["is_control"], "gene"].eq("non-targeting").all() and lib["is_control"].sum() == 4
    scr = truth[truth["condition"] == "screen"]
    assert (scr["grna"] != "").all() and set(scr["grna"]) <= set(lib["grna"])
    merged = scr.merge(lib, on="grna", suffixes=("", "_lib"))
    assert (merged["gene"] == merged["gene_lib"]).all()
    assert (truth.loc[truth["condition"] != "screen", ["grna", "gene"]] == "").all().all()
    genes = pd.read_csv(screen.parent / "truth_genes.csv")  # plain reading yields no NaN roles
    assert set(genes["role"]) == {"control", "neutral", "hit", "novel"}
    assert (genes["role"] == "hit").sum() == 2 and (genes["role"] == "novel").sum() == 1
    assert genes.loc[genes["role"] == "hit", "effect"].max() == 1.0
    # nothing about gRNAs or genes is stored in the image files
    secrets = set(lib["grna"]) | set(lib["gene"])
    found: list[str] = []

    def strings(values: object) -> list[str]:
        arr = np.atleast_1d(np.asarray(values))
        return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel()] if arr.dtype.kind in "OSU" else []

    def visit(name: str, node: h5py.HLObject) -> None:
        found.extend(name.split("/"))
        for value in node.attrs.values():
            found.extend(strings(value))
        if isinstance(node, h5py.Dataset) and node.dtype.kind in "OS":
            found.extend(strings(node[()]))

    for p in pd.read_csv(screen, keep_default_na=False)["path"]:
        with h5py.File(screen.parent / p, "r") as h5:
            h5.visititems(visit)
    assert not secrets & set(found)


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_workers_other_seed_differs(screen: Path, tmp_path: Path) -> None:
    """Same seed: every file byte-identical (gzip, the default), whatever the worker count, so DVC's hash of the
    output is stable; another seed: other pixels."""
    again = synthesize(SynthConfig(**{**TINY, "workers": 2}), tmp_path / "again", progress=False)
    other = synthesize(SynthConfig(**{**TINY, "seed": 4}), tmp_path / "other", progress=False)
    assert SynthConfig().compression == "gzip"
    assert file_digests(screen.parent) == file_digests(again.parent)
    a, c = read_all(screen), read_all(other)
    assert a.keys() == c.keys()
    assert any(not np.array_equal(a[p][1], c[p][1]) for p in a)


def _lc3_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: puncta signal (share of the cell's pixels whose LC3B white top-hat exceeds 0.2) and
    diffuse level (median LC3B in the cytoplasm)."""
    lc3, cyto, nuc = x[:, 4], x[:, 1] > 0.5, x[:, 0] > 0.5
    tophat = lc3 - ndimage.grey_opening(lc3, size=(1, 3, 3))
    puncta = np.array([(t[m] > 0.2).mean() for t, m in zip(tophat, cyto, strict=True)])
    diffuse = np.array([np.median(v[m & ~n]) for v, m, n in zip(lc3, cyto, nuc, strict=True)])
    return puncta, diffuse


def test_phenotypes_point_the_right_way(screen: Path) -> None:
    truth = load_truth(screen)
    files = read_all(screen)
    table = pd.read_csv(screen, keep_default_na=False)
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, rows in table.groupby(table["condition"] + table["timepoint"].astype(str)):
        x = np.concatenate([files[p][1] for p in rows["path"]])
        stats[key] = _lc3_stats(x)
    puncta = {k: float(np.median(v[0])) for k, v in stats.items()}
    diffuse = {k: float(np.median(v[1])) for k, v in stats.items()}
    assert puncta["stimulated"] > 3 * puncta["unstimulated"]
    assert puncta["stimulated"] > 3 * puncta["atg5_ko"]
    assert puncta["stimulated"] > puncta["ei24_ko"] > 2 * puncta["atg5_ko"]
    assert puncta["timecourse14.0"] > 3 * puncta["timecourse0.0"]
    assert diffuse["atg5_ko"] > diffuse["stimulated"] + 0.1  # LC3-I accumulates without lipidation
    level = truth.groupby("condition")["autophagy"].mean()
    assert level["stimulated"] > level["ei24_ko"] > level["unstimulated"] > level["atg5_ko"]
    # the novel phenotype exists only in the screen, in KO cells of the one novel gene
    novel = truth[truth["is_novel"]]
    genes = pd.read_csv(screen.parent / "truth_genes.csv", keep_default_na=False)
    assert len(novel) >= 5 and set(novel["condition"]) == {"screen"} and novel["knockout"].all()
    assert set(novel["gene"]) == set(genes.loc[genes["role"] == "novel", "gene"])
    assert set(truth.loc[truth["state"] == "novel", "condition"]) == {"screen"}
    # ... and looks unlike the rest: a large bright aggregate keeps its peak under smoothing
    scr = truth[truth["condition"] == "screen"]
    x = np.concatenate([files[p][1] for p in table.loc[table["condition"] == "screen", "path"]])
    smooth = ndimage.gaussian_filter(x[:, 4], (0, 1, 1)).max(axis=(1, 2))
    aggregate = smooth - np.array([np.median(v[m]) for v, m in zip(x[:, 4], x[:, 1] > 0.5, strict=True)])
    novel_cells = scr["is_novel"].to_numpy()
    others = (~scr["is_novel"] & scr["state"].isin(["on", "partial", "off", "blocked"])).to_numpy()
    assert np.median(aggregate[novel_cells]) > np.quantile(aggregate[others], 0.9)


def test_strong_hits_block_autophagy_in_knocked_out_cells_only(screen: Path) -> None:
    truth = load_truth(screen)
    genes = pd.read_csv(screen.parent / "truth_genes.csv", keep_default_na=False)
    strongest = genes.loc[genes["role"] == "hit"].sort_values("effect")["gene"].iloc[-1]
    cells = truth[truth["gene"] == strongest]
    ko, wt = cells[cells["knockout"]], cells[~cells["knockout"]]
    assert len(ko) and (ko["lc3_block"] == 1.0).all() and (ko["autophagy"] < 0.05).all()
    assert (wt["lc3_block"] == 0).all()
    ntc = truth[truth["gene"] == "non-targeting"]
    assert not ntc["knockout"].any() and ntc["autophagy"].mean() > 0.6


def test_failure_midway_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synth.render

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "render", flaky)
    out = tmp_path / "raw"
    with pytest.raises(RuntimeError, match="disk on fire"):
        synthesize(SynthConfig(**TINY), out, progress=False)
    assert calls["n"] == 4 and not out.exists() and list(tmp_path.iterdir()) == []
    # an existing output stays untouched
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        synthesize(SynthConfig(**TINY), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1


def test_invalid_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_genes"):
        synthesize(SynthConfig(**{**TINY, "n_genes": 2, "n_hits": 2}), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="cells_per_class"):
        synthesize(SynthConfig(**{**TINY, "cells_per_class": 1}), tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [24, 128])
def test_render_is_scale_free(size: int) -> None:
    cfg = SynthConfig(**TINY)
    spec = next(s for s in synth.plan_files(cfg) if s.condition == "stimulated")
    rng = np.random.default_rng(0)
    cells = synth.draw_cells(spec, cfg, synth.make_library(cfg), rng).take(slice(0, 6))
    x = synth.render(cells, synth.Slide.draw(rng), size, rng)
    assert x.shape == (6, 5, size, size) and x.min() >= 0 and x.max() <= 1
    area = (x[:, 1] > 0.5).mean(axis=(1, 2))  # cells cover a similar share of the crop at any size
    assert 0.15 < np.median(area) < 0.9


def test_phenotype_overrides_change_the_model_and_bad_ones_are_config_errors(tmp_path: Path) -> None:
    assert synth.phenotype_model({}) is synth.MODEL
    m = synth.phenotype_model({"ei24_factor": [0.8, 0.9], "weak_fraction": 0.2})
    assert m.ei24_factor == (0.8, 0.9) and m.weak_fraction == 0.2 and m.stim_beta == synth.MODEL.stim_beta
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        synthesize(SynthConfig(**{**TINY, "phenotype": {"bogus": 1.0}}), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="ei24_factor: expected a list of 2 numbers"):
        synth.phenotype_model({"ei24_factor": 0.5})
    with pytest.raises(ConfigError, match="weak_fraction: expected a number"):
        synth.phenotype_model({"weak_fraction": [0.1, 0.2]})
    with pytest.raises(ConfigError, match="finite"):
        synth.phenotype_model({"weak_fraction": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_a_weaker_phenotype_moves_the_truth_and_the_pixels(tmp_path: Path) -> None:
    """EI24 KO cells keep more autophagy with a weaker knockout; everything not drawn from the phenotype is equal."""
    small = {**TINY, "timecourse_hours": [], "screen_slides": 0}
    base = synthesize(SynthConfig(**small), tmp_path / "base", progress=False)
    weak = synthesize(SynthConfig(**{**small, "phenotype": {"ei24_factor": [0.9, 1.0]}}), tmp_path / "weak",
                      progress=False)
    tb, tw = load_truth(base), load_truth(weak)
    ko = (tb["condition"] == "ei24_ko") & tb["knockout"]
    assert ko.sum() > 10 and (tw.loc[ko, "autophagy"].mean() > tb.loc[ko, "autophagy"].mean() + 0.1)
    other = tb["condition"] != "ei24_ko"
    np.testing.assert_array_equal(tb.loc[other, "autophagy"], tw.loc[other, "autophagy"])
    ei24 = next(p for p in tb.loc[ko, "path"])
    assert not np.array_equal(read_all(base)[ei24][1], read_all(weak)[ei24][1])
