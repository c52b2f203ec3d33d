"""The discovery queue: screen cells unlike their slide's non-targeting controls (or the model's training cells),
grouped into candidate new phenotypes, with the genes behind each group.

- ``controls.py``    novelty against the same slide's controls in unlearned multi-stage features (the default)
- ``queue.py``       the model-reference threshold, clustering of the novel cells (scikit-learn Gaussian mixture,
                     components chosen by BIC), the cluster table
- ``genotypes.py``   cells -> gRNA -> gene (GENOTYPES.csv, LIBRARY.csv; the simulator's genotypes)
- ``enrichment.py``  genes enriched in a cluster against all scored cells (Fisher exact test, BH FDR)
- ``gallery.py``     one image gallery per cluster
- ``run.py``         ``discover``: scores Parquet (+ genotypes) -> the queue directory (``spatial discover``)
"""
