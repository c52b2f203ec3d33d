"""Novelty against the screen's own non-targeting controls: how unlike a control cell on the same slide a cell is.

Why not the model's novelty: a model's novelty measures distance to its *training* cells, and every screen slide
differs from the training slides in its optics (gain, offset, focus, photon budget). On the simulated screen the
trained members' features cannot tell the novel phenotype from that shift (README "Why these features cannot see
the novel phenotype"). In a pooled screen the non-targeting controls share every slide, its optics and its
stimulation with every knockout, so the distance to them cancels the slide and leaves the genotype's effect.

Features: the multi-stage pooled statistics (``stage_features``: per-stage channel means and standard deviations)
of networks with the model's architecture at seeded random initialisations (``discover.networks``; their distances
are averaged like an ensemble's members, which steadies the ranking; one network against three is measured by
``benchmarks/discovery_transfer.py``). Nothing has trained them to ignore anything, so they keep the few large
bright aggregates that the classifier learned to read as "autophagy on"; the controls reference removes the slide
effects that such unlearned features also keep. Measured (README "The
discovery queue", ``benchmarks/discovery_transfer.py``): the planted novel gene tops the queue on all five simulated
screens at quantiles 0.9-0.98; over 0.99 mostly debris passes; the model's own novelty never finds it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from serving.discovery.queue import NOT_NOVEL, cluster_embeddings
from serving.model import ServedModel
from training.config import DiscoverConfig, ModelConfig
from training.engine import forward
from training.errors import DataError
from training.io.formats import CellFile
from training.models.factory import build_model
from training.uncertainty.ensemble import EnsembleSpec
from training.uncertainty.novelty import KNNNovelty, stage_features

BLOCK = 1024  # cells read and featurised at a time


def random_network(model: ModelConfig, in_chans: int, n_classes: int, seed: int) -> torch.nn.Module:
    """The architecture ``model`` at a seeded random initialisation (eval mode), whatever checkpoint ``model.pretrained``
    names: these networks are random by design. The global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model.model_copy(update={"pretrained": None}), in_chans, n_classes)
    return net.eval()


def random_filter_network(spec: EnsembleSpec, seed: int) -> torch.nn.Module:
    """The architecture of the ensemble ``spec`` at a seeded random initialisation (eval mode): the feature
    extractor."""
    return random_network(ModelConfig(**{**spec.model, "pretrained": None}), len(spec.channels), len(spec.classes),
                          seed)


def morphology_features(cells: pd.DataFrame, model: ServedModel, seeds: Sequence[int] = (0,),
                        progress: bool = False) -> list[np.ndarray]:
    """Per seed, ``stage_features`` of :func:`random_filter_network` for the rows of ``cells`` (``source_file,
    cell_id``), in table order (float32): the model's channels and preprocessing, the pixels read once from the files
    in blocks of ``BLOCK`` cells for every network, on the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets = [random_filter_network(model.spec, seed).to(device) for seed in seeds]
    out: list[np.ndarray] = []
    bar = tqdm(total=len(cells), desc="control features", unit="cell", disable=not progress)
    for source, part in cells.reset_index(drop=True).groupby("source_file", sort=True):
        with CellFile(os.fspath(source)) as f:
            rows = f.rows_of(part["cell_id"])
            order = np.argsort(rows, kind="stable")
            channels = f.resolve_channels(model.spec.channels)
            for s in range(0, len(order), BLOCK):
                take = order[s : s + BLOCK]
                x = model.preprocess(f.read_rows(rows[take], channels)).to(device)
                for k, net in enumerate(nets):
                    maps: list = []
                    forward(net, x, with_features=False, stages=maps)
                    feats = stage_features(maps)
                    if len(out) <= k:
                        out.append(np.zeros((len(cells), feats.shape[1]), dtype=np.float32))  # 1e6 x 480: 1.9 GB
                    out[k][part.index.to_numpy()[take]] = feats
                bar.update(len(take))
    bar.close()
    return out or [np.zeros((0, 1), dtype=np.float32) for _ in seeds]


def control_novelty(features: np.ndarray, is_control: np.ndarray, groups: Sequence, k: int = 10,
                    max_controls: int = 5000, min_controls: int = 50, seed: int = 0) -> np.ndarray:
    """Per cell: the distance (L2-normalised ``features``) to its k-th nearest control cell of the same group (a
    slide: one source file), a control cell skipping itself. Cells of a group with fewer than ``min_controls``
    controls are measured against every group's controls pooled. At most ``max_controls`` controls per reference (a
    seeded subset) are searched. The one kNN: ``training.uncertainty.novelty.KNNNovelty``."""
    is_control = np.asarray(is_control, dtype=bool)
    groups = np.asarray(groups, dtype=object).astype(str)
    if is_control.sum() < k + 1:
        raise DataError(f"the control reference needs at least {k + 1} control cells with a genotype (k={k}); "
                        f"found {int(is_control.sum())}: check the library's is_control column, or use "
                        "discover.reference=model")
    names, inverse = np.unique(groups, return_inverse=True)
    n_ctrl = np.bincount(inverse, weights=is_control, minlength=len(names))
    own = n_ctrl[inverse] >= min_controls
    references = [(inverse == g, inverse == g) for g in np.flatnonzero(n_ctrl >= min_controls)]
    if (~own).any():
        references.append((~own, np.ones(len(groups), bool)))  # (cells scored, cells whose controls are the bank)
    scores = np.zeros(len(features))
    for cells, bank in references:
        knn = KNNNovelty(k, max_controls, seed, input="stages").fit(features[bank & is_control])
        scores[cells & ~is_control] = knn.score(features[cells & ~is_control])
        scores[cells & is_control] = knn.score(features[cells & is_control], leave_self_out=True)
    return scores


def controls_queue(cells: pd.DataFrame, is_control: np.ndarray, model: ServedModel | None, cfg: DiscoverConfig,
                   threshold: float | None = None, progress: bool = False) -> tuple[np.ndarray, float, np.ndarray]:
    """The novel cells of ``cells`` (``source_file, cell_id``) against the controls: per cell the novelty (averaged
    over ``cfg.networks`` feature networks, slides = source files), the threshold (``threshold``, else
    ``cfg.quantile`` of the controls' own novelty) and the cluster (``NOT_NOVEL`` under the threshold; the novel
    cells clustered on every network's features joined)."""
    if model is None:
        raise DataError("discover.reference=controls needs the model (its architecture and preprocessing)")
    feats = morphology_features(cells, model, range(cfg.seed, cfg.seed + cfg.networks), progress)
    slides = cells["source_file"].astype(str).to_numpy()
    nov = np.mean([control_novelty(f, is_control, slides, cfg.knn_k, cfg.max_controls, cfg.min_controls, cfg.seed)
                   for f in feats], axis=0)
    thr = float(threshold) if threshold is not None else float(np.quantile(nov[is_control], cfg.quantile))
    novel = nov > thr
    labels = np.full(len(cells), NOT_NOVEL, dtype=np.int64)
    joint = np.concatenate([f[novel] for f in feats], axis=1).astype(np.float64)
    labels[novel] = cluster_embeddings(joint, cfg.max_clusters, cfg.pca_components, cfg.seed)
    return nov, thr, labels
