"""Decoded chunks of a store's arrays, kept in memory for random access by rows.

Training reads structures in random or shuffled order; every structure touches a few rows of
several arrays, and each such read would otherwise decode whole chunks again and again.  A
:class:`ChunkCache` decodes each row-chunk of an array once (an inner chunk of a format-v2
array straight from its shard file with :mod:`._shardread`; anything else, such as text and
format-v1 arrays, through zarr) and keeps it until the byte budget is exceeded.  Eviction takes the
least-recently-used chunk of the array holding the most cached bytes, so the bulky
``pairs/dfeatures`` streaming through the cache never pushes out the small per-atom chunks
(features, positions) that a shuffled epoch reuses.

The cache belongs to one open store in one process; it is dropped when the store is pickled
(each ``DataLoader`` worker builds its own).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


def row_chunk(arr) -> int:
    """Rows per independently decodable chunk: the inner chunk of a sharded array, else the
    chunk."""
    return int(arr.chunks[0])


class ChunkCache:
    """Row-chunks of zarr arrays, decoded once, within ``max_bytes`` (least recently used out,
    from the array with the most cached bytes first)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._chunks: dict[str, OrderedDict[int, np.ndarray]] = {}
        self._bytes: dict[str, int] = {}
        self._total = 0
        self._rows: dict[str, int] = {}       # rows per chunk of each array (zarr's lookup is slow)
        self._readers: dict = {}              # per array: its shard reader, or None (zarr)
        self._lock = threading.Lock()
        self.decoded = 0          # chunks decoded so far (for benchmarks and tests)

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._bytes.clear()
            self._total = 0

    @property
    def nbytes(self) -> int:
        return self._total

    def chunk(self, key: str, arr, ci: int) -> np.ndarray:
        """Rows ``ci * c : (ci + 1) * c`` of ``arr`` (``c`` = :func:`row_chunk`), decoded."""
        with self._lock:
            per = self._chunks.get(key)
            if per is not None:
                block = per.get(ci)
                if block is not None:
                    per.move_to_end(ci)
                    return block
        c = self._chunk_rows(key, arr)
        fast = self._reader(key, arr)
        if fast is not None:            # a format-v2 array: the chunk straight from its shard
            block = fast.chunk(ci)
        else:
            block = np.asarray(arr[ci * c:min((ci + 1) * c, arr.shape[0])])
        with self._lock:
            self.decoded += 1
            per = self._chunks.setdefault(key, OrderedDict())
            if ci not in per:
                block.flags.writeable = False     # shared by every read of this chunk
                per[ci] = block
                nb = block.nbytes if block.dtype != object else 64 * block.size
                self._bytes[key] = self._bytes.get(key, 0) + nb
                self._total += nb
                self._evict(keep=(key, ci))
        return block

    def _reader(self, key: str, arr):
        """The :class:`~._shardread.ShardReader` of ``arr``, or None (read through zarr)."""
        r = self._readers.get(key, False)
        if r is False:
            from ._shardread import shard_reader

            r = self._readers[key] = shard_reader(arr, key)
        return r

    def _chunk_rows(self, key: str, arr) -> int:
        c = self._rows.get(key)
        if c is None:
            c = self._rows[key] = row_chunk(arr)
        return c

    def _evict(self, keep) -> None:
        while self._total > self.max_bytes:
            key = max(self._bytes, key=self._bytes.get)
            per = self._chunks[key]
            ci = next(iter(per))
            if (key, ci) == keep:
                if len(per) == 1:
                    # the only chunk of the largest array is the one just asked for: drop
                    # another array's oldest chunk instead, or stop when none is left
                    others = [k for k in self._bytes if k != key and self._chunks[k]]
                    if not others:
                        return
                    key = max(others, key=self._bytes.get)
                    per = self._chunks[key]
                    ci = next(iter(per))
                else:
                    per.move_to_end(ci)
                    ci = next(iter(per))
            block = per.pop(ci)
            nb = block.nbytes if block.dtype != object else 64 * block.size
            self._bytes[key] -= nb
            self._total -= nb

    def rows(self, key: str, arr, a: int, b: int, copy: bool = True) -> np.ndarray:
        """Rows ``a:b`` of ``arr``: a copy, or with ``copy=False`` possibly a read-only view of a
        cached chunk (for callers that copy it at once)."""
        c = self._chunk_rows(key, arr)
        if b <= a:
            return np.zeros((0,) + tuple(arr.shape[1:]), dtype=self._dtype(arr))
        ca, cb = a // c, (b - 1) // c
        if ca == cb:
            view = self.chunk(key, arr, ca)[a - ca * c:b - ca * c]
            return view.copy() if copy else view
        parts = []
        for ci in range(ca, cb + 1):
            block = self.chunk(key, arr, ci)
            lo, hi = max(a, ci * c) - ci * c, min(b, (ci + 1) * c) - ci * c
            parts.append(block[lo:hi])
        return np.concatenate(parts)

    def take(self, key: str, arr, idx: np.ndarray) -> np.ndarray:
        """``arr[idx]`` for sorted row indices ``idx`` (one decode per touched chunk)."""
        idx = np.asarray(idx, dtype=np.int64)
        c = self._chunk_rows(key, arr)
        chunk_of = idx // c
        if idx.size and chunk_of[0] == chunk_of[-1]:
            return self.chunk(key, arr, int(chunk_of[0]))[idx - chunk_of[0] * c]
        out = None
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [idx.size]])
        for s, e in zip(starts, ends):
            ci = int(chunk_of[s])
            block = self.chunk(key, arr, ci)
            if out is None:
                out = np.empty((idx.size,) + block.shape[1:], dtype=block.dtype)
            out[s:e] = block[idx[s:e] - ci * c]
        if out is None:
            out = np.zeros((0,) + tuple(arr.shape[1:]), dtype=self._dtype(arr))
        return out

    @staticmethod
    def _dtype(arr):
        dt = arr.dtype
        return dt.to_native_dtype() if hasattr(dt, "to_native_dtype") else np.dtype(dt)
