"""From files to batches without touching pixels until training: ``cellindex`` (manifest -> one row per cell),
``labels`` (cell labels a person gave: history, replay, the join over slide labels), ``splits`` (group-wise
train / val / test, held-out classes, unlabeled pool), ``trainset`` (the training-data table, label fractions, class
weights), ``loader`` (streaming, shuffled reads; channel names matched ignoring case or through ``data.channel_map``),
``streams`` (the one training-stream builder: as is, cycled, or zipped with unlabeled cells), ``augment`` (batched
microscopy augmentations)."""
