"""gmp-pipeline: GMP features and their position derivatives, computed on Dask into Zarr.

Public names:

* :class:`GMPFeaturizer`, :class:`GMPResult`: the featurizer (``featurize``, ``featurize_many``).
* :func:`open_store`, :class:`FeatureStore`, :func:`collate_energy_forces`: read a
  gmp-features Zarr store from training code (numpy; a torch Dataset when torch is installed).
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


def __getattr__(name):
    # the store reader imports zarr: only when asked for
    if name in ("FeatureStore", "ChunkShuffleSampler", "collate_energy_forces"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'gmp_pipeline' has no attribute {name!r}")


__all__ = ["GMPFeaturizer", "GMPResult", "Structure", "open_store", "FeatureStore",
           "ChunkShuffleSampler", "collate_energy_forces", "GMPError", "InputError", "PseudopotentialError",
           "SourceError", "StoreError", "ClusterError", "__version__"]
