"""Screen-wide batch scoring: the numbers, exactly-once output, resuming after a crash, the CLI and Ray Data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

import serving.batch.scoring as batch
from serving.batch.scoring import parts_dir, score_files
from training.config import ScoreConfig
from training.errors import DataError
from training.io.formats import CellFile
from training.io.tables import read_table
from training.uncertainty.ensemble import Ensemble

FIELDS = ["confidence", "entropy", "aleatoric", "epistemic", "novelty"]


@pytest.fixture(scope="module")
def files(tiny_manifest: Path) -> list[Path]:
    root = tiny_manifest.parent
    return [root / "screen_s0.h5sc", root / "spotty_s1.h5"]  # scPortrait and SPARCSpy, 80 + 60 cells


@pytest.fixture(scope="module")
def reference(files, tiny_ensemble) -> pd.DataFrame:
    """The ensemble applied directly to the stored stacks, one file at a time."""
    ens = Ensemble.load(tiny_ensemble)
    frames = []
    for f in files:
        with CellFile(f) as cf:
            cells = pd.DataFrame({"source_file": str(f.resolve()), "cell_id": cf.cell_ids()})
            frames.append(ens.to_frame(ens.predict_images(cf.read(0, cf.n_cells)), cells))
    return pd.concat(frames, ignore_index=True)


def assert_same_scores(got: pd.DataFrame, want: pd.DataFrame) -> None:
    key = ["source_file", "cell_id"]
    assert not got.duplicated(key).any(), "a cell was written twice"
    merged = want.merge(got, on=key, how="outer", suffixes=("_want", "_got"), indicator=True)
    assert (merged["_merge"] == "both").all(), "cells missing or extra"
    for col in ["prob_bright", "prob_spotty", *FIELDS]:
        np.testing.assert_allclose(merged[f"{col}_got"], merged[f"{col}_want"], rtol=1e-4, atol=1e-5, err_msg=col)
    assert (merged["predicted_class_got"] == merged["predicted_class_want"]).all()


def test_scores_every_cell_once_with_the_ensembles_numbers(files, tiny_ensemble, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    result = score_files(files, tiny_ensemble, out, ScoreConfig(chunk_size=25, batch_size=16), progress=False)
    df, meta = read_table(out)
    assert result["n_cells"] == len(df) == 140 and result["chunks"] == 4 + 3
    assert list(df.columns) == ["source_file", "cell_id", "prob_bright", "prob_spotty", "predicted_class", *FIELDS]
    assert_same_scores(df, reference)
    assert meta["n_cells"] == 140 and meta["classes"] == ["bright", "spotty"]
    assert not parts_dir(out).exists(), "parts are removed once the result is assembled"
    # file order and row order are kept
    with CellFile(files[0]) as cf:
        np.testing.assert_array_equal(df["cell_id"].to_numpy()[:80], cf.cell_ids())


def test_a_crashed_run_resumes_without_missing_or_duplicated_cells(files, tiny_ensemble, reference, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "scores.parquet"
    cfg = ScoreConfig(chunk_size=20, batch_size=16)
    real_write, calls = batch.write_part, []

    def crash_after_three(df, parts, chunk, meta=None):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")  # what a Ctrl-C / kill at this point looks like to the run
        calls.append(chunk.index)
        return real_write(df, parts, chunk, meta)

    monkeypatch.setattr(batch, "write_part", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        score_files(files, tiny_ensemble, out, cfg, progress=False)
    assert not out.exists()
    parts = sorted(p.name for p in parts_dir(out).glob("part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert not [p for p in parts_dir(out).iterdir() if p.name.startswith(".")], "no half-written part is left"

    monkeypatch.setattr(batch, "write_part", real_write)
    result = score_files(files, tiny_ensemble, out, cfg, progress=False)
    assert result["resumed_chunks"] == 3 and result["chunks"] == 4 + 3
    df, _ = read_table(out)
    assert len(df) == 140
    assert_same_scores(df, reference)


def test_parts_of_another_run_are_not_mixed_in(files, tiny_ensemble, reference, tmp_path, monkeypatch):
    """Parts of a run with other inputs are discarded (the rerun starts over), never assembled with new ones."""
    out = tmp_path / "scores.parquet"
    with monkeypatch.context() as m:
        m.setattr(batch, "assemble", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
        with pytest.raises(RuntimeError):
            score_files(files[:1], tiny_ensemble, out, ScoreConfig(chunk_size=40), progress=False)
    assert len(list(batch.parts_dir(out).glob("part-*.parquet"))) == 2
    result = score_files(files, tiny_ensemble, out, ScoreConfig(chunk_size=30), progress=False)
    assert result["resumed_chunks"] == 0 and set(result["discarded_run"]) == {"files", "chunk_size"}
    df, _ = read_table(out)
    assert len(df) == 140
    assert_same_scores(df, reference)


def test_duplicated_cell_ids_are_refused(files, tiny_ensemble, tmp_path):
    import h5py

    dup = tmp_path / "dup.h5sc"
    dup.write_bytes(Path(files[0]).read_bytes())
    key = "obs/scportrait_cell_id" if Path(files[0]).suffix == ".h5sc" else None
    with h5py.File(dup, "a") as h5:
        if key is None:
            h5["single_cell_index"][1, 1] = h5["single_cell_index"][0, 1]
        else:
            h5[key][1] = h5[key][0]
    with pytest.raises(DataError, match="1 duplicated cell id"):
        score_files([dup], tiny_ensemble, tmp_path / "d.parquet", progress=False)
    assert not (tmp_path / "d.parquet").exists()


def test_bad_inputs_are_clear_errors(files, tiny_ensemble, tmp_path):
    with pytest.raises(DataError, match="listed twice"):
        score_files([files[0], files[0]], tiny_ensemble, tmp_path / "a.parquet", progress=False)
    with pytest.raises(DataError, match="file not found"):
        score_files([tmp_path / "nope.h5"], tiny_ensemble, tmp_path / "b.parquet", progress=False)
    other = tmp_path / "other.h5sc"
    from training.io.formats import write_h5sc

    write_h5sc(other, np.zeros((3, 2, 8, 8), np.float32), np.arange(3), channel_names=["a", "b"])
    with pytest.raises(DataError, match="LC3B"):
        score_files([other], tiny_ensemble, tmp_path / "c.parquet", progress=False)


@pytest.mark.parametrize(("h", "w", "problem"), [(24, 20, "24x20; expected square crops"),
                                                  (4, 4, "4x4; expected at least 8x8")])
def test_crops_the_http_service_refuses_are_refused_before_any_chunk(files, tiny_ensemble, tmp_path, h, w, problem,
                                                                     monkeypatch, capsys):
    """``spatial score`` applies the HTTP service's size policy: the same refusal, named by file, nothing written."""
    from serving.cli.main import main
    from serving.service.validation import RequestError, check_size
    from training.io.formats import write_h5sc

    spec = Ensemble.load(tiny_ensemble).spec
    bad = write_h5sc(tmp_path / "odd.h5sc", np.full((3, len(spec.channels), h, w), 0.5, np.float32), np.arange(3),
                     channel_names=list(spec.channels))
    with pytest.raises(RequestError, match=problem):
        check_size(np.empty((0, len(spec.channels), h, w)), spec.image_size, resize=True)
    out = tmp_path / "s.parquet"
    with pytest.raises(DataError, match=rf"odd\.h5sc: crops are {problem}"):
        score_files([files[0], bad], tiny_ensemble, out, progress=False)
    monkeypatch.setattr("sys.argv", ["spatial", "score", str(bad), "--model", str(tiny_ensemble), "--out", str(out),
                                     "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and problem in err and "Traceback" not in err
    assert not out.exists() and not parts_dir(out).exists()


def test_cli_score_with_embeddings(files, tiny_ensemble, reference, tmp_path):
    from serving.cli.serving import add_commands

    app = typer.Typer()
    add_commands(app)
    out, summary = tmp_path / "cli.parquet", tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["score", *map(str, files), "--model", str(tiny_ensemble), "--out", str(out),
                                      "--embeddings", "--set", "score.chunk_size=64", "--metrics", str(summary),
                                      "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "140 cells" in result.output
    df = pd.read_parquet(out)
    assert_same_scores(df.drop(columns="embedding"), reference)
    emb = np.stack(df["embedding"].to_numpy())
    assert emb.shape == (140, 32)  # the tiny model's last stage has 32 channels
    # the members' mean penultimate features, as the ensemble gives them for the stored stacks (rows in file order)
    ens = Ensemble.load(tiny_ensemble)
    want = []
    for f in files:
        with CellFile(f) as cf:
            x = ens.preprocess(ens.select_channels(cf.read(0, cf.n_cells)))
        want.append(ens.predict_tensor(x, with_features=True)["features"])
    np.testing.assert_allclose(emb, np.concatenate(want), rtol=1e-4, atol=1e-5)
    assert json.loads(summary.read_text())["n_cells"] == 140


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_ray_data_on_two_nodes_matches_local(files, tiny_ensemble, reference, tmp_path, ray_cluster):
    out = tmp_path / "ray.parquet"
    result = score_files(files, tiny_ensemble, out, ScoreConfig(chunk_size=20, batch_size=32),
                         ray_address=ray_cluster.address, progress=False, keep_parts=True)
    df, _ = read_table(out)
    assert result["n_cells"] == len(df) == 140
    assert_same_scores(df, reference)
    nodes = {json.loads(pq.read_schema(p).metadata[b"spatial"])["ray_node"]
             for p in parts_dir(out).glob("part-*.parquet")}
    assert len(nodes) == 2, "both nodes of the cluster scored chunks"


def test_scores_the_registered_champion(files, tiny_ensemble, reference, tmp_path):
    """``--model models:/NAME@ALIAS`` goes through the MLflow registry (training.tracking.resolve_model)."""
    import mlflow

    from training.config import MlflowConfig, RegistryConfig
    from training.tracking import ensure_experiment, log_ensemble_model, register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(uri), "score"))  # artifacts in tmp_path
    with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.log_metric("test_balanced_accuracy", 0.9)
        model_uri = log_ensemble_model(tiny_ensemble, np.zeros((2, 1, 32, 32), np.float32))
    assert not [w for w in caught if "type hint" in str(w.message)], "MLflow asks for predict's type hints"
    register(model_uri, run.info.run_id, RegistryConfig(model_name="tiny-score"))
    out = tmp_path / "champion.parquet"
    score_files(files[:1], "models:/tiny-score@champion", out, ScoreConfig(chunk_size=50), progress=False,
                mlflow=MlflowConfig(tracking_uri=uri))
    df, meta = read_table(out)
    assert meta["model"]["name"] == "tiny-score" and meta["model"]["version"] == 1
    assert meta["model"]["alias"] == "champion"
    assert_same_scores(df, reference[reference["source_file"] == str(files[0].resolve())])


# -- channel names across the two formats -----------------------------------------------------------------------------
SCPORTRAIT_CHANNELS = ["nucleus", "cytosol", "hoechst", "wga", "lc3b"]  # what scPortrait writes for the thesis stack
SCPORTRAIT_KINDS = ["mask", "mask", "image_channel", "image_channel", "image_channel"]


@pytest.fixture(scope="module")
def sparcspy_model(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-member model trained on the SPARCSpy (.h5) files only: its channel is SPARCSpy's 'LC3B'."""
    from conftest import make_cells, tiny_params

    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.io.formats import write_sparcspy
    from training.regimes.ensemble_training import train_ensemble

    out = tmp_path_factory.mktemp("sparcspy")
    rng, rows = np.random.default_rng(1), []
    for kind in ("bright", "spotty"):
        for slide in range(2):
            name = f"{kind}_{slide}.h5"
            write_sparcspy(out / name, make_cells(rng, kind, 40), np.arange(40) + 1000 * slide)
            rows.append({"path": name, "label": kind, "group": f"{kind}_{slide}", "condition": kind})
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    p = tiny_params(out, **{"ensemble.members": 1, "train.epochs": 1, "split.test_fraction": 0.5,
                            "split.val_fraction": 0.3})
    table, summary = make_splits(build_index(out / "manifest.csv", progress=False), p.split)
    ens = train_ensemble(prepare_data(table, summary["classes"], p), p, out / "model", progress=False)
    assert ens.spec.channels == ["LC3B"] and ens.spec.source_channels[-1] == "LC3B"
    return out / "model"


def _scportrait_copy(source: Path, dest: Path, with_anndata: bool) -> Path:
    """The same cells as an .h5sc with scPortrait's own (lowercase) channel names."""
    with CellFile(source) as cf:
        images, ids = cf.read(0, cf.n_cells), cf.cell_ids()
    if not with_anndata:
        from training.io.formats import write_h5sc

        return write_h5sc(dest, images, ids, SCPORTRAIT_CHANNELS, SCPORTRAIT_KINDS)
    anndata = pytest.importorskip("anndata")
    adata = anndata.AnnData(obs=pd.DataFrame({"scportrait_cell_id": ids}, index=[str(i) for i in ids]),
                            obsm={"single_cell_images": images.astype(np.float16)},
                            uns={"single_cell_images/channel_names": np.array(SCPORTRAIT_CHANNELS),
                                 "single_cell_images/channel_mapping": np.array(SCPORTRAIT_KINDS)})
    adata.write_h5ad(dest)
    return dest


@pytest.mark.parametrize("with_anndata", [False, True], ids=["spatial-writer", "anndata-writer"])
def test_model_trained_on_sparcspy_scores_an_h5sc_with_scportrait_channel_names(
        files, sparcspy_model, tmp_path, with_anndata):
    sparcspy = files[1]  # spotty_s1.h5
    h5sc = _scportrait_copy(sparcspy, tmp_path / "spotty_s1.h5sc", with_anndata)
    want = score_files([sparcspy], sparcspy_model, tmp_path / "want.parquet", progress=False)
    got = score_files([h5sc], sparcspy_model, tmp_path / "got.parquet", progress=False)  # LC3B matches lc3b
    assert want["n_cells"] == got["n_cells"] == 60
    a, b = pd.read_parquet(tmp_path / "want.parquet"), pd.read_parquet(tmp_path / "got.parquet")
    assert (a["cell_id"].to_numpy() == b["cell_id"].to_numpy()).all()
    np.testing.assert_allclose(b["prob_spotty"], a["prob_spotty"], rtol=1e-4, atol=1e-5)


def test_channel_map_option_names_the_file_channel(files, sparcspy_model, tmp_path):
    from serving.cli.serving import add_commands
    from training.io.formats import write_h5sc

    with CellFile(files[1]) as cf:
        images, ids = cf.read(0, cf.n_cells), cf.cell_ids()
    renamed = write_h5sc(tmp_path / "renamed.h5sc", images, ids,
                         ["nuc_mask", "cyto_mask", "dna", "wga", "lc3b_reporter"], SCPORTRAIT_KINDS)
    with pytest.raises(DataError, match=r"no channel named 'LC3B'.*--channel-map"):
        score_files([renamed], sparcspy_model, tmp_path / "x.parquet", progress=False)
    app = typer.Typer()
    add_commands(app)
    out = tmp_path / "mapped.parquet"
    res = CliRunner().invoke(app, ["score", str(renamed), "--model", str(sparcspy_model), "--out", str(out),
                                   "--channel-map", "lc3b=lc3b_reporter", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    want = score_files([files[1]], sparcspy_model, tmp_path / "want.parquet", progress=False)
    assert want["n_cells"] == len(pd.read_parquet(out)) == 60
    np.testing.assert_allclose(pd.read_parquet(out)["prob_spotty"], pd.read_parquet(tmp_path / "want.parquet")[
        "prob_spotty"], rtol=1e-4, atol=1e-5)
    # two channels equal ignoring case: the user has to say which one
    twice = write_h5sc(tmp_path / "twice.h5sc", images[:, :2], ids, ["LC3b", "lc3B"], ["image_channel"] * 2)
    with pytest.raises(DataError, match="matches several channels"):
        score_files([twice], sparcspy_model, tmp_path / "y.parquet", progress=False)


def test_service_default_model_comes_from_the_registry_params(tmp_path, monkeypatch, tiny_ensemble):
    """Under a plain `bentoml serve` (no spatial serve, no $SPATIAL_MODEL) the model is registry.* of params.yaml,
    looked up in mlflow.* of the same file."""
    import yaml

    from serving.model import ServedModel
    from training.errors import ModelError

    monkeypatch.delenv("SPATIAL_MODEL", raising=False)
    monkeypatch.delenv("SPATIAL_MODEL_DIR", raising=False)
    monkeypatch.delenv("SPATIAL_PARAMS", raising=False)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "reg.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "registry": {"model_name": "screen-classifier", "alias": "prod"},
        "mlflow": {"tracking_uri": f"sqlite:///{db}"}}))
    with pytest.raises(ModelError, match=r"models:/screen-classifier@prod.*reg\.db"):
        ServedModel.from_env()
    monkeypatch.setenv("SPATIAL_MODEL", str(tiny_ensemble))  # an explicit model still wins
    assert ServedModel.from_env().path == tiny_ensemble
