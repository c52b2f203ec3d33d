"""Count tables as MAGeCK itself writes and reads them.

MAGeCK (``mageck2`` 0.3.0 from PyPI, which keeps MAGeCK's ``count`` and ``test`` commands unchanged) runs in its
own interpreter: ``make mageck-env`` builds ``.venv-mageck`` (about 1 min; ``.ci/run`` builds it, so these tests
run in CI), or ``$SPATIAL_MAGECK`` names a ``mageck2`` / ``mageck`` executable. Without either they skip.

- ``mageck count`` turns FASTQ reads into the count table; ``spatial hits`` must read it and call the same genes as
  from the table the reads were made from.
- ``mageck test`` must accept the count table spatiAL writes (``spatial sequence``'s ``counts.tsv``) and, on a
  screen with planted hits, rank them where spatiAL's own alpha-RRA does.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_main

from serving.screen.counts import read_count_table, write_count_table

ROOT = Path(__file__).resolve().parents[1]
PLANTED = ["G00", "G01", "G02"]
SAMPLES = [("lib", "library", "", "r1", 200_000), ("b1", "bin", 1, "r1", 3000), ("b2", "bin", 2, "r1", 6000)]


def mageck_executable() -> str | None:
    candidate = os.environ.get("SPATIAL_MAGECK") or str(ROOT / ".venv-mageck" / "bin" / "mageck2")
    return candidate if Path(candidate).exists() else None


pytestmark = pytest.mark.skipif(mageck_executable() is None,
                                reason="no MAGeCK: `make mageck-env` or $SPATIAL_MAGECK")


def run_mageck(*args: object, cwd: Path) -> None:
    exe = Path(mageck_executable())  # its compiled RRA helper sits beside it
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def screen(seed: int = 0, genes: int = 40, per_gene: int = 4, controls: int = 24) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A small pooled screen: the count table (sgRNA, Gene, lib, b1, b2) and the library (grna, gene, is_control,
    sequence). The cells of PLANTED's gRNAs are 6x (bin 1) and 3x (bin 2) enriched; every count is drawn from a
    gamma-Poisson, so replicates of the screen differ as sequencing does."""
    rng = np.random.default_rng(seed)
    grnas = [(f"G{g:02d}_{k}", f"G{g:02d}") for g in range(genes) for k in range(per_gene)]
    grnas += [(f"NT_{k:02d}", "NT") for k in range(controls)]
    names, gene = map(list, zip(*grnas, strict=True))
    abundance = rng.gamma(4.0, 1.0, len(names))
    effect = np.where(np.isin(gene, PLANTED), 1.0, 0.0)
    table = pd.DataFrame({"sgRNA": names, "Gene": gene})
    for sample, reads, fold in (("lib", 30_000, 0.0), ("b1", 12_000, 6.0), ("b2", 12_000, 3.0)):
        share = abundance * (1 + (fold - 1) * effect if fold else 1)
        table[sample] = rng.poisson(rng.gamma(20.0, share / share.sum() * reads / 20.0))
    seqs = set()
    while len(seqs) < len(names):
        seqs.add("".join(rng.choice(list("ACGT"), 20)))
    library = pd.DataFrame({"grna": names, "gene": gene, "is_control": [g == "NT" for g in gene],
                            "sequence": sorted(seqs)})
    return table, library


def write_inputs(tmp: Path, table: pd.DataFrame, library: pd.DataFrame) -> tuple[Path, Path, Path]:
    counts = write_count_table(table, tmp / "counts.tsv")
    samples = tmp / "samples.csv"
    pd.DataFrame(SAMPLES, columns=["sample", "kind", "bin", "replicate", "cells"]).to_csv(samples, index=False)
    lib = tmp / "library.csv"
    library[["grna", "gene", "is_control"]].to_csv(lib, index=False)
    return counts, samples, lib


def spatial_hits(counts: Path, samples: Path, library: Path, out: Path, monkeypatch, capsys,
                 method: str = "spatial") -> pd.DataFrame:
    code, text = run_main(["hits", "--counts", str(counts), "--samples", str(samples), "--library", str(library),
                           "--out", str(out), "--method", method, "--set", "hits.null_draws=500"], monkeypatch, capsys)
    assert code == 0, text
    return pd.read_csv(out / "genes.csv")


def write_fastq(path: Path, sequences: list[str], counts: np.ndarray, rng: np.random.Generator) -> Path:
    """One read per count, in a shuffled order, each the gRNA's spacer with an 8-base 5' prefix (as the read starts
    in a real amplicon before the spacer; MAGeCK finds the offset itself)."""
    reads = np.repeat(np.arange(len(sequences)), counts)
    rng.shuffle(reads)
    with path.open("w") as f:
        for i, r in enumerate(reads):
            f.write(f"@read{i}\nTTGTGGAA{sequences[r]}\n+\n{'I' * 28}\n")
    return path


def test_spatial_hits_reads_the_count_table_mageck_count_wrote(tmp_path, monkeypatch, capsys):
    table, library = screen()
    rng = np.random.default_rng(1)
    fastqs = [write_fastq(tmp_path / f"{s}.fastq", library["sequence"].tolist(), table[s].to_numpy(), rng)
              for s in ("lib", "b1", "b2")]
    library[["grna", "sequence", "gene"]].to_csv(tmp_path / "mageck_library.csv", index=False, header=False)
    run_mageck("count", "-l", "mageck_library.csv", "-n", "screen", "--sample-label", "lib,b1,b2",
               "--fastq", *fastqs, "--norm-method", "none", cwd=tmp_path)
    theirs = read_count_table(tmp_path / "screen.count.txt")  # MAGeCK's own file, as it wrote it
    ours = table.sort_values("sgRNA").reset_index(drop=True)
    pd.testing.assert_frame_equal(theirs.sort_values("sgRNA").reset_index(drop=True), ours, check_dtype=False)

    counts, samples, lib = write_inputs(tmp_path, table, library)
    want = spatial_hits(counts, samples, lib, tmp_path / "from_ours", monkeypatch, capsys)
    got = spatial_hits(tmp_path / "screen.count.txt", samples, lib, tmp_path / "from_mageck", monkeypatch, capsys)
    pd.testing.assert_frame_equal(got, want)
    assert sorted(got.loc[got["is_hit"], "gene"]) == PLANTED


def test_mageck_test_reads_spatials_count_table_and_ranks_the_planted_genes_first(tmp_path, monkeypatch, capsys):
    table, library = screen(seed=2)
    counts, samples, lib = write_inputs(tmp_path, table, library)
    (tmp_path / "controls.txt").write_text("\n".join(library.loc[library["is_control"], "grna"]) + "\n")
    run_mageck("test", "-k", counts, "-t", "b1,b2", "-c", "lib", "-n", "mageck", "--control-sgrna", "controls.txt",
               cwd=tmp_path)
    theirs = pd.read_csv(tmp_path / "mageck.gene_summary.txt", sep="\t")
    assert set(theirs["id"]) == set(table["Gene"]) - {"NT"}  # every targeting gene of our table was read
    top_theirs = theirs.sort_values("pos|rank")["id"].head(len(PLANTED)).tolist()
    ours = spatial_hits(counts, samples, lib, tmp_path / "rra", monkeypatch, capsys, method="rra")
    top_ours = ours.sort_values("rank")["gene"].head(len(PLANTED)).tolist()
    assert sorted(top_theirs) == sorted(top_ours) == PLANTED
