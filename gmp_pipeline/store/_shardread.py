"""Decoding single inner chunks of a format-v2 array straight from its shard files.

A training read touches a few rows of several arrays, one inner chunk at a time.  Through
Zarr each such read is two trips through its asynchronous pipeline (the shard index, then the
chunk's byte range), which costs more than decoding a small chunk.  :class:`ShardReader` reads
each shard's index once (it is small: 16 bytes per chunk) and then every chunk with one
``pread``, checks its crc32c and decompresses it with the same numcodecs Blosc Zarr uses.  It
only knows the chain the pipeline writes (:data:`~.chunks.KNOWN_CHAIN`) on a local directory
store; :func:`shard_reader` returns None for anything else and the caller reads through Zarr.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import StoreError

_ABSENT = 2 ** 64 - 1


def _crc32c(data) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


class ShardReader:
    """Inner chunks of one sharded array (see the module docstring); ``chunk(ci)`` gives
    rows ``ci * c : (ci + 1) * c`` (cut at the array's end) as a read-only array."""

    def __init__(self, directory, meta: dict, label: str):
        from .chunks import DirectArray

        self.layout = DirectArray(directory, meta)      # parses (and refuses) like the writer
        self.label = label
        lay = self.layout
        self.native = lay.dtype.newbyteorder("=")
        self.stored = lay.dtype.newbyteorder(lay._byteorder)
        self._index: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()

    def _shard_index(self, k: int) -> np.ndarray | None:
        idx = self._index.get(k, False)
        if idx is not False:
            return idx
        lay = self.layout
        path = lay.shard_file(k)
        n = 16 * lay.chunks_per_shard + 4
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            idx = None
        else:
            try:
                size = os.fstat(fd).st_size
                raw = os.pread(fd, n, size - n) if size >= n else b""
            finally:
                os.close(fd)
            if len(raw) != n or _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise StoreError(f"{self.label}: the index of shard {k} ({path}) fails its "
                                 "crc32c checksum (the file is truncated or corrupt)")
            idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
        with self._lock:
            self._index[k] = idx
        return idx

    def chunk(self, ci: int) -> np.ndarray:
        lay = self.layout
        c = lay.chunk_rows
        rows = min(c, lay.shape[0] - ci * c)
        k, j = divmod(ci, lay.chunks_per_shard)
        idx = self._shard_index(k)
        if idx is None or int(idx[j, 0]) == _ABSENT:
            out = np.full((rows,) + lay.shape[1:], lay.fill, dtype=self.native)
            out.flags.writeable = False
            return out
        off, length = int(idx[j, 0]), int(idx[j, 1])
        path = lay.shard_file(k)
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, length, off)
        finally:
            os.close(fd)
        if len(raw) != length or length < 4 or \
                _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise StoreError(f"{self.label}: chunk {j} of shard {k} ({path}) fails its crc32c "
                             "checksum (the file is truncated or corrupt)")
        data = lay._blosc.decode(memoryview(raw)[:-4])
        block = np.frombuffer(data, dtype=self.stored).reshape((c,) + lay.shape[1:])
        if self.stored != self.native:
            block = block.astype(self.native)
        block = block[:rows]
        block.flags.writeable = False
        return block


def shard_reader(arr, label: str) -> ShardReader | None:
    """A :class:`ShardReader` for the zarr array ``arr``, or None when it is not a format-v2
    array of the known chain in a local directory (the caller then reads through Zarr)."""
    try:
        from zarr.storage import LocalStore

        store = arr.store_path.store
        if not isinstance(store, LocalStore) or getattr(arr, "shards", None) is None:
            return None
        from .chunks import _is_text, read_meta

        directory = os.path.join(str(store.root), arr.store_path.path)
        meta = read_meta(directory)
        if _is_text(meta) or not isinstance(meta.get("data_type"), str):
            return None
        return ShardReader(directory, meta, label)
    except Exception:  # noqa: BLE001 - any layout this reader does not know: read via Zarr
        return None


__all__ = ["ShardReader", "shard_reader"]
