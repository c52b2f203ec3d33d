"""Training regimes around the one engine: ``objectives`` (the one objective builder: ``train.regime`` and
``ssl.method`` -> objective; used by ``spatial train``, AL rounds and tuning trials), ``semisupervised`` (FixMatch
with a timm model-EMA teacher, the autoencoder whose decoder is an optimizer parameter group, the stream for a
training-data table), ``ensemble_training`` (deep-ensemble members, calibration, novelty fit), ``contrastive``
(SimCLR pretraining of the encoder that ``model.pretrained`` fine-tunes from: ``spatial pretrain``)."""
