"""spatiAL training: everything up to an evaluated, registered model. The folders read as the data flow:

- ``io/``          file formats (SPARCSpy ``.h5``, scPortrait ``.h5sc``), Parquet tables, atomic writes
- ``sim/``         the simulated SPARCS screen (the embedded default data) and its truth
- ``data/``        cell index, group splits, the training-data table, streaming loader, augmentation
- ``models/``      timm ConvNeXt factory and the SPARCS VGG baseline
- ``engine.py``    the one training loop (``fit``, with an end-of-epoch hook) and the one inference step
                   (``forward`` / ``predict``, one MC-dropout handling); regimes plug in objectives and streams
- ``regimes/``     the one objective builder (supervised, FixMatch, autoencoder), ensemble training
- ``uncertainty/`` the ensemble artifact, aleatoric / epistemic decomposition, calibration, novelty
- ``evaluation/``  metrics, the evaluate step, plots
- ``active/``      acquisition functions, simulated campaigns, oracles, campaign reports
- ``tracking.py``  MLflow runs (experiment tagged as model training), model logging and the registry alias
- ``workflow.py``  train -> evaluate -> register, step by step (CLI) or as one (``spatial tune --promote``)
- ``config.py`` / ``errors.py``  the typed params and the user-facing error types
"""
