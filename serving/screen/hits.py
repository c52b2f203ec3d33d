"""Gene hits from a SPARCS screen, with a false discovery rate calibrated on non-targeting (NT) controls.

Two inputs, one gene-level null:

* **counts** (``call_counts``): per replicate, each bin's reads become *cell equivalents* (``cells_cut * reads /
  total reads``), pooled over the phenotype bins. The null expectation of a gRNA is its library frequency times the
  NT tail rate (cells in the bins per unit library frequency, from the NT gRNAs only, so hits do not shift it). The
  variance ``a*E + phi*E^2 + E^2 * (1/library reads + 1/library cells)`` has its over-dispersion ``(a >= 1, phi >=
  0)`` fitted on the NT gRNAs (method of moments); each NT gRNA's own z-score comes from the fit on the other NT
  gRNAs (``nt_null``), out of sample as a targeting gRNA's is. gRNA z-scores are combined over replicates
  (Stouffer).
* **cells** (``call_cells``, genotype known per cell): a gRNA's phenotype rate is the mean calibrated probability of
  its cells (``soft``; each cell weighted down by its ensemble spread ``2 p (1-p) * epistemic``) or the share with
  ``p > 0.5`` (``threshold``); its z-score comes from bootstrapping NT cells matched on cell count.

Gene level (both): Stouffer's Z over the gene's gRNAs against NT pseudo-genes with the same number of gRNAs (MAUDE's
idea, drawn as a bootstrap like optical pooled screen pipelines do): one-sided p-value (enrichment) = the larger of
the empirical and the predictive-t p (``PseudoGeneNull.p_value``), Benjamini-Hochberg over targeting genes. In
both modes, by default (``gene_null``), also at least the p among pseudo-genes drawn from the screen's own gRNAs,
those of genes whose other gRNAs stand out left out (``quiet_siblings``): an NT sample under-samples the tail of the
screen's null gRNAs (PCR jackpots in counts, skewed means of few cells in cells mode). With 40-400 NT gRNAs null genes
got too many p-values below 0.01 or 0.001, with 1,000 too many below 1e-5 at 20,000 genes (FINDINGS, "Between 60
and 20,000 genes", "Hit calling at genome scale").
``call_sparcs`` is the published SPARCS statistic, kept as the baseline: no multiple-testing correction.
``call_rra`` is MAGeCK's alpha-RRA on the same counts, the field's standard gene test, as a second baseline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import pandas as pd
from scipy import stats

from serving.screen.counts import SampleSheet
from training.config import SIBLING_P, GeneNull, NtNull
from training.errors import DataError

PSEUDO_PREFIX = "NT_pseudo_"


@dataclass
class HitsResult:
    """Per-gene and per-gRNA tables of one method, plus a JSON-able summary."""

    method: str
    genes: pd.DataFrame  # gene, n_grnas, effect, z, p_value, fdr, rank, is_hit, is_control
    grnas: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


# -- shared pieces ---------------------------------------------------------------------------------------------------
def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN)."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def fit_dispersion(obs: np.ndarray, exp: np.ndarray, known: np.ndarray | None = None) -> tuple[float, float]:
    """Over-dispersion of cell counts ``Var = a*E + phi*E^2 (+ known)`` by the method of moments (``a >= 1`` is the
    Poisson floor, ``phi >= 0``): least squares of ``((O-E)^2 - known) / E`` on ``E``."""
    obs, exp = np.asarray(obs, float), np.asarray(exp, float)
    known = np.zeros_like(exp) if known is None else np.asarray(known, float)
    ok = exp > 1e-9
    if ok.sum() < 2:
        return 1.0, 0.0
    e = exp[ok]
    y = ((obs[ok] - e) ** 2 - known[ok]) / e
    if np.ptp(e) > 0:
        phi, a = np.polyfit(e, y, 1)
    else:
        phi, a = 0.0, float(y.mean())
    if a < 1.0 or phi < 0:
        a = max(1.0, float(a)) if phi >= 0 else max(1.0, float(y.mean()))
        phi = max(0.0, float(np.sum((y - a) * e) / np.sum(e * e)))
    return float(a), float(phi)


def _stouffer_by_group(codes: np.ndarray, z: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    n = np.bincount(codes, minlength=n_groups).astype(float)
    s = np.bincount(codes, weights=z, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / np.sqrt(n), n


@dataclass(frozen=True)
class PseudoGeneNull:
    """Stouffer's Z of NT pseudo-genes of ``n`` gRNAs (bootstrap draws, sorted) for each gRNA count ``n``."""

    draws: dict[int, np.ndarray]
    m: int  # NT gRNAs it was drawn from

    def p_value(self, z: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One-sided p of each ``z`` (a gene of ``n`` gRNAs) and its rescaled z. The p-value is the larger of

        * the empirical one, ``(1 + #pseudo-genes >= z) / (1 + draws)``: exact for any shape of the NT
          distribution (skewed by a few jackpotted cells when a bin holds under one cell per gRNA), and
        * the predictive t: ``(z - mean) / (sd * sqrt(1 + n/m))`` on ``m - 1`` degrees of freedom, which widens
          the null when it rests on few NT gRNAs (their mean and sd are themselves estimates).
        """
        p = np.empty(len(z))
        zr = np.empty(len(z))
        for k, null in self.draws.items():
            sel = n == k
            if not sel.any():
                continue
            mu, sd = float(null.mean()), float(null.std(ddof=1)) or 1.0
            zr[sel] = (z[sel] - mu) / (sd * np.sqrt(1.0 + k / self.m))
            emp = (1 + len(null) - np.searchsorted(null, z[sel], side="left")) / (1 + len(null))
            p[sel] = np.maximum(emp, stats.t.sf(zr[sel], df=self.m - 1))
        return p, zr


def pseudo_gene_null(z_nt: np.ndarray, sizes: np.ndarray, draws: int, rng: np.random.Generator) -> PseudoGeneNull:
    """Stouffer's Z over ``n`` NT gRNAs drawn at random (bootstrap: with replacement), ``draws`` times for each
    gRNA count ``n`` in ``sizes``."""
    z_nt = np.asarray(z_nt, float)
    m = len(z_nt)
    if m < 2:
        raise DataError(f"only {m} usable non-targeting gRNA(s): the NT null needs at least 2")
    out: dict[int, np.ndarray] = {}
    for n in np.unique(sizes).astype(int):
        if n <= 0:
            continue
        zn = np.zeros(draws)
        for _ in range(n):  # summed one gRNA at a time: memory stays at `draws`
            zn += z_nt[rng.integers(0, m, draws)]
        out[int(n)] = np.sort(zn / np.sqrt(n))
    return PseudoGeneNull(out, m)


def quiet_siblings(z: np.ndarray, codes: np.ndarray, n: np.ndarray, z_nt: np.ndarray, draws: int,
                   rng: np.random.Generator, alpha: float = SIBLING_P) -> np.ndarray:
    """Targeting gRNAs (z-scores ``z``, gene ``codes``, ``n`` gRNAs per gene) whose gene's *other* gRNAs are not a hit:
    their Stouffer Z, without the gRNA itself, has a p-value >= ``alpha`` against NT pseudo-genes of as many gRNAs.
    A true hit lifts all its gRNAs, so its gRNAs leave; a null gene's gRNA stays or leaves whatever its own value,
    so the gRNAs left keep the null's tail (a jackpotted gRNA of a null gene stays). A gene's only gRNA stays."""
    k = n[codes] - 1
    sib = (np.bincount(codes, weights=z, minlength=len(n))[codes] - z) / np.sqrt(np.maximum(k, 1))
    p = np.ones(len(z))
    has = k > 0
    if has.any():
        p[has] = pseudo_gene_null(z_nt, k[has], draws, rng).p_value(sib[has], k[has])[0]
    return p >= alpha


def gene_level(grnas: pd.DataFrame, draws: int, fdr: float, rng: np.random.Generator,
               gene_null: GeneNull = "nt_and_quiet_screen", sibling_p: float = SIBLING_P
               ) -> tuple[pd.DataFrame, dict]:
    """Genes from gRNA z-scores (columns ``gene, is_control, z, effect, used``): Stouffer, the NT pseudo-gene null
    of the same gRNA count (``PseudoGeneNull.p_value``), BH over targeting genes. NT gRNAs are also grouped into
    disjoint pseudo-genes of the most common gRNA count, scored the same way (their p-values show whether the null
    is calibrated). ``draws`` is raised to ``20 * genes / fdr`` so the empirical p-values can reach BH's first step.
    ``gene_null="nt_and_screen"``: each p-value is the larger of the NT pseudo-genes' and that of pseudo-genes drawn
    from every gRNA of the screen (NT and targeting), whose far tail a few NT gRNAs under-sample;
    ``"nt_and_quiet_screen"``: the same, the screen's pseudo-genes drawn from the NT gRNAs and the targeting gRNAs of
    ``quiet_siblings`` at ``sibling_p`` (hits in the screen's null make it conservative; the default at every library
    size: FINDINGS,
    "Hit calling at genome scale", "Cells mode at genome scale" and "Between 60 and 20,000 genes");
    ``"quiet_screen"``: that screen null alone, without the larger-of with the NT pseudo-genes (whose p-values,
    resting on a few hundred NT gRNAs, make the larger of the two conservative in small libraries; alone, the far tail
    was not honest at 250 and 4,000 genes: FINDINGS, "The screen null alone"). The rescaled ``z`` is the NT null's
    in every case."""
    if gene_null not in get_args(GeneNull):
        raise ValueError(f"gene_null must be one of {', '.join(get_args(GeneNull))}, got {gene_null!r}")
    used = grnas[grnas["used"]]
    nt = used[used["is_control"]]
    tg = used[~used["is_control"]]
    if len(tg) == 0:
        raise DataError("no targeting gRNA left to test (all filtered out)")
    codes, genes = pd.factorize(tg["gene"], sort=True)
    z_tg, z_ctrl = tg["z"].to_numpy(float), nt["z"].to_numpy(float)
    zg, n = _stouffer_by_group(codes, z_tg, len(genes))
    n = n.astype(int)
    effect = np.bincount(codes, weights=tg["effect"].to_numpy(float), minlength=len(genes)) / n
    n_mode = int(pd.Series(n).mode().iloc[0])
    sibling_draws = draws
    draws = max(draws, int(np.ceil(20 * len(genes) / fdr)))
    null = pseudo_gene_null(z_ctrl, np.append(n, n_mode), draws, rng)
    screen_null, pool_info = None, {}
    if gene_null != "nt":
        pool = used["z"].to_numpy(float)
        if gene_null in ("nt_and_quiet_screen", "quiet_screen"):
            quiet = quiet_siblings(z_tg, codes, n, z_ctrl, sibling_draws, rng, sibling_p)
            pool = np.concatenate([z_ctrl, z_tg[quiet]])
            pool_info = {"screen_null_grnas": int(len(pool)), "screen_null_left_out": int((~quiet).sum())}
        screen_null = pseudo_gene_null(pool, np.append(n, n_mode), draws, rng)

    def p_value(z: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p, zr = null.p_value(z, k)
        if screen_null is None:
            return p, zr
        p_screen = screen_null.p_value(z, k)[0]
        return (p_screen if gene_null == "quiet_screen" else np.maximum(p, p_screen)), zr

    p, zr = p_value(zg, n)
    q = bh(p)
    table = pd.DataFrame({"gene": np.asarray(genes, dtype=object), "n_grnas": n, "effect": effect,
                          "z": zr, "p_value": p, "fdr": q, "is_hit": q <= fdr, "is_control": False})
    # disjoint NT pseudo-genes (reported, not tested)
    order = rng.permutation(len(nt))
    z_nt, eff_nt = z_ctrl[order], nt["effect"].to_numpy(float)[order]
    k = len(z_nt) // n_mode
    if k:
        zp = z_nt[: k * n_mode].reshape(k, n_mode).sum(axis=1) / np.sqrt(n_mode)
        pp, zpr = p_value(zp, np.full(k, n_mode))
        pseudo = pd.DataFrame({"gene": [f"{PSEUDO_PREFIX}{i + 1:03d}" for i in range(k)], "n_grnas": n_mode,
                               "effect": eff_nt[: k * n_mode].reshape(k, n_mode).mean(axis=1),
                               "z": zpr, "p_value": pp, "fdr": np.nan, "is_hit": False, "is_control": True})
        table = pd.concat([table, pseudo], ignore_index=True)
    table = rank_genes(table)
    ctrl_p = table.loc[table["is_control"], "p_value"].to_numpy()
    info = {"n_nt_grnas": int(len(nt)), "n_pseudo_genes": int(len(ctrl_p)), "null_draws": draws, "gene_null": gene_null,
            **pool_info, "pseudo_gene_ks": ks_uniform(ctrl_p)}
    return table, info


def rank_genes(table: pd.DataFrame) -> pd.DataFrame:
    """Sort targeting genes by p-value (then z), controls last; ``rank`` 1 = strongest; NaN p ranks last."""
    tg = table[~table["is_control"]].sort_values(["p_value", "z"], ascending=[True, False], na_position="last")
    tg = tg.assign(rank=np.arange(1, len(tg) + 1))
    ctrl = table[table["is_control"]].sort_values("p_value").assign(rank=pd.NA)
    out = pd.concat([tg, ctrl], ignore_index=True)
    out["rank"] = out["rank"].astype("Int64")
    return out[["gene", "n_grnas", "effect", "z", "p_value", "fdr", "rank", "is_hit", "is_control"]]


def ks_uniform(p: np.ndarray) -> dict[str, float | int | None]:
    """Kolmogorov-Smirnov distance of p-values from U(0, 1) and its p-value."""
    p = np.asarray(p, float)
    p = p[~np.isnan(p)]
    if len(p) < 2:
        return {"n": int(len(p)), "statistic": None, "p_value": None}
    res = stats.kstest(p, "uniform")
    return {"n": int(len(p)), "statistic": float(res.statistic), "p_value": float(res.pvalue)}


# -- counts (sorted bins vs the unsorted library) --------------------------------------------------------------------
@dataclass(frozen=True)
class CountsInput:
    """A count table joined with the library (``sgRNA, Gene, is_control, <samples>``) and its sample sheet.

    Its rows are kept in ``sgRNA`` order, whatever order the file had: the NT null's random draws and the NT
    pseudo-genes pick gRNAs by position, so the same counts must give the same calls from ``mageck count``'s table
    (sorted by sgRNA) and from any other counter's."""

    counts: pd.DataFrame
    sheet: SampleSheet
    bins: tuple[int, ...] = ()  # bins used; () = all

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", self.counts.sort_values("sgRNA", kind="stable", ignore_index=True))

    def bin_samples(self, replicate: str) -> pd.DataFrame:
        t = self.sheet.of("bin", replicate)
        if self.bins:
            t = t[t["bin"].isin(self.bins)]
        return t[t["cells"] > 0]

    def pooled_reads(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Per replicate with bin samples: its name, its reads summed over the bins used, and its library reads."""
        for r in self.sheet.replicates:
            bins = self.bin_samples(r)
            if not bins.empty:
                yield r, self.counts[bins["sample"].tolist()].to_numpy(np.int64).sum(axis=1), self.library_reads(r)[0]

    def library_reads(self, replicate: str) -> tuple[np.ndarray, int, bool]:
        """Library reads of a replicate (summed over its library samples; the pooled library if it has none),
        its library cells, and whether the pooled library was used."""
        libs = self.sheet.of("library", replicate)
        pooled = libs.empty
        if pooled:
            libs = self.sheet.of("library")
        reads = self.counts[libs["sample"].tolist()].to_numpy(np.int64).sum(axis=1)
        return reads, int(libs["cells"].sum()), pooled


def _cell_equivalents(inp: CountsInput, replicate: str) -> np.ndarray:
    bins = inp.bin_samples(replicate)
    out = np.zeros(len(inp.counts))
    for s, cells in zip(bins["sample"], bins["cells"], strict=True):
        reads = inp.counts[s].to_numpy(float)
        total = reads.sum()
        if total > 0:
            out += cells * reads / total
    return out


def _nt_fit(c: np.ndarray, f: np.ndarray, rel: np.ndarray, fit_on: np.ndarray,
            at: int | slice = slice(None)) -> tuple[np.ndarray, float, float]:
    """The null fitted on the NT gRNAs ``fit_on``: expected cells (at ``at``), dispersion ``a``, ``phi``."""
    rate = c[fit_on].sum() / f[fit_on].sum()
    e_nt = f[fit_on] * rate
    a, phi = fit_dispersion(c[fit_on], e_nt, e_nt**2 * rel[fit_on])
    return f[at] * rate, a, phi


def _grna_z(c: np.ndarray | float, e: np.ndarray | float, rel: np.ndarray | float, a: float, phi: float,
            nt_cells: float) -> np.ndarray | float:
    """gRNA z-scores on the variance-stabilised (square-root) scale: a few jackpotted cells skew raw cell counts to
    the right. The NT tail rate is itself an estimate from ``nt_cells`` cells (shared by every gRNA: conservative)."""
    var = a * e + phi * e**2 + e**2 * (rel + a / nt_cells)
    return 2.0 * (np.sqrt(c) - np.sqrt(e)) / np.sqrt(np.maximum(var / np.maximum(e, 1e-12), 1e-12))


def call_counts(inp: CountsInput, fdr: float = 0.1, min_library_reads: int = 1, draws: int = 2000,
                seed: int = 0, min_nt_cells: float = 20.0, nt_null: NtNull = "leave_one_out",
                gene_null: GeneNull = "nt_and_quiet_screen", sibling_p: float = SIBLING_P) -> HitsResult:
    """The cell-level statistic on sorted-bin counts (see the module docstring). A replicate whose NT gRNAs hold
    fewer than ``min_nt_cells`` cell equivalents in the bins cannot estimate the null and is left out; with no
    replicate left nothing is called (``summary['warning']`` says why). ``nt_null``: each NT gRNA's z-score from the
    rate and dispersion fitted on the other NT gRNAs (``leave_one_out``), out of sample as a targeting gRNA's is; or
    from the fit on all of them (``in_sample``), whose smaller residuals made the null too narrow (FINDINGS, "Hit
    calling: the tail of the NT null"). ``gene_null``, ``sibling_p``: see ``gene_level``."""
    if nt_null not in get_args(NtNull):
        raise ValueError(f"nt_null must be one of {', '.join(get_args(NtNull))}, got {nt_null!r}")
    rng = np.random.default_rng(seed)
    counts = inp.counts
    is_nt = counts["is_control"].to_numpy(bool)
    reps = inp.sheet.replicates
    grnas = pd.DataFrame({"grna": counts["sgRNA"], "gene": counts["Gene"], "is_control": is_nt})
    z_sum = np.zeros(len(counts))
    lfc_sum = np.zeros(len(counts))
    lib_total = np.zeros(len(counts))
    per_rep: dict[str, Any] = {}
    used_reps = []
    for r in reps:
        if inp.bin_samples(r).empty:
            continue
        lib, lib_cells, pooled = inp.library_reads(r)
        lib_total += lib
        f = (lib + 0.5) / (lib.sum() + 0.5 * len(lib))
        c = _cell_equivalents(inp, r)
        nt = is_nt & (lib >= min_library_reads)
        if nt.sum() < 2:
            raise DataError(f"replicate {r}: fewer than 2 non-targeting gRNAs with >= {min_library_reads} library "
                            "read(s); cannot estimate the NT null")
        nt_cells = float(c[nt].sum())
        per_rep[r] = {"nt_tail_cells": nt_cells, "bin_cells": int(inp.bin_samples(r)["cells"].sum()),
                      "pooled_library": pooled, "used": nt_cells >= min_nt_cells}
        if nt_cells < min_nt_cells:
            continue
        used_reps.append(r)
        rel = 1.0 / (lib + 0.5) + (1.0 / (f * lib_cells) if lib_cells > 0 else 0.0)
        e, a, phi = _nt_fit(c, f, rel, nt)
        z = _grna_z(c, e, rel, a, phi, nt_cells)
        if nt_null == "leave_one_out":  # each NT gRNA scored by a fit that did not see it, as a targeting gRNA is
            for i in np.flatnonzero(nt):
                others = nt.copy()
                others[i] = False
                e_i, a_i, phi_i = _nt_fit(c, f, rel, others, i)
                z[i] = _grna_z(c[i], e_i, rel[i], a_i, phi_i, nt_cells - float(c[i]))
        lfc = np.log2((c + 0.5) / (e + 0.5))
        z_sum += z
        lfc_sum += lfc
        grnas[f"cells_{r}"] = c
        grnas[f"expected_{r}"] = e
        grnas[f"lfc_{r}"] = lfc
        grnas[f"z_{r}"] = z
        per_rep[r].update({"dispersion_a": a, "dispersion_phi": phi})
    if not per_rep:
        raise DataError("no bin sample with cells > 0 in the sample sheet (for the bins used)")
    k = max(len(used_reps), 1)
    grnas["z"] = z_sum / np.sqrt(k)
    grnas["effect"] = lfc_sum / k
    grnas["library_reads"] = lib_total.astype(np.int64)
    grnas["used"] = lib_total >= min_library_reads * len(per_rep)
    genes, info = gene_level(grnas, draws, fdr, rng, gene_null, sibling_p)
    warning = None
    if not used_reps:
        warning = (f"the NT gRNAs hold fewer than {min_nt_cells:g} cells in the bins of every replicate: the null "
                   "cannot be estimated and no gene is called")
        genes = genes.assign(p_value=1.0, fdr=np.where(genes["is_control"], np.nan, 1.0), is_hit=False)
    summary = {"method": "spatial", "replicates": per_rep, "fdr": fdr, "warning": warning, **info,
               **_counts_summary(genes)}
    return HitsResult("spatial", genes, grnas, summary)


def call_sparcs(inp: CountsInput, p_cut: float = 0.05, fdr: float = 0.1) -> HitsResult:
    """The published SPARCS statistic: per gRNA, enrichment = normalised (pooled) bin reads / normalised library
    reads; gene effect = mean log2 enrichment over the gRNAs seen in the bins (>= 2 needed); one-tailed paired
    t-test of log bin vs log library counts over those gRNAs (and replicates); hits at ``p < p_cut`` without
    multiple-testing correction (``fdr`` is the BH column, reported for comparison only)."""
    counts = inp.counts
    rows = []
    for r, b, lib in inp.pooled_reads():
        seen = (b > 0) & (lib > 0)
        d = np.log2(b / max(b.sum(), 1) * 1e6 + 1e-12) - np.log2(lib / max(lib.sum(), 1) * 1e6 + 1e-12)
        rows.append(pd.DataFrame({"grna": counts["sgRNA"], "gene": counts["Gene"],
                                  "is_control": counts["is_control"].to_numpy(bool), "replicate": r,
                                  "seen": seen, "log2_enrichment": np.where(seen, d, np.nan)}))
    if not rows:
        raise DataError("no bin sample with cells > 0 in the sample sheet (for the bins used)")
    grnas = pd.concat(rows, ignore_index=True)
    tg = grnas[grnas["seen"] & ~grnas["is_control"]]
    g = tg.groupby("gene")["log2_enrichment"]
    n_seen = tg.groupby("gene")["grna"].nunique()
    m, mean, sd = g.count(), g.mean(), g.std(ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = mean / (sd / np.sqrt(m))
        p = pd.Series(stats.t.sf(t, m - 1), index=mean.index)
    p[(n_seen < 2) | ~np.isfinite(t)] = np.nan
    genes_all = pd.Index(sorted(set(counts.loc[~counts["is_control"].to_numpy(bool), "Gene"])))
    n_grnas = counts[~counts["is_control"].to_numpy(bool)].groupby("Gene")["sgRNA"].nunique()
    table = pd.DataFrame({"gene": genes_all, "n_grnas": n_grnas.reindex(genes_all).to_numpy(),
                          "effect": mean.reindex(genes_all).to_numpy(), "z": t.reindex(genes_all).to_numpy(),
                          "p_value": p.reindex(genes_all).to_numpy()})
    table["fdr"] = bh(table["p_value"].to_numpy())
    table["is_hit"] = (table["p_value"] < p_cut).to_numpy()
    table["is_control"] = False
    table = rank_genes(table)
    summary = {"method": "sparcs", "p_cut": p_cut, "multiple_testing": "none (as published)",
               **_counts_summary(table)}
    return HitsResult("sparcs", table, grnas, summary)


def rra_rho(u: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-RRA score of each row of ``u`` (normalised ranks in (0, 1], one row per gene, same gRNA count n): the
    smallest ``P(k-th smallest of n uniform ranks <= u_(k))`` over the gRNAs with ``u_(k) <= alpha``; 1 when none."""
    u = np.sort(np.atleast_2d(np.asarray(u, float)), axis=1)
    n = u.shape[1]
    k = np.arange(1, n + 1)
    beta = stats.beta.cdf(u, k, n + 1 - k)
    return np.where(u <= alpha, beta, 1.0).min(axis=1)


def call_rra(inp: CountsInput, alpha: float = 0.25, fdr: float = 0.1, draws: int = 2000, seed: int = 0,
             min_library_reads: int = 1) -> HitsResult:
    """MAGeCK's robust rank aggregation (alpha-RRA), the field's standard gene test, as a baseline. gRNAs are ranked
    by the log2 fold change of their bin reads (pooled over bins, each replicate total-normalised, then averaged)
    over their library reads; a gene's score ``rho`` is :func:`rra_rho` of its gRNAs' normalised ranks; its
    p-value is the share of ``draws`` genes of the same size made of random gRNA ranks with a ``rho`` as small
    (permutation, MAGeCK's default null), then Benjamini-Hochberg. MAGeCK ranks gRNAs by a negative-binomial
    p-value and takes ``alpha`` from a gRNA FDR cut; a fold-change ranking and a rank cut keep this a ranks-only
    test. NT gRNAs are ranked with the rest and grouped into disjoint pseudo-genes, scored the same way, which shows
    whether the permutation null is calibrated."""
    counts = inp.counts
    bins_cpm, lib_cpm, lib_total = [], [], np.zeros(len(counts))
    for _, b, lib in inp.pooled_reads():
        bins_cpm.append(b / max(b.sum(), 1) * 1e6)
        lib_cpm.append(lib / max(lib.sum(), 1) * 1e6)
        lib_total += lib
    if not bins_cpm:
        raise DataError("no bin sample with cells > 0 in the sample sheet (for the bins used)")
    lfc = np.log2((np.mean(bins_cpm, axis=0) + 0.5) / (np.mean(lib_cpm, axis=0) + 0.5))
    used = lib_total >= min_library_reads * len(bins_cpm)
    grnas = pd.DataFrame({"grna": counts["sgRNA"], "gene": counts["Gene"],
                          "is_control": counts["is_control"].to_numpy(bool), "lfc": lfc, "used": used})
    ranked = grnas[grnas["used"]].sort_values("lfc", ascending=False, kind="stable")
    n_all = len(ranked)
    grnas["rank"] = pd.Series(np.arange(1, n_all + 1), index=ranked.index).reindex(grnas.index)
    grnas["u"] = grnas["rank"] / n_all
    rng = np.random.default_rng(seed)
    tg = grnas[grnas["used"] & ~grnas["is_control"]]
    nt = grnas[grnas["used"] & grnas["is_control"]]
    nt = nt.iloc[rng.permutation(len(nt))]
    groups = [(g, d["u"].to_numpy(), d["lfc"].to_numpy(), False) for g, d in tg.groupby("gene", sort=True)]
    n_mode = int(pd.Series([len(u) for _, u, _, _ in groups]).mode().iloc[0]) if groups else 1
    for i in range(len(nt) // n_mode):
        part = nt.iloc[i * n_mode:(i + 1) * n_mode]
        groups.append((f"{PSEUDO_PREFIX}{i + 1:03d}", part["u"].to_numpy(), part["lfc"].to_numpy(), True))
    draws = max(draws, int(np.ceil(20 * len(tg["gene"].unique()) / fdr)))
    rows, null = [], {}
    for gene, u, lfc_g, is_ctrl in groups:
        n = len(u)
        if n not in null:  # random gRNAs of the ranking (with replacement: n << the gRNAs ranked)
            null[n] = np.sort(rra_rho(rng.integers(1, n_all + 1, (draws, n)) / n_all, alpha))
        rho = float(rra_rho(u[None], alpha)[0])
        p = (1 + np.searchsorted(null[n], rho, side="right")) / (1 + draws)
        rows.append({"gene": gene, "n_grnas": n, "effect": float(np.median(lfc_g)), "z": float(stats.norm.isf(p)),
                     "p_value": float(p), "is_control": is_ctrl})
    table = pd.DataFrame(rows)
    targeting = ~table["is_control"].to_numpy(bool)
    table["fdr"] = np.nan
    table.loc[targeting, "fdr"] = bh(table.loc[targeting, "p_value"].to_numpy())
    table["is_hit"] = targeting & (table["fdr"].fillna(1.0) <= fdr).to_numpy()
    table = rank_genes(table)
    ctrl_p = table.loc[table["is_control"], "p_value"].to_numpy()
    summary = {"method": "rra", "alpha": alpha, "null": "permutation of gRNA ranks", "null_draws": draws,
               "n_pseudo_genes": int(len(ctrl_p)), "pseudo_gene_ks": ks_uniform(ctrl_p), "fdr": fdr,
               **_counts_summary(table)}
    return HitsResult("rra", table, grnas, summary)


def _counts_summary(genes: pd.DataFrame) -> dict[str, Any]:
    tg = genes[~genes["is_control"]]
    return {"n_genes": int(len(tg)), "n_called": int(tg["is_hit"].sum()),
            "called": tg.loc[tg["is_hit"], "gene"].tolist()}


# -- per-cell genotypes (optical pooled screens) ---------------------------------------------------------------------
@dataclass(frozen=True)
class CellsInput:
    """One row per genotyped cell: ``grna, gene, is_control, p`` (calibrated probability of the class) and
    ``epistemic`` (mutual information, nats)."""

    cells: pd.DataFrame


def cell_weights(p: np.ndarray, epistemic: np.ndarray, floor: float) -> np.ndarray:
    """Weight of each cell's evidence: ``floor / (floor + v)`` with ``v = 2 p (1-p) * epistemic`` the ensemble's
    spread of the probability (second-order expansion of the mutual information), capped at ``p (1-p)``."""
    v = np.minimum(2.0 * p * (1 - p) * np.maximum(epistemic, 0.0), p * (1 - p))
    return floor / (floor + v)


def _bootstrap_null(y: np.ndarray, w: np.ndarray, sizes: np.ndarray, draws: int, rng: np.random.Generator,
                    max_exact: int = 64, buckets_per_doubling: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of the weighted mean of ``n`` NT cells drawn with replacement, for every ``n`` in ``sizes``.
    Counts up to ``max_exact`` are drawn exactly; larger ones share a geometric bucket whose sd is rescaled by
    ``sqrt(n_bucket / n)``."""
    sizes = np.asarray(sizes, int)
    key = np.where(sizes <= max_exact, sizes,
                   np.round(2 ** (np.round(np.log2(np.maximum(sizes, 1)) * buckets_per_doubling)
                                  / buckets_per_doubling)).astype(int))
    mu = np.empty(len(sizes))
    sd = np.empty(len(sizes))
    for k in np.unique(key):
        k = int(max(k, 1))
        idx = rng.integers(0, len(y), (draws, k))
        ww = w[idx]
        t = (ww * y[idx]).sum(axis=1) / ww.sum(axis=1)
        sel = key == k
        s = float(t.std(ddof=1))
        mu[sel] = t.mean()
        sd[sel] = max(s, 1e-12) * np.sqrt(k / sizes[sel])
    return mu, sd


def call_cells(inp: CellsInput, mode: str = "soft", fdr: float = 0.1, min_cells: int = 1, draws: int = 2000,
               seed: int = 0, gene_null: GeneNull = "nt_and_quiet_screen", sibling_p: float = SIBLING_P
               ) -> HitsResult:
    """Per-gRNA phenotype rate vs NT cells matched on cell count (bootstrap), then the shared gene level
    (``gene_null``, ``sibling_p``: see ``gene_level``)."""
    if mode not in ("soft", "threshold"):
        raise DataError(f"cells mode must be soft or threshold, got '{mode}'")
    rng = np.random.default_rng(seed)
    cells = inp.cells
    p = cells["p"].to_numpy(float)
    is_nt = cells["is_control"].to_numpy(bool)
    if not is_nt.any():
        raise DataError("no genotyped cell carries a non-targeting gRNA: the NT null needs NT cells")
    if mode == "soft":
        floor = float(np.mean(p[is_nt] * (1 - p[is_nt]))) or 1e-6
        y, w = p, cell_weights(p, cells["epistemic"].to_numpy(float), floor)
    else:
        y, w = (p > 0.5).astype(float), np.ones(len(p))
    codes, grna_names = pd.factorize(cells["grna"], sort=True)
    n = np.bincount(codes, minlength=len(grna_names))
    sw = np.bincount(codes, weights=w, minlength=len(grna_names))
    rate = np.bincount(codes, weights=w * y, minlength=len(grna_names)) / np.maximum(sw, 1e-12)
    first = pd.Series(np.arange(len(cells))).groupby(codes).first().to_numpy()
    mu, sd = _bootstrap_null(y[is_nt], w[is_nt], np.maximum(n, 1), draws, rng)
    nt_rate = float(np.sum(w[is_nt] * y[is_nt]) / np.sum(w[is_nt]))
    grnas = pd.DataFrame({"grna": np.asarray(grna_names, dtype=object),
                          "gene": cells["gene"].to_numpy()[first], "is_control": is_nt[first], "cells": n,
                          "rate": rate, "null_mean": mu, "null_sd": sd, "z": (rate - mu) / sd,
                          "effect": np.log2((rate + 1e-3) / (nt_rate + 1e-3)), "used": n >= min_cells})
    genes, info = gene_level(grnas, draws, fdr, rng, gene_null, sibling_p)
    summary = {"method": f"cells_{mode}", "fdr": fdr, "nt_rate": nt_rate, "n_cells": int(len(cells)),
               "mean_weight": float(w.mean()), **info, **_counts_summary(genes)}
    return HitsResult(f"cells_{mode}", genes, grnas, summary)


# -- truth (simulator) -----------------------------------------------------------------------------------------------
def truth_metrics(genes: pd.DataFrame, truth: pd.DataFrame, strong: float = 0.5) -> dict[str, Any]:
    """Recall of the planted hits by effect tier and the false discovery proportion among the called genes
    (``truth``: ``gene, role, effect``; role hit / neutral / control / novel). A called novel-phenotype gene is
    reported apart: it is a real gene effect, but not the phenotype the class stands for."""
    t = truth.set_index("gene")
    called = genes[genes["is_hit"] & ~genes["is_control"]]["gene"]
    role = t["role"].reindex(called).fillna("unknown")
    hits = t[t["role"] == "hit"]
    strong_hits, weak_hits = hits[hits["effect"] >= strong].index, hits[hits["effect"] < strong].index
    false = int((~role.isin(["hit", "novel"])).sum())

    def recall(idx: pd.Index) -> float | None:
        return float(called.isin(idx).sum() / len(idx)) if len(idx) else None

    return {"n_called": int(len(called)), "false_discoveries": false,
            "fdp": float(false / len(called)) if len(called) else 0.0,
            f"recall_effect_ge_{strong}": recall(strong_hits), f"recall_effect_lt_{strong}": recall(weak_hits),
            "recall_all_hits": recall(hits.index), "novel_called": int((role == "novel").sum()),
            "n_planted_hits": int(len(hits))}
