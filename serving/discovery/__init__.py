"""The discovery queue: screen cells unlike every training class, grouped into candidate new phenotypes.

- ``queue.py``       novelty threshold from the model's own validation cells, clustering of the novel cells'
                     embeddings (scikit-learn Gaussian mixture, components chosen by BIC)
- ``enrichment.py``  genes enriched in a cluster against all scored cells (Fisher exact test, BH FDR)
- ``gallery.py``     one image gallery per cluster
- ``run.py``         ``discover``: scores Parquet (+ genotypes) -> the queue directory (``spatial discover``)
"""
