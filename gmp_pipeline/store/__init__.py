"""The ``gmp-features`` Zarr v3 store (format: ``docs/format.md``).

:mod:`.layout` (array specs, codecs, fingerprint, root attributes), :mod:`.lock`, :mod:`.staging`
(the per-task results of a run), :mod:`.chunks` (whole-shard writes), :mod:`.writer` (the
:class:`~.writer.StoreWriter` phases), :mod:`.reader` (:func:`open_store`), :mod:`.torch` (the torch
Dataset and collate function) and :mod:`.verify` (``inspect`` / ``verify``).
"""
from .layout import FORMAT_NAME, FORMAT_VERSION
from .reader import FeatureStore, open_store
from .sampler import ChunkShuffleSampler
from .torch import collate_energy_forces, make_torch_dataset

__all__ = ["ChunkShuffleSampler", "FORMAT_NAME", "FORMAT_VERSION", "FeatureStore", "collate_energy_forces",
           "make_torch_dataset", "open_store"]
