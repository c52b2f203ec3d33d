"""Files in and out: ``formats`` (SPARCSpy / scPortrait single-cell HDF5), ``tables`` (Parquet with metadata),
``atomic`` (write to a temporary name, rename when complete)."""
