"""Cell index (never touches pixels), group-wise splits and the streaming loader."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from training.config import DataConfig, SplitConfig
from training.data.cellindex import build_index
from training.data.loader import CellLoader, Preprocess, loader_for
from training.data.splits import class_table, make_splits
from training.errors import ConfigError, DataError
from training.io.formats import CellFile, write_h5sc


def test_index_rows_ids_labels_and_metadata(tiny_manifest):
    idx = build_index(tiny_manifest, progress=False)
    manifest = pd.read_csv(tiny_manifest, keep_default_na=False)
    assert len(idx) == 6 * 60 + 80
    assert set(idx.columns) >= {"source_file", "row", "cell_id", "label", "group", "condition"}
    assert idx["label"].isna().sum() == 80  # the screen file is unlabeled
    for rec in manifest.to_dict("records"):
        part = idx[idx["source_file"] == str(tiny_manifest.parent / rec["path"])]
        with CellFile(part["source_file"].iloc[0]) as f:
            np.testing.assert_array_equal(part["cell_id"], f.cell_ids())  # stored ids, never row numbers
        assert list(part["row"]) == list(range(len(part)))


def test_index_never_reads_pixels(tmp_path, monkeypatch):
    """The pixel dataset may be allocated and unwritten; reading it would raise."""
    with h5py.File(tmp_path / "big.h5sc", "w") as h5:
        h5.create_dataset("obsm/single_cell_images", shape=(100_000, 5, 64, 64), dtype="f2", chunks=(1, 1, 64, 64))
        h5.create_dataset("obs/scportrait_cell_id", data=np.arange(100_000) + 5)
    (tmp_path / "m.csv").write_text("path,label,group\nbig.h5sc,a,s1\n")

    def boom(*args, **kwargs):
        raise AssertionError("pixels were read")

    monkeypatch.setattr(CellFile, "read", boom)
    monkeypatch.setattr(h5py.Dataset, "read_direct", boom)
    idx = build_index(tmp_path / "m.csv", progress=False)
    assert len(idx) == 100_000 and idx["cell_id"].iloc[-1] == 100_004


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,group\nx.h5,s\n", "missing column"),
        ("path,label,group,colour\nx.h5,a,s,red\n", "unknown column"),
        ("path,label,group\n", "lists no files"),
        ("path,label,group\nx.h5,a,\n", "empty 'group'"),
        ("path,label,group\nx.h5,a,s\nx.h5,b,t\n", "listed twice"),
        ("path,label,group\nnothere.h5,a,s\n", "file not found"),
    ],
)
def test_bad_manifests(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        build_index(tmp_path / "m.csv", progress=False)


def test_duplicated_cell_ids_in_a_file(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as h5:
        h5["single_cell_data"] = np.zeros((3, 1, 8, 8), np.float16)
        h5["single_cell_index"] = np.array([[0, 1], [1, 1], [2, 2]])
    (tmp_path / "m.csv").write_text("path,label,group\nd.h5,a,s\n")
    with pytest.raises(DataError, match="duplicated cell ids"):
        build_index(tmp_path / "m.csv", progress=False)


def test_group_splits_never_leak_and_are_balanced(tiny_manifest):
    idx = build_index(tiny_manifest, progress=False)
    for seed in range(5):
        table, summary = make_splits(idx, SplitConfig(classes=["bright", "spotty"], test_fraction=0.5, seed=seed,
                                                      max_per_class=None))
        train_groups = set(table.loc[table["split"].isin(["train", "val"]), "group"])
        test_groups = set(table.loc[table["split"] == "test", "group"])
        assert train_groups and test_groups and not train_groups & test_groups
        assert set(table.loc[table["split"] == "heldout", "label"]) == {"dim"}
        assert (table["split"] == "unlabeled").sum() == 80
        counts = table[table["split"] == "test"]["label"].value_counts()
        assert counts.nunique() == 1  # balanced
        assert summary["classes"] == ["bright", "spotty"]
        assert not table.duplicated(["source_file", "cell_id"]).any()
    again, _ = make_splits(idx, SplitConfig(classes=["bright", "spotty"], test_fraction=0.5, seed=4, max_per_class=None))
    pd.testing.assert_frame_equal(table, again)


def test_split_errors(tiny_manifest):
    idx = build_index(tiny_manifest, progress=False)
    with pytest.raises(ConfigError, match="not in the manifest"):
        make_splits(idx, SplitConfig(classes=["bright", "mitotic"]))
    one_slide = idx[~idx["group"].isin(["bright_s1"])]
    with pytest.raises(DataError, match="at least 2 slides"):
        make_splits(one_slide, SplitConfig(classes=["bright", "spotty"]))


def test_class_balanced_undersampling_with_cap(tiny_manifest):
    idx = build_index(tiny_manifest, progress=False)
    table, _ = make_splits(idx, SplitConfig(classes=["bright", "spotty", "dim"], max_per_class=20, val_fraction=0.25,
                                            test_fraction=0.5))
    pool = table[table["split"].isin(["train", "val"])]
    assert pool["label"].value_counts().tolist() == [20, 20, 20]
    assert (class_table(table, ["bright", "spotty", "dim"]) >= 0).sum() == (table["label"].notna()).sum()


@pytest.mark.parametrize("cache, workers", [(False, 0), (False, 2), (True, 0)])
def test_loader_yields_every_cell_once_with_correct_pixels(tiny_manifest, cache, workers):
    idx = build_index(tiny_manifest, progress=False)
    table = idx.sample(frac=0.7, random_state=1).reset_index(drop=True)
    table["y"] = np.arange(len(table)) % 3
    loader = CellLoader(table, Preprocess(("LC3B", "nucleus")), batch_size=32, shuffle=True, seed=3,
                        num_workers=workers, cache=cache)
    seen, epochs = [], []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        order = []
        for batch in loader:
            assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (2, 32, 32)
            order.append(batch["idx"].numpy())
            np.testing.assert_array_equal(batch["label"].numpy(), table["y"].to_numpy()[batch["idx"].numpy()])
            seen.append((batch["idx"][:3].numpy(), batch["image"][:3].numpy()))
        epochs.append(np.concatenate(order))
    assert sorted(epochs[0]) == list(range(len(table)))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    # pixels match a direct read of the stored cell, channel order as asked
    for ids, imgs in seen[:4]:
        for i, img in zip(ids, imgs, strict=True):
            rec = table.iloc[int(i)]
            with CellFile(rec["source_file"]) as f:
                direct = f.read(int(rec["row"]), int(rec["row"]) + 1, f.resolve_channels(["LC3B", "nucleus"]))[0]
            np.testing.assert_allclose(img, direct, atol=1e-6)


def test_loader_is_deterministic_per_seed_and_epoch(tiny_manifest):
    table = build_index(tiny_manifest, progress=False)

    def order(seed, epoch):
        loader = CellLoader(table, Preprocess(("LC3B",)), batch_size=50, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return np.concatenate([b["idx"].numpy() for b in loader])

    np.testing.assert_array_equal(order(1, 2), order(1, 2))
    assert not np.array_equal(order(1, 2), order(2, 2))


def test_preprocess_resize_crop_and_normalise():
    x = np.random.default_rng(0).random((4, 2, 40, 40)).astype(np.float32)
    assert Preprocess(image_size=20)(x).shape == (4, 2, 20, 20)
    # halving a linear ramp: output pixel i is centred on input 2i + 0.5 (away from the border, which clamps)
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32), (1, 1, 40, 40)).copy()
    np.testing.assert_allclose(Preprocess(image_size=20)(ramp)[0, 0].numpy()[:, 1:-1],
                               np.broadcast_to(2 * np.arange(1, 19) + 0.5, (20, 18)), atol=1e-4)
    crop = Preprocess(image_size=20, resize="crop")(x)
    np.testing.assert_allclose(crop, x[:, :, 10:30, 10:30])
    norm = Preprocess(normalize="per_cell")(x)
    np.testing.assert_allclose(norm.mean(dim=(-2, -1)), 0, atol=1e-5)
    np.testing.assert_allclose(norm.std(dim=(-2, -1)), 1, atol=1e-5)  # the sample SD, as the loader divides by
    np.testing.assert_allclose(Preprocess(normalize="fixed", mean=0.5, std=0.25)(x), (x - 0.5) / 0.25, atol=1e-6)


def test_loader_many_files_and_missing_channel(tmp_path):
    rows = []
    for i in range(12):
        write_h5sc(tmp_path / f"f{i}.h5sc", np.full((5, 5, 8, 8), i / 20, np.float32), np.arange(5) + 100 * i)
        rows.append({"source_file": str(tmp_path / f"f{i}.h5sc"), "row": np.arange(5)})
    table = pd.DataFrame(rows).explode("row").reset_index(drop=True)
    table["row"] = table["row"].astype(int)
    loader = loader_for(table, DataConfig(channels=["LC3B"], image_size=None, batch_size=7), None, shuffle=False, seed=0, cache=False)
    out = torch.cat([b["image"] for b in loader])
    assert out.shape == (60, 1, 8, 8)
    np.testing.assert_allclose(out[:, 0, 0, 0].numpy(), np.repeat(np.arange(12) / 20, 5), atol=1e-3)
    bad = CellLoader(table, Preprocess(("GFP",)), batch_size=8)
    with pytest.raises(DataError, match="no channel named 'GFP'"):
        list(bad)
