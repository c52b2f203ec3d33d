"""From per-cell scores to genes: the screen read-out of a SPARCS screen.

- ``bins.py``        excision bins by the phenotype probability (SPARCS thresholds or quantiles), scPortrait cell sets
- ``sequencing.py``  SIMULATOR ONLY: cutting, PCR jackpotting, background, sequencing of the simulated bins
- ``counts.py``      MAGeCK count table, sample sheet and library readers (with their checks)
- ``hits.py``        the statistics: cell-level counts vs NT, per-cell genotypes, the SPARCS baseline, BH
- ``calling.py``     ``spatial hits`` end to end (inputs -> tables, figures, summary)
- ``plots.py``       volcano, rank and QQ figures
"""
