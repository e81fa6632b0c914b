"""Writing whole shards of a sharded Zarr v3 array straight to its shard files.

Every writer of a ``gmp-features`` store owns whole shards (see :mod:`.writer`), so it does not
need Zarr's read-modify-write machinery.  A :class:`ShardStream` takes rows as they come, cuts
them into the array's inner chunks, encodes each chunk as soon as it is full with the inner
codecs (``bytes``, ``blosc``, ``crc32c``) and appends it to the shard file; when a shard is
done it appends the shard index (``bytes`` + ``crc32c``), as Zarr's ``sharding_indexed``
codec lays a shard out with its index at the end.  The file is byte for byte what Zarr writes
for the same rows (``tests/test_store_shards.py`` checks it), including Zarr's handling of
empty chunks: an inner chunk holding only the fill value is left out of its shard (its index
entry is all ones) and a shard holding only such chunks has no file.  Memory is one inner
chunk, whatever the shard size.

On this 2-core VM writing ``pairs/dfeatures`` this way inside a busy worker costs about half
of what Zarr's own write path does (see the commit that introduced sharding for the figures).

Only that one chain is known here: :class:`DirectArray` refuses any other with a
:class:`StoreError` naming the array and the chain.  Text arrays (``vlen-utf8`` + ``zstd``
inside the shards) are written through Zarr; :func:`open_direct` returns None for them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import StoreError

#: what an index entry of an absent inner chunk holds (offset and length)
_ABSENT = np.uint64(2 ** 64 - 1)


def _chain(codecs) -> str:
    """``a + b + c`` of a codec list (nested sharding chains in brackets), for messages."""
    out = []
    for c in codecs or []:
        name = c.get("name", "?") if isinstance(c, dict) else str(c)
        conf = (c.get("configuration") or {}) if isinstance(c, dict) else {}
        if name == "sharding_indexed":
            name += (f"[{_chain(conf.get('codecs'))} | index {_chain(conf.get('index_codecs'))}"
                     f" at {conf.get('index_location', 'end')}]")
        out.append(name)
    return " + ".join(out) or "(none)"


#: the one chain this module writes, as :func:`_chain` spells it (for the error message)
KNOWN_CHAIN = "sharding_indexed[bytes + blosc + crc32c | index bytes + crc32c at end]"


def _crc32c(data) -> bytes:
    import google_crc32c

    return int(google_crc32c.value(data)).to_bytes(4, "little")


class DirectArray:
    """The shard files of one sharded Zarr v3 array whose chunks span its trailing dimensions
    whole.

    Built from the array's ``zarr.json`` (the Zarr v3 array metadata document), read directly:
    opening the array through Zarr costs a round trip through its event loop thread, which is
    most of the time of writing a small array.  ``rows``: rows per shard (the unit a writer
    owns); ``chunk_rows``: rows per inner chunk.
    """

    def __init__(self, path, meta: dict):
        from numcodecs import Blosc

        self.path = Path(path)
        self.encode_seconds = 0.0
        name = f"{self.path.parent.name}/{self.path.name}"
        self.name = name
        try:
            self.shape = tuple(int(x) for x in meta["shape"])
            grid = meta["chunk_grid"]
            if grid["name"] != "regular":
                raise StoreError(f"{name} ({path}): chunk grid {grid['name']!r} is not regular")
            self.shard_shape = tuple(int(x) for x in grid["configuration"]["chunk_shape"])
            self.dtype = np.dtype(meta["data_type"])
            self.fill = _fill_value(meta["fill_value"], self.dtype)
            enc = meta["chunk_key_encoding"]
            sep = (enc.get("configuration") or {}).get("separator")
            if enc["name"] == "default":
                sep = sep or "/"
                self._key = lambda idx: "c" + "".join(sep + str(i) for i in idx)
            elif enc["name"] == "v2":
                sep = sep or "."
                self._key = lambda idx: sep.join(str(i) for i in idx)
            else:
                raise StoreError(f"{name} ({path}): chunk key encoding {enc['name']!r} is not "
                                 "supported")
            codecs = meta["codecs"]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{name} ({path}): unsupported array metadata ({exc})") from exc
        chain = _chain(codecs)
        refuse = StoreError(f"{name} ({path}): codec chain {chain} is not one the direct shard "
                            f"writer knows ({KNOWN_CHAIN}); refusing to write it")
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            raise refuse
        conf = codecs[0].get("configuration") or {}
        inner = [(c.get("name"), c.get("configuration") or {}) for c in conf.get("codecs", [])]
        index = [(c.get("name"), c.get("configuration") or {})
                 for c in conf.get("index_codecs", [])]
        if ([n for n, _ in inner] != ["bytes", "blosc", "crc32c"]
                or [n for n, _ in index] != ["bytes", "crc32c"]
                or conf.get("index_location", "end") != "end"
                or index[0][1].get("endian", "little") != "little"):
            raise refuse
        try:
            self.chunk_shape = tuple(int(x) for x in conf["chunk_shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{name} ({path}): unsupported sharding metadata ({exc})") from exc
        if self.shard_shape[1:] != self.shape[1:] or self.chunk_shape[1:] != self.shape[1:]:
            raise StoreError(f"{name} ({path}): shards {self.shard_shape} or chunks "
                             f"{self.chunk_shape} do not span the trailing dimensions "
                             f"{self.shape[1:]}")
        self.rows = self.shard_shape[0]
        self.chunk_rows = self.chunk_shape[0]
        if self.rows % self.chunk_rows:
            raise StoreError(f"{name} ({path}): shard of {self.rows} rows is not a whole number "
                             f"of {self.chunk_rows}-row chunks")
        self.chunks_per_shard = self.rows // self.chunk_rows
        endian = inner[0][1].get("endian", "little")
        self._byteorder = "<" if endian in (None, "little") else ">"
        b = inner[1][1]
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[b.get("shuffle", "noshuffle")]
        # the configuration Zarr's BloscCodec hands numcodecs, so the bytes are the same
        self._blosc = Blosc.from_config({"cname": b["cname"], "clevel": int(b["clevel"]),
                                         "shuffle": shuffle, "blocksize": int(b.get("blocksize", 0)),
                                         "typesize": int(b.get("typesize", self.dtype.itemsize))})
        self._zeros = (0,) * (len(self.shape) - 1)

    @property
    def n_shards(self) -> int:
        return -(-self.shape[0] // self.rows)

    def shard_file(self, k: int) -> Path:
        return self.path / self._key((int(k),) + self._zeros)

    def is_empty(self, chunk: np.ndarray) -> bool:
        """Whether ``chunk`` holds only the fill value, as Zarr decides it (NaN equals NaN;
        a zero fill is compared bit for bit, so -0.0 is data)."""
        fill = self.fill
        if self.dtype.kind == "f":
            if np.isnan(fill):
                return bool(np.isnan(chunk).all())
            if fill == 0:
                return not np.ascontiguousarray(chunk).view(np.uint8).any()
        return bool((chunk == fill).all())

    def encode(self, chunk: np.ndarray) -> bytes:
        """One full inner chunk, encoded with the inner codecs (``bytes``, ``blosc``, ``crc32c``:
        the checksum of the compressed bytes appended as a little-endian uint32)."""
        t = time.perf_counter()
        raw = np.ascontiguousarray(chunk, dtype=self.dtype.newbyteorder(self._byteorder))
        data = bytes(self._blosc.encode(raw.view(np.uint8).reshape(-1)))
        data += _crc32c(data)
        self.encode_seconds += time.perf_counter() - t
        return data

    def stream(self, row0: int) -> "ShardStream":
        """A :class:`ShardStream` writing rows from ``row0`` (which must start a shard)."""
        return ShardStream(self, row0)

    def write(self, row0: int, block: np.ndarray) -> int:
        """Write ``block`` at rows ``[row0, row0 + len(block))``; ``row0`` must start a shard,
        and the block covers its shards whole (the rest of its last shard is fill value, so
        this is for regions the caller owns to the end of that shard).  Returns the bytes
        written."""
        s = ShardStream(self, row0)
        s.append(block)
        s.close()
        return s.bytes_written


class ShardStream:
    """Rows of a :class:`DirectArray` from ``row0`` (a shard boundary) on, written shard by
    shard as they come: :meth:`append` rows (any number at a time), :meth:`skip_to` a later
    row (the rows between are fill value, and chunks holding nothing else are left out, as
    are whole shards: their files are removed if an earlier run left any), :meth:`close` to
    finish the last shard (its remaining rows are fill value)."""

    def __init__(self, arr: DirectArray, row0: int):
        row0 = int(row0)
        if row0 % arr.rows:
            raise StoreError(f"{arr.name}: row {row0} does not start a shard of {arr.rows} rows")
        if not 0 <= row0 <= arr.shape[0]:
            raise StoreError(f"{arr.name}: row {row0} is outside its {arr.shape[0]} rows")
        self.arr = arr
        self.pos = row0                      # first row of the chunk being filled
        self.buf = np.empty((arr.chunk_rows,) + arr.shape[1:], dtype=arr.dtype)
        self.filled = 0                      # rows in buf
        self._shard = None                   # index of the shard being written
        self._file = None
        self._index = None
        self._offset = 0
        self.bytes_written = 0
        self.closed = False

    @property
    def row(self) -> int:
        """The next row to be written."""
        return self.pos + self.filled

    def append(self, block) -> None:
        a = self.arr
        block = np.asarray(block)
        if tuple(block.shape[1:]) != a.shape[1:]:
            raise StoreError(f"{a.name}: block of shape {block.shape} does not fit the "
                             f"array's trailing shape {a.shape[1:]}")
        n = int(block.shape[0])
        if self.row + n > a.shape[0]:
            raise StoreError(f"{a.name}: rows [{self.row}, {self.row + n}) exceed its "
                             f"{a.shape[0]} rows")
        c = a.chunk_rows
        k = 0
        while k < n:
            if self.filled == 0 and n - k >= c:
                self._chunk(block[k:k + c])        # a whole chunk straight from the block
                k += c
                continue
            take = min(c - self.filled, n - k)
            self.buf[self.filled:self.filled + take] = block[k:k + take]
            self.filled += take
            k += take
            if self.filled == c:
                self.filled = 0
                self._chunk(self.buf)

    def skip_to(self, row: int) -> None:
        """Fill value from :attr:`row` up to ``row``."""
        a = self.arr
        row = min(int(row), a.shape[0])
        if row < self.row:
            raise StoreError(f"{a.name}: cannot go back from row {self.row} to {row}")
        c = a.chunk_rows
        if self.filled:
            take = min(c - self.filled, row - self.row)
            self.buf[self.filled:self.filled + take] = a.fill
            self.filled += take
            if self.filled < c:
                return
            self.filled = 0
            self._chunk(self.buf)
        target = self.pos + (row - self.pos) // c * c
        if target > self.pos:                  # whole chunks of fill value: nothing stored
            if self._shard is not None:        # the shard being written: finished if left
                first = self._shard + 1
                if target // a.rows != self._shard:
                    self._finish_shard()
            else:                              # not started yet: nothing but fill so far
                first = self.pos // a.rows
            for k in range(first, target // a.rows):   # shards left holding only fill
                _remove(a.shard_file(k))
            self.pos = target
        if row > self.pos:
            self.buf[:row - self.pos] = a.fill
            self.filled = row - self.pos

    def close(self) -> int:
        """Finish the last shard; returns the row after the last one written."""
        if self.closed:
            return self.row
        end = self.row
        if self.filled:
            self.buf[self.filled:] = self.arr.fill
            self.filled = 0
            self._chunk(self.buf)
        if self._shard is None and self.pos % self.arr.rows:
            _remove(self.arr.shard_file(self.pos // self.arr.rows))   # only fill was given
        self._finish_shard()
        self.closed = True
        return end

    def _chunk(self, chunk: np.ndarray) -> None:
        """One full inner chunk at :attr:`pos`."""
        a = self.arr
        k, j = divmod(self.pos // a.chunk_rows, a.chunks_per_shard)
        if self._shard != k:
            self._finish_shard()
            self._shard = k
            self._index = np.full((a.chunks_per_shard, 2), _ABSENT, dtype="<u8")
            self._offset = 0
        if not a.is_empty(chunk):
            data = a.encode(chunk)
            if self._file is None:
                target = a.shard_file(k)
                try:
                    self._file = open(target, "wb")
                except FileNotFoundError:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(target, "wb")
            self._file.write(data)
            self._index[j] = (self._offset, len(data))
            self._offset += len(data)
            self.bytes_written += len(data)
        self.pos += a.chunk_rows
        if self.pos % a.rows == 0:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._shard is None:
            return
        if self._file is None:
            # every chunk was fill value: Zarr writes no file (and removes an older one)
            _remove(self.arr.shard_file(self._shard))
        else:
            index = self._index.tobytes()
            self._file.write(index + _crc32c(index))
            self.bytes_written += len(index) + 4
            self._file.close()
        self._shard = self._file = self._index = None


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fill_value(value, dtype: np.dtype):
    if isinstance(value, str) and dtype.kind in "fc":
        return {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}[value]
    return np.asarray(value).astype(dtype)[()]


def read_meta(path) -> dict:
    """The Zarr v3 array metadata document of the array at ``path``."""
    import json

    meta_file = Path(path) / "zarr.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{meta_file} is unreadable: {exc}") from exc
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise StoreError(f"{meta_file} is not Zarr v3 array metadata")
    return meta


def _is_text(meta: dict) -> bool:
    dt = meta.get("data_type")
    return isinstance(dt, str) and dt in ("string", "str") or (
        isinstance(dt, dict) and dt.get("name") in ("string", "str"))


def open_direct(path) -> DirectArray | None:
    """A :class:`DirectArray` for the array at ``path``, or None for a text array (written
    through Zarr).  Any other array whose codec chain is not the one this module writes is
    refused with a :class:`StoreError` naming the array and its chain."""
    meta = read_meta(path)
    if _is_text(meta):
        return None
    return DirectArray(path, meta)


__all__ = ["DirectArray", "ShardStream", "KNOWN_CHAIN", "open_direct", "read_meta"]
