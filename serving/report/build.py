"""The screen report: one self-contained HTML file (images base64-embedded, a few lines of vanilla JS for the gene
table) from whatever the pipeline has written. Each section appears only when its inputs exist:

* ``model``: ``metrics/evaluate.json``, ``reports/evaluate/{confusion,reliability,embedding,uncertainty}.png``,
  held-out-class detection (the ``heldout*`` metrics);
* ``galleries``: per class the most and least confident test cells and the most novel cells
  (``reports/evaluate/predictions.parquet``, novel cells also from ``reports/screen/scores.parquet``), thumbnails
  read from the cells' files;
* ``studies``: ``reports/al/*`` (learning curves, summary) and ``metrics/ssl_*.json``;
* ``screen``: ``reports/screen/bins/bins.parquet`` (counts and a gallery per bin), ``reports/screen/hits/genes.csv``
  (sortable, searchable table), ``volcano.png``, ``rank.png``, ``summary.json``;
* ``timecourse``: class probability per timepoint with a 95 % confidence interval (cells with a ``timepoint`` in
  the cell index, from the predictions or the screen scores);
* ``discovery``: ``reports/discovery/clusters.csv`` and ``cluster_<k>.png``.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from serving.pages import content_policy
from training.config import Params
from training.errors import DataError, SpatialError
from training.io.atomic import atomic_path
from training.io.tables import read_csv, read_json, read_table

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MODEL_METRICS = ("balanced_accuracy", "macro_f1", "accuracy", "nll", "ece", "brier")


# -- small HTML pieces --------------------------------------------------------------------------------------------
def esc(x: object) -> str:
    return html.escape(str(x))


def img_tag(data: bytes, alt: str, cls: str = "fig") -> str:
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def figure(path: Path, caption: str) -> str:
    return f"<figure>{img_tag(path.read_bytes(), caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def fmt(v: object) -> str:
    if isinstance(v, bool | np.bool_):
        return "yes" if v else ""
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        if not np.isfinite(v):
            return ""
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4g}"
    return esc(v)


def table(df: pd.DataFrame, table_id: str = "", sortable: bool = False) -> str:
    attrs = (f' id="{table_id}"' if table_id else "") + (' class="sortable"' if sortable else "")
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>"
                   for r in df.itertuples(index=False))
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


# -- cell thumbnails ----------------------------------------------------------------------------------------------
def gallery(cells: pd.DataFrame, px: int, caption: Callable[[pd.Series], str], root: Path | None = None) -> str:
    """Composite thumbnails of ``cells`` (``source_file, cell_id``) read from their files; unreadable files are
    skipped with a note (the report is still written)."""
    from serving.labeling.thumbs import locate, render
    from training.errors import SpatialError
    from training.io.formats import CellFile

    if cells.empty:
        return "<p class='note'>no cells</p>"
    cells = cells.reset_index(drop=True)
    if root is not None:
        cells = cells.assign(source_file=[f if os.path.isabs(f) else os.path.join(root, f)
                                          for f in cells["source_file"].astype(str)])
    try:
        located, layouts = locate(cells[["source_file", "cell_id"]].astype({"source_file": str}))
    except SpatialError as exc:
        return f"<p class='note'>cells not shown: {esc(exc)}</p>"
    tiles = []
    opened: dict[str, CellFile] = {}
    try:
        for i, r in located.iterrows():
            name = str(r["source_file"])
            f = opened.setdefault(name, CellFile(name))
            stack = np.nan_to_num(f.read(int(r["row"]), int(r["row"]) + 1, check=False)[0])
            png = render(stack, layouts[name]["image"], "composite", 1.0, px)
            tiles.append(f'<div class="tile">{img_tag(png, f"cell {r.cell_id}", "cell")}'
                         f"<span>{esc(caption(cells.iloc[i]))}</span></div>")
    finally:
        for f in opened.values():
            f.close()
    return f'<div class="gallery">{"".join(tiles)}</div>'


def read_object(path: Path) -> dict:
    """A JSON file that must hold an object (the pipeline's metrics and summaries), or :class:`DataError` naming it."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object of named figures, found a {type(obj).__name__}")
    return obj


# -- sections -----------------------------------------------------------------------------------------------------
def _heldout_order(name: str) -> tuple[str, float]:
    """Sort key of a held-out row: the class, then its timepoints in time (``heldout_tc_2h`` before ``_14h``)."""
    base, _, last = name.rpartition("_")
    if base and last.endswith("h"):
        try:
            return base, float(last[:-1])
        except ValueError:
            pass
    return name, -1.0


def model_section(root: Path, p: Params) -> str | None:
    mfile, ev = root / "metrics/evaluate.json", root / "reports/evaluate"
    if not mfile.is_file() and not ev.is_dir():
        return None
    parts = []
    if mfile.is_file():
        m = read_object(mfile)
        main = pd.DataFrame([(k, m[k]) for k in MODEL_METRICS if k in m], columns=["metric", "test split"])
        parts.append(table(main, "model-metrics"))
        held = [(k.split("/")[0], k.split("/")[1], v) for k, v in m.items()
                if k.startswith("heldout") and k.count("/") == 2 and k.endswith("/auroc")]
        if held:
            rows = pd.DataFrame(held, columns=["held-out cells", "score", "auroc"])
            auroc = rows.pivot(index="held-out cells", columns="score", values="auroc")
            auroc = auroc.reindex(sorted(auroc.index, key=_heldout_order)).reset_index()
            parts.append("<h3>Held-out-class detection</h3><p>AUROC of each uncertainty score for telling cells of "
                         "classes the model never saw from test cells (0.5 = chance).</p>"
                         + table(auroc, "heldout-metrics"))
    figs = [(n, c) for n, c in (("confusion.png", "confusion matrix (test split)"),
                                ("reliability.png", "reliability diagram before / after temperature scaling"),
                                ("embedding.png", "embedding map (penultimate features, PCA)"),
                                ("uncertainty.png", "epistemic uncertainty: test vs held-out classes"))
            if (ev / n).is_file()]
    if figs:
        parts.append('<div class="figs">' + "".join(figure(ev / n, c) for n, c in figs) + "</div>")
    return section("model", "The model", "".join(parts)) if parts else None


def galleries_section(root: Path, p: Params) -> str | None:
    pred_file, scores_file = root / "reports/evaluate/predictions.parquet", root / "reports/screen/scores.parquet"
    k, px = p.report.gallery_cells, p.report.thumbnail_px
    parts = []
    if pred_file.is_file():
        pred = read_table(pred_file)[0]
        test = pred[pred["split"] == "test"] if "split" in pred else pred
        for cls in sorted(test["predicted_class"].unique()):
            c = test[test["predicted_class"] == cls].sort_values("confidence", ascending=False, kind="stable")
            cap = (lambda r: f"{r['confidence']:.3f}")  # noqa: E731
            parts.append(f'<h3 class="class-gallery">{esc(cls)}</h3><p>most confident</p>{gallery(c.head(k), px, cap, root)}'
                         f"<p>least confident</p>{gallery(c.tail(k).iloc[::-1], px, cap, root)}")
    novel_src = scores_file if scores_file.is_file() else pred_file if pred_file.is_file() else None
    if novel_src is not None:
        cols = ["source_file", "cell_id", "novelty"]
        s = read_table(novel_src, columns=cols)[0].dropna(subset=["novelty"])
        top = s.sort_values("novelty", ascending=False, kind="stable").head(k)
        parts.append(f"<h3>most novel cells ({esc(novel_src.name)})</h3>"
                     + gallery(top, px, lambda r: f"novelty {r['novelty']:.1f}", root))
    return section("galleries", "Cells the model is sure and unsure about", "".join(parts)) if parts else None


def studies_section(root: Path, p: Params) -> str | None:
    parts = []
    al = root / "reports/al"
    if al.is_dir():
        for png in sorted(al.glob("*.png")):
            parts.append(figure(png, f"active learning: {png.stem.replace('_', ' ')} (bands: spread over seeds)"))
        summ = al / "summary.json"
        if summ.is_file():
            s = read_object(summ)
            flat = {k: v for k, v in s.items() if isinstance(v, int | float | str)}
            if flat:
                parts.append(table(pd.DataFrame(list(flat.items()), columns=["AL summary", "value"])))
    ssl = sorted((root / "metrics").glob("ssl_*.json")) if (root / "metrics").is_dir() else []
    ssl = [f for f in ssl if not f.stem.endswith("_train")]
    if ssl:
        rows = []
        for f in ssl:
            m = read_object(f)
            rows.append({"arm": f.stem.removeprefix("ssl_"), **{k: m.get(k) for k in MODEL_METRICS if k in m}})
        parts.append("<h3>Semi-supervised vs supervised (same label budget)</h3>" + table(pd.DataFrame(rows), "ssl"))
    return section("studies", "Label efficiency", "".join(parts)) if parts else None


def screen_section(root: Path, p: Params) -> str | None:
    base = root / "reports/screen"
    bins_file, hits = base / "bins/bins.parquet", base / "hits"
    parts = []
    if bins_file.is_file():
        bins = read_table(bins_file)[0]
        counts = bins.groupby("bin", sort=True).agg(cells=("cell_id", "size"), min_score=("score", "min"),
                                                    max_score=("score", "max")).reset_index()
        parts.append("<h3>Excision bins</h3>" + table(counts, "bin-counts"))
        for b, grp in bins.groupby("bin", sort=True):
            top = grp.sort_values("score", ascending=False, kind="stable").head(p.report.gallery_cells)
            parts.append(f'<h4 class="bin-gallery">bin {esc(b)}</h4>'
                         + gallery(top, p.report.thumbnail_px, lambda r: f"{r['score']:.5f}", root))
    genes_file = hits / "genes.csv"
    if genes_file.is_file():
        genes = read_csv(genes_file)
        if "rank" in genes:
            genes = genes.sort_values("rank", kind="stable")
        parts.append('<h3>Genes</h3><input id="gene-search" type="search" placeholder="search genes" '
                     'aria-label="search genes"> <span id="gene-count"></span>' + table(genes, "genes", sortable=True))
    figs = [(n, c) for n, c in (("volcano.png", "volcano plot"), ("rank.png", "gene rank plot")) if (hits / n).is_file()]
    if figs:
        parts.append('<div class="figs">' + "".join(figure(hits / n, c) for n, c in figs) + "</div>")
    summ = hits / "summary.json"
    if summ.is_file():
        s = {k: v for k, v in read_object(summ).items() if isinstance(v, int | float | str)}
        if s:
            parts.append(table(pd.DataFrame(list(s.items()), columns=["hit calling", "value"]), "hits-summary"))
    return section("screen", "The screen", "".join(parts)) if parts else None


def timecourse_profile(cells: pd.DataFrame, prob: str) -> pd.DataFrame:
    """Mean of ``prob`` per timepoint with a 95 % t-interval (``timepoint, n, mean, low, high``)."""
    from scipy import stats

    rows = []
    for t, grp in cells.groupby("timepoint", sort=True):
        v = grp[prob].to_numpy(np.float64)
        mean = float(v.mean())
        half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else np.nan
        rows.append({"timepoint": float(t), "n": len(v), "mean": mean, "low": mean - half, "high": mean + half})
    return pd.DataFrame(rows)


def timecourse_section(root: Path, p: Params) -> str | None:
    idx_file = root / p.index.out
    sources = [f for f in (root / "reports/evaluate/predictions.parquet", root / "reports/screen/scores.parquet")
               if f.is_file()]
    if not idx_file.is_file() or not sources:
        return None
    idx = read_table(idx_file)[0]
    if "timepoint" not in idx:
        return None
    idx = idx[["source_file", "cell_id", "timepoint"]].astype({"source_file": str})
    idx["timepoint"] = pd.to_numeric(idx["timepoint"], errors="coerce")
    idx = idx.dropna(subset=["timepoint"])
    if idx.empty:
        return None
    idx["key"] = [os.path.abspath(os.path.join(root, f)) for f in idx["source_file"]]
    frames = []
    for f in sources:
        s = read_table(f)[0]
        s["key"] = [os.path.abspath(os.path.join(root, x)) for x in s["source_file"].astype(str)]
        frames.append(s.merge(idx[["key", "cell_id", "timepoint"]], on=["key", "cell_id"]))
    cells = pd.concat(frames, ignore_index=True).drop_duplicates(["key", "cell_id"])
    probs = [c for c in cells.columns if c.startswith("prob_")]
    if cells.empty or not probs:
        return None
    cls = p.report.timecourse_class or probs[0].removeprefix("prob_")
    if f"prob_{cls}" not in cells:
        return section("timecourse", "Timecourse", f"<p class='note'>no class '{esc(cls)}' in the scores</p>")
    prof = timecourse_profile(cells, f"prob_{cls}")
    png = _plot_profile(prof, cls)
    return section("timecourse", "Timecourse", f"<figure>{img_tag(png, 'timecourse profile')}<figcaption>mean "
                   f"P({esc(cls)}) per timepoint, 95 % confidence interval</figcaption></figure>"
                   + table(prof, "timecourse-table"))


def _plot_profile(prof: pd.DataFrame, cls: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot(prof["timepoint"], prof["mean"], "o-", color="#7b2cbf")
    ax.fill_between(prof["timepoint"], prof["low"], prof["high"], alpha=0.25, color="#7b2cbf")
    ax.set(xlabel="time (h)", ylabel=f"P({cls})", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def discovery_section(root: Path, p: Params) -> str | None:
    d = root / "reports/discovery"
    if not d.is_dir():
        return None
    parts = []
    m_file = root / "metrics/discovery.json"
    m = read_object(m_file) if m_file.is_file() else {}
    if m.get("reference"):
        against = ("the non-targeting controls of the same slide" if m["reference"] == "controls"
                   else "the model's validation cells")
        top = (f"; top gene of cluster 0: <b>{esc(m['top_cluster_top_gene'])}</b> (FDR {fmt(m['top_cluster_top_gene_fdr'])})"
               if m.get("top_cluster_top_gene") else "")
        parts.append(f'<p id="discovery-summary">{fmt(m["n_novel"])} of {fmt(m["n_scored"])} cells are unlike '
                     f"{against} (over the {fmt(m['quantile'])} quantile of their novelty), in {fmt(m['n_clusters'])} "
                     "clusters, "
                     f"cluster 0 first in the queue{top}.</p>")
    if (d / "clusters.csv").is_file():
        parts.append(table(read_csv(d / "clusters.csv"), "clusters"))
    if (d / "cluster_genes.csv").is_file():
        cg = read_csv(d / "cluster_genes.csv")
        parts.append("<h3>Genes enriched per cluster</h3><p>The five most enriched genes of each cluster (every gene: "
                     "<code>reports/discovery/cluster_genes.csv</code>).</p>"
                     + table(cg.groupby("cluster", sort=False).head(5), "cluster-genes"))
    pngs = sorted(d.glob("cluster_*.png"), key=lambda f: (len(f.stem), f.stem))
    if pngs:
        parts.append('<div class="figs">' + "".join(figure(f, f.stem.replace("_", " ")) for f in pngs) + "</div>")
    return section("discovery", "Novel phenotypes", "".join(parts)) if parts else None


SECTIONS: tuple[tuple[str, Callable[[Path, Params], str | None]], ...] = (
    ("model", model_section), ("galleries", galleries_section), ("studies", studies_section),
    ("screen", screen_section), ("timecourse", timecourse_section), ("discovery", discovery_section),
)


def build_report(root: str | os.PathLike, out: str | os.PathLike, params: Params | None = None) -> list[str]:
    """Write the report to ``out`` (atomically); returns the sections it holds. An input that cannot be read, or
    holds something other than the pipeline writes, is a :class:`DataError` naming it, and nothing is written."""
    root, p = Path(root), params or Params()
    done, bodies = [], []
    for name, fn in SECTIONS:
        try:
            body = fn(root, p)
        except SpatialError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:  # a readable file, other contents
            raise DataError(f"{root}: an input of the report's '{name}' section is not what the pipeline writes "
                            f"({type(exc).__name__}: {exc})") from None
        if body:
            done.append(name)
            bodies.append(body)
    nav = " · ".join(f'<a href="#{n}">{n}</a>' for n in done)
    page = (STATIC / "report.html").read_text()
    page = page.replace("{{CSP}}", content_policy(page, "img-src data:")).replace("{{NAV}}", nav).replace(
        "{{BODY}}", "\n".join(bodies) or "<p>No inputs yet: run <code>dvc repro</code>.</p>")
    with atomic_path(out, suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report %s: %s", out, ", ".join(done))
    return done
