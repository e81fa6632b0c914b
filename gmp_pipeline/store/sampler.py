"""Orders for reading a store in training: shuffled, but chunk by chunk.

A plain random permutation touches a different chunk for almost every structure, so once a
store is larger than the reader's chunk cache every chunk is decoded many times per epoch.
:class:`ChunkShuffleSampler` shuffles at two levels instead, as streaming loaders for sharded
datasets do: the *blocks* of structures that share a chunk of ``atoms/features`` are taken in a
random order, and the structures of a window of consecutive blocks (at least ``buffer_size``
structures) are shuffled among themselves before they are yielded.  Each chunk is then decoded
about once per epoch, whatever the store size, while every epoch still sees a new order.

It works with any object exposing ``len()`` and either a :class:`FeatureStore` or a dataset
from :meth:`FeatureStore.torch_dataset` (then it yields positions into that dataset's
``indices``), and needs no torch: pass it as ``DataLoader(..., sampler=...)``.
"""
from __future__ import annotations

import numpy as np

from ._rowcache import row_chunk


class ChunkShuffleSampler:
    """Chunk-aware shuffled order over a store or a store's torch dataset.

    ``buffer_size``: fewest structures shuffled together (default: as many as fill a quarter of
    the store's chunk cache with the fields the dataset reads, at most 1024); ``seed``: the order of
    epoch ``e`` is a function of ``(seed, e)`` only, so a run is reproducible.  The epoch
    advances by one on every ``iter()``; :meth:`set_epoch` sets it (as with torch's
    ``DistributedSampler``).
    """

    def __init__(self, data, *, buffer_size: int | None = None, seed: int = 0):
        store = getattr(data, "store", data)
        indices = getattr(data, "indices", None)
        positions = np.arange(len(store)) if indices is None else np.asarray(indices, np.int64)
        if buffer_size is None:
            buffer_size = auto_buffer_size(store, getattr(data, "fields", None))
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        rows = row_chunk(store.array("atoms/features"))
        first_atom = store.atom_start()[positions]
        block = first_atom // rows
        order = np.argsort(block, kind="stable")
        cuts = np.flatnonzero(np.diff(block[order])) + 1
        #: dataset positions of the structures of each block, in store order
        self.blocks = np.split(order, cuts) if order.size else []
        self.buffer_size = int(buffer_size)
        self.seed = int(seed)
        self.epoch = 0
        self._explicit = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._explicit = True

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self._explicit:
            self.epoch += 1
        self._explicit = False
        window: list[np.ndarray] = []
        size = 0
        for b in rng.permutation(len(self.blocks)):
            blk = self.blocks[b]
            window.append(blk)
            size += blk.size
            if size >= self.buffer_size:
                yield from rng.permutation(np.concatenate(window)).tolist()
                window, size = [], 0
        if window:
            yield from rng.permutation(np.concatenate(window)).tolist()

    def __len__(self) -> int:
        return int(sum(b.size for b in self.blocks))


def auto_buffer_size(store, fields=None, limit: int = 1024) -> int:
    """Structures whose decoded rows (of the fields read) fill a quarter of the chunk cache."""
    n = max(1, len(store))
    names, deriv = store._resolve_fields(fields)
    per = 0.0
    counts = store.attrs.get("counts", {})
    atoms = float(store.n_atoms().sum()) / n
    for name in names:
        path = store._sources.get(name)
        if path is not None and path.startswith("atoms/"):
            arr = store.array(path)
            per += atoms * arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    if deriv:
        df = store.array("pairs/dfeatures")
        pairs = float(counts.get("n_pairs", 0)) / n
        per += pairs * (df.dtype.itemsize * int(np.prod(df.shape[1:], dtype=np.int64)) + 12)
    budget = store.cache_bytes / 4 if store.cache_bytes > 0 else 64 << 20
    return int(max(1, min(limit, budget // max(per, 1.0))))
