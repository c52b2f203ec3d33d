"""From files to batches without touching pixels until training: ``cellindex`` (manifest -> one row per cell),
``splits`` (group-wise train / val / test, held-out classes, unlabeled pool), ``trainset`` (the training-data
table, label fractions, class weights), ``loader`` (streaming, shuffled reads), ``augment`` (batched microscopy
augmentations)."""
