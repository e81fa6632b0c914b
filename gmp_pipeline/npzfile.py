"""Lazy, memory-mapped access to the members of an ``.npz`` file (no pickle).

Members stored without compression are memory-mapped: reading rows ``[a, b)`` of one touches
only those bytes.  Deflated members cannot be sliced without decompressing, so they are loaded
whole once.  Object arrays are never unpickled.  Used by the MD17/rMD17 readers
(:mod:`gmp_pipeline.readers._npz`) and by the store's per-task staging files
(:mod:`gmp_pipeline.store.staging`).  Problems raise :class:`~gmp_pipeline.errors.SourceError`.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib

import numpy as np

from .errors import SourceError


class NpzArrays:
    """Header-only inspection and memory-mapped reading of the members of one npz file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise SourceError("file not found", path=self.path) from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SourceError(f"not a readable npz/zip archive ({exc})", path=self.path) from None
        self._infos = {}
        for info in self._zip.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            self._infos[key] = info
        self._headers: dict[str, tuple] = {}
        self._cache: dict[str, np.ndarray] = {}

    def close(self) -> None:
        """Close the archive (arrays already returned stay readable)."""
        self._zip.close()

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key) -> bool:
        return key in self._infos

    def header(self, key) -> tuple[tuple[int, ...], np.dtype, bool, int]:
        """(shape, dtype, fortran_order, offset of the data inside the member)."""
        if key not in self._headers:
            info = self._infos.get(key)
            if info is None:
                raise SourceError("missing key", path=self.path, field=key)
            try:
                with self._zip.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    offset = f.tell()
            except (ValueError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
                raise SourceError(f"not a readable .npy member ({exc})", path=self.path,
                                  field=key) from None
            self._headers[key] = (tuple(shape), np.dtype(dtype), bool(fortran), offset)
        return self._headers[key]

    def array(self, key) -> np.ndarray:
        """The member as an array: a read-only memmap when stored uncompressed."""
        if key in self._cache:
            return self._cache[key]
        shape, dtype, fortran, hdr = self.header(key)
        if dtype.hasobject:
            raise SourceError("object array (would need pickle, which is disabled)",
                              path=self.path, field=key)
        info = self._infos[key]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if info.compress_type == zipfile.ZIP_STORED and nbytes > 0:
            if info.file_size < hdr + nbytes:
                raise SourceError(f"member holds {info.file_size - hdr} data bytes, the header "
                                  f"declares {nbytes} (truncated file?)", path=self.path, field=key)
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise SourceError("corrupt zip local header", path=self.path, field=key)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len + hdr
            if os.path.getsize(self.path) < start + nbytes:
                raise SourceError("file is shorter than the member it declares (truncated?)",
                                  path=self.path, field=key)
            arr = np.memmap(self.path, dtype=dtype, mode="r", offset=start, shape=shape,
                            order="F" if fortran else "C")
        else:
            try:
                with self._zip.open(info) as f:
                    arr = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
                raise SourceError(f"cannot read member ({exc})", path=self.path,
                                  field=key) from None
        self._cache[key] = arr
        return arr

    def compressed(self, key) -> bool:
        return self._infos[key].compress_type != zipfile.ZIP_STORED

    def text(self, key) -> str | None:
        """A 0-d string/bytes metadata member, or None when absent or not plain text."""
        if key not in self._infos:
            return None
        try:
            shape, dtype, _, _ = self.header(key)
            if dtype.kind not in "US" or int(np.prod(shape)) != 1:
                return None
            value = self.array(key).reshape(-1)[0]
        except SourceError:
            return None
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


__all__ = ["NpzArrays"]
