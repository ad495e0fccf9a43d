"""On-disk formats: the teacher feature store, the student image cache and HDF5/DSMD interop."""
