"""Ray Tune sweeps over the same dotted config keys the CLI uses (``spatial tune``).

* :mod:`tuning.space` - ``tune.space`` in params.yaml -> validated dimensions -> Ray Tune domains (and Optuna).
* :mod:`tuning.trainable` - one trial: trains one member with the one engine, reports every epoch with a
  checkpoint, logs its nested MLflow run; runs outside Tune too (:func:`~tuning.trainable.run_trial`).
* :mod:`tuning.sweep` - local Ray or an existing cluster, ASHA / FIFO, random / Optuna, retries, resume,
  the MLflow parent run and the sweep outputs (``best.json``, ``best_params.yaml``, ``trials.csv``).
* :mod:`tuning.promote` - the winner retrained as an ensemble, evaluated and registered (``champion``).
The command itself, ``spatial tune``, is :mod:`serving.cli.tuning` (the CLI imports every package, so it lives on top).
"""
