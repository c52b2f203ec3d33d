"""Training regimes around the one engine: ``semisupervised`` (FixMatch, autoencoder objectives and the mixed
labeled / unlabeled stream), ``ensemble_training`` (deep-ensemble members, calibration, novelty fit)."""
