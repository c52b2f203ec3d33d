"""scPortrait's side of the interop tests: run with an interpreter that has scPortrait 1.8.0 (``make scportrait-env``
makes ``.venv-scportrait``), never imported by the test suite itself (spatiAL does not depend on scPortrait).

    python tests/scportrait_side.py extract OUT        a synthetic slide through scPortrait's own extraction
    python tests/scportrait_side.py read OUT FILE...   spatiAL's files through scPortrait's readers and plots
    python tests/scportrait_side.py select PROJECT CELL_SETS OUT   spatiAL's cell sets through scPortrait's LMD selection

``extract`` wrote ``tests/data/scportrait_1.8.0/`` (the committed ``single_cells.h5sc`` and what scPortrait's
reader sees in it, ``scportrait_view.json``); each command prints one JSON line of what it found.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

CHANNELS = ["Hoechst", "WGA", "LC3B"]  # as a user names them when loading the slide: mixed case
GRID, SPACING, MARGIN, CROP = 4, 48, 40, 32


def synthetic_slide(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """A 3-channel uint16 slide of GRID x GRID round cells, its nucleus and cytosol label masks and the cell ids."""
    rng = np.random.default_rng(seed)
    side = 2 * MARGIN + (GRID - 1) * SPACING
    yy, xx = np.mgrid[:side, :side]
    img = np.zeros((3, side, side))
    nuc = np.zeros((side, side), np.uint32)
    cyto = np.zeros((side, side), np.uint32)
    ids = []
    for k in range(GRID * GRID):
        cy, cx = MARGIN + SPACING * (k // GRID), MARGIN + SPACING * (k % GRID)
        cid = 100 + 7 * (k + 1)  # not row numbers
        r = np.hypot(yy - cy, xx - cx)
        cell, nucleus = r < 12, r < 5
        cyto[cell], nuc[nucleus] = cid, cid
        img[0][nucleus] = rng.uniform(0.5, 0.9)
        img[1][cell & (r > 10)] = rng.uniform(0.3, 0.7)
        lc3 = cell * (0.6 if k % 2 == 0 else 0.15)
        for _ in range(5 if k % 3 == 0 else 0):  # puncta
            py, px = cy + rng.integers(-8, 9), cx + rng.integers(-8, 9)
            lc3 = lc3 + 0.7 * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / 2.0) * cell
        img[2] += lc3
        ids.append(cid)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return (img * 60000).astype(np.uint16), nuc, cyto, ids


def extract(out: Path) -> dict:
    import spatialdata
    from scportrait.io.h5sc import read_h5sc
    from scportrait.pipeline.extraction import HDF5CellExtraction
    from scportrait.pipeline.project import Project
    from spatialdata.models import Image2DModel, Labels2DModel

    out.mkdir(parents=True, exist_ok=True)
    work = out / "scportrait_project"
    img, nuc, cyto, ids = synthetic_slide()
    sdata = spatialdata.SpatialData(
        images={"slide": Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=CHANNELS, scale_factors=[2])},
        labels={"nuc": Labels2DModel.parse(nuc, dims=("y", "x")), "cyto": Labels2DModel.parse(cyto, dims=("y", "x"))},
    )
    sdata.write(work / "input.zarr", overwrite=True)
    config = {"name": "spatiAL interop", "HDF5CellExtraction": {
        "threads": 1, "image_size": CROP, "normalize_output": True, "normalization_range": [0.01, 0.99],
        "cache": str(work), "compression": True}}
    (work / "project").mkdir(parents=True, exist_ok=True)
    project = Project(str(work / "project"), config_path=config, extraction_f=HDF5CellExtraction, overwrite=True)
    project.load_input_from_sdata(str(work / "input.zarr"), "slide", nucleus_segmentation_name="nuc",
                                  cytosol_segmentation_name="cyto")
    project.extract()
    shutil.copyfile(project.extraction_f.output_path, out / "single_cells.h5sc")
    adata = read_h5sc(out / "single_cells.h5sc")
    images = np.asarray(adata.obsm["single_cell_images"][:], dtype=np.float64)
    names = [str(n) for n in adata.uns["single_cell_images"]["channel_names"]]
    view = {
        "scportrait": _version(), "cell_ids": [int(i) for i in adata.obs["scportrait_cell_id"]],
        "segmented_ids": ids, "channel_names": names,
        "channel_mapping": [str(m) for m in adata.uns["single_cell_images"]["channel_mapping"]],
        "shape": list(images.shape), "dtype": str(adata.obsm["single_cell_images"].dtype),
        "pixel_sums": images.sum(axis=(2, 3)).round(4).tolist(),  # per cell and channel
    }
    (out / "scportrait_view.json").write_text(json.dumps(view, indent=1) + "\n")
    return {"file": str(out / "single_cells.h5sc"), "project": str(work / "project"), **view}


def read(out: Path, files: list[str]) -> dict:
    """Each file through scPortrait's reader (``read_h5sc``), its PyTorch dataset and its cell grid plot; the
    images and ids it got go to ``OUT/<name>.npz``."""
    import matplotlib

    matplotlib.use("Agg")
    from scportrait.io.h5sc import read_h5sc
    from scportrait.plotting import h5sc as h5sc_plots
    from scportrait.tools.ml.datasets import H5ScSingleCellDataset, HDF5SingleCellDataset

    out.mkdir(parents=True, exist_ok=True)
    found = {}
    for f in files:
        h5sc = f.endswith(".h5sc")
        dataset_cls = H5ScSingleCellDataset if h5sc else HDF5SingleCellDataset
        ds = dataset_cls(dir_list=[f], dir_labels=[0], return_id=True)
        items = [ds[i] for i in range(len(ds))]
        images = np.stack([np.asarray(im, dtype=np.float32) for im, _, _ in items])
        ids = np.array([int(cid) for _, _, cid in items])
        entry = {"n": len(ds)}
        if h5sc:
            adata = read_h5sc(f)
            entry["channel_names"] = [str(n) for n in adata.uns["single_cell_images"]["channel_names"]]
            entry["var_channels"] = [str(n) for n in adata.var["channels"]] if "channels" in adata.var else None
            fig = h5sc_plots.cell_grid(adata, n_cells=4, return_fig=True)
            fig.savefig(out / f"{Path(f).stem}_cell_grid.png")
            entry["cell_grid"] = str(out / f"{Path(f).stem}_cell_grid.png")
        np.savez(out / f"{Path(f).name}.npz", images=images, ids=ids)
        found[f] = entry
    return {"scportrait": _version(), "read": found}


def select(project_dir: Path, cell_sets: Path, out: Path) -> dict:
    """spatiAL's ``cell_sets.json`` (one set per bin and slide) as the cell sets of scPortrait's LMD selection."""
    from scportrait.pipeline.project import Project
    from scportrait.pipeline.selection import LMDSelection

    config = {"name": "spatiAL interop", "LMDSelection": {
        "threads": 1, "processes_cell_sets": 1, "segmentation_channel": "seg_all_nucleus", "shape_dilation": 4,
        "smoothing_filter_size": 5, "rdp_epsilon": 0.6, "path_optimization": "none", "greedy_k": 3,
        "hilbert_p": 7, "cache": str(out)}}
    out.mkdir(parents=True, exist_ok=True)
    project = Project(str(project_dir), config_path=config, selection_f=LMDSelection, overwrite=False)
    sets = json.loads(cell_sets.read_text())
    project.select(sets, np.array([(0, 0), (200, 0), (0, 200)]), name="spatial_bins")
    xml = sorted(Path(project_dir).rglob("*.xml"))
    return {"scportrait": _version(), "sets": [s["name"] for s in sets], "xml": [str(x) for x in xml],
            "shapes": [x.read_text().count("<Shape_") for x in xml]}


def _version() -> str:
    from importlib.metadata import version

    return version("scportrait")


def main(argv: list[str]) -> None:
    cmd, *rest = argv
    if cmd == "extract":
        result = extract(Path(rest[0]))
    elif cmd == "read":
        result = read(Path(rest[0]), rest[1:])
    elif cmd == "select":
        result = select(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    else:
        raise SystemExit(f"unknown command {cmd!r}; expected extract, read or select")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
