"""gmp-pipeline: GMP features and their position derivatives, computed on Dask into Zarr.

Public names:

* :class:`GMPFeaturizer`, :class:`GMPResult`: the featurizer (``featurize``, ``featurize_many``).
* :func:`open_store`: read a gmp-features Zarr store from training code.
* :class:`Structure`: the record every reader yields.
* the exception family :class:`GMPError` and its subclasses.
"""
from .errors import (ClusterError, GMPError, InputError, PseudopotentialError, SourceError,
                     StoreError)
from .features import GMPFeaturizer, GMPResult
from .structure import Structure

__version__ = "0.1.0"


def open_store(path, **kwargs):
    """Open a gmp-features Zarr store for reading (see :mod:`gmp_pipeline.store`)."""
    from .store import open_store as _open

    return _open(path, **kwargs)


__all__ = ["GMPFeaturizer", "GMPResult", "Structure", "open_store", "GMPError", "InputError",
           "PseudopotentialError", "SourceError", "StoreError", "ClusterError", "__version__"]
