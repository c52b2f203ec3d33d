"""Files in and out: ``formats`` (SPARCSpy / scPortrait single-cell HDF5), ``hdf5`` (the one safe way to open an
HDF5 file from elsewhere, and read limits), ``pixels`` (the accepted pixel values), ``tables`` (Parquet with
metadata), ``atomic`` (write to a temporary name, rename when complete)."""
