"""Writing whole chunks of a Zarr v3 array straight to its chunk files.

Every writer of a ``gmp-features`` store owns whole chunks (see :mod:`.writer`), so it does not
need Zarr's read-modify-write machinery: a chunk is padded with the fill value, encoded with the
array's own codecs (``bytes``, ``blosc`` and the ``crc32c`` checksum, exactly as Zarr encodes
them) and written to the file
the array's chunk key encoding names.  Zarr reads the result like any chunk it wrote itself.
On this 2-core VM that halved the cost of writing ``pairs/dfeatures`` inside a busy worker
(Zarr's asynchronous pipeline hands every chunk to a thread pool twice, once to encode and once
to write).

Arrays with any other codec chain (text arrays: ``vlen-utf8`` + ``zstd``) are written through
Zarr; :func:`open_direct` returns None for them.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import StoreError


class DirectArray:
    """The chunk files of one Zarr v3 array whose chunks span its trailing dimensions whole.

    Built from the array's ``zarr.json`` (the Zarr v3 array metadata document), read directly:
    opening the array through Zarr costs a round trip through its event loop thread, which is
    most of the time of writing a small array.
    """

    def __init__(self, path, meta: dict):
        from numcodecs import Blosc

        self.path = Path(path)
        self.encode_seconds = 0.0
        try:
            self.shape = tuple(int(x) for x in meta["shape"])
            grid = meta["chunk_grid"]
            if grid["name"] != "regular":
                raise StoreError(f"{path}: chunk grid {grid['name']!r} is not regular")
            self.chunks = tuple(int(x) for x in grid["configuration"]["chunk_shape"])
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
                raise StoreError(f"{path}: chunk key encoding {enc['name']!r} is not supported")
            codecs = [(c["name"], c.get("configuration") or {}) for c in meta["codecs"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path}: unsupported array metadata ({exc})") from exc
        self.rows = self.chunks[0]
        if self.chunks[1:] != self.shape[1:]:
            raise StoreError(f"{path}: chunks {self.chunks} do not span the trailing dimensions")
        names = [c[0] for c in codecs]
        if names not in (["bytes", "blosc"], ["bytes", "blosc", "crc32c"]):
            raise StoreError(f"{path}: codec chain {' + '.join(names)} is not one this writer "
                             "knows (bytes + blosc, optionally + crc32c)")
        self._crc32c = names[-1] == "crc32c"
        endian = codecs[0][1].get("endian", "little")
        self._byteorder = "<" if endian in (None, "little") else ">"
        b = codecs[1][1]
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[b.get("shuffle", "noshuffle")]
        # the configuration Zarr's BloscCodec hands numcodecs, so the bytes are the same
        self._blosc = Blosc.from_config({"cname": b["cname"], "clevel": int(b["clevel"]),
                                         "shuffle": shuffle, "blocksize": int(b.get("blocksize", 0)),
                                         "typesize": int(b.get("typesize", self.dtype.itemsize))})

    def encode(self, chunk: np.ndarray) -> bytes:
        raw = np.ascontiguousarray(chunk, dtype=self.dtype.newbyteorder(self._byteorder))
        data = self._blosc.encode(raw.view(np.uint8).reshape(-1))
        if self._crc32c:
            import google_crc32c

            # Zarr's crc32c codec appends the checksum of the encoded bytes as a uint32
            data = bytes(data) + np.uint32(google_crc32c.value(bytes(data))).astype("<u4").tobytes()
        return data

    def write(self, row0: int, block: np.ndarray) -> int:
        """Write ``block`` at rows ``[row0, row0 + len(block))``; ``row0`` must start a chunk,
        and the block covers its chunks whole (the rest of its last chunk is filled, so this
        is for regions the caller owns to the end of that chunk).  Returns bytes written."""
        row0 = int(row0)
        n = int(block.shape[0])
        if row0 % self.rows:
            raise StoreError(f"{self.path}: row {row0} does not start a chunk of {self.rows} rows")
        if row0 + n > self.shape[0]:
            raise StoreError(f"{self.path}: rows [{row0}, {row0 + n}) exceed its "
                             f"{self.shape[0]} rows")
        if tuple(block.shape[1:]) != self.shape[1:]:
            raise StoreError(f"{self.path}: block of shape {block.shape} does not fit the "
                             f"array's trailing shape {self.shape[1:]}")
        zeros = (0,) * (len(self.shape) - 1)
        written = 0
        pad = None
        for r in range(0, n, self.rows):
            part = block[r:r + self.rows]
            if part.shape[0] < self.rows:
                pad = np.full((self.rows,) + self.shape[1:], self.fill, dtype=self.dtype)
                pad[:part.shape[0]] = part
                part = pad
            _t = time.perf_counter()
            data = self.encode(part)
            self.encode_seconds += time.perf_counter() - _t
            key = self._key(((row0 + r) // self.rows,) + zeros)
            target = self.path / key
            try:
                f = open(target, "wb")
            except FileNotFoundError:
                target.parent.mkdir(parents=True, exist_ok=True)
                f = open(target, "wb")
            with f:
                f.write(data)
            written += len(data)
        return written


def _fill_value(value, dtype: np.dtype):
    if isinstance(value, str) and dtype.kind in "fc":
        return {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}[value]
    return np.asarray(value).astype(dtype)[()]


def open_direct(path) -> DirectArray | None:
    """A :class:`DirectArray` for the array at ``path``, or None when its layout is not one
    this module writes (other codecs, such as the text arrays' ``vlen-utf8`` + ``zstd``: those
    are written through Zarr)."""
    import json

    meta_file = Path(path) / "zarr.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{meta_file} is unreadable: {exc}") from exc
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise StoreError(f"{meta_file} is not Zarr v3 array metadata")
    try:
        return DirectArray(path, meta)
    except StoreError:
        return None


__all__ = ["DirectArray", "open_direct"]
