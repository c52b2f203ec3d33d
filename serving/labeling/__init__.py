"""Label cells in the browser: a small Starlette app (``app``) over the queried cells, the labels history
(``store``: append-only ``labels.csv``, atomic and locked) and thumbnails read from the HDF5 files on demand
(``thumbs``). Started by ``spatial label``."""
