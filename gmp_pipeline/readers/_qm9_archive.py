"""The QM9 archive read in place with one decompression pass per run: staging.

The first time a reader needs the archive's index (``len()``, ``n_atoms()``, in the planning
pass), :func:`stage` decompresses the archive ONCE into a scratch directory the reader owns:

* ``members.tar`` - the decompressed tar stream, written as it comes (``bzip2 -dc`` in a child
  process when the archive is bzip2 and the program exists, which runs beside the Python process;
  otherwise Python's bz2 / gzip / lzma modules);
* ``index.npz`` - per dsgdb9nsd member: gdb index (from the name), byte offset and size of its
  data in ``members.tar``, atom count (first line), member ordinal and name; sorted by gdb index, so the
  structure order is the directory's whatever the member order in the archive.

Tasks (other processes, which get the reader pickled with the scratch path) read a member with
one ``os.pread`` at its offset: no task decompresses anything.  The scratch directory is named
``gmp-qm9-stage-<pid>-<random>`` under ``scratch_dir`` (default: the system temporary
directory; on a multi-node cluster pass a directory all workers see) and removed when the
owning reader is closed, garbage-collected or its process exits; directories left by a process
that no longer exists (killed) are removed by the next staging.  A worker that cannot see the
scratch directory stages the archive itself (once per process) and says so in a warning.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import weakref

import numpy as np

from ..errors import SourceError

PREFIX = "gmp-qm9-stage-"
_NAME = re.compile(rb"(?:^|/)dsgdb9nsd_(\d+)\.xyz$")
_CHUNK = 1 << 22

#: per-process cache: scratch dir -> (index dict, file descriptor of members.tar)
_OPEN: dict[str, tuple[dict, int]] = {}
#: number of decompression passes made by this process (tests read it)
passes = 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(root: str) -> None:
    """Remove staging directories under ``root`` whose owning process no longer exists."""
    for d in glob.glob(os.path.join(root, PREFIX + "*")):
        m = re.match(re.escape(PREFIX) + r"(\d+)-", os.path.basename(d))
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _decompress_to(path: str, dest: str) -> None:
    """Write the decompressed tar stream of ``path`` to ``dest`` (one pass)."""
    global passes
    passes += 1
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:3] == b"BZh" and shutil.which("bzip2"):
        with open(dest, "wb") as out:
            proc = subprocess.run(["bzip2", "-dc", path], stdout=out, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise EOFError(msg[-1] if msg else f"bzip2 exit status {proc.returncode}")
        return
    if magic[:3] == b"BZh":
        opener = bz2.open
    elif magic[:2] == b"\x1f\x8b":
        opener = gzip.open
    elif magic[:6] == b"\xfd7zXZ\x00":
        opener = lzma.open
    else:
        opener = open  # an uncompressed tar
    with opener(path, "rb") as src, open(dest, "wb") as out:
        while True:
            b = src.read(_CHUNK)
            if not b:
                break
            out.write(b)


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field[:1] == b"\x80" or field[:1] == b"\xff":  # GNU base-256
        return int.from_bytes(field[1:], "big")
    return int(field or b"0", 8)


def index_tar(tar_path: str, archive: str) -> dict:
    """Scan the headers of an uncompressed tar: offsets, sizes and atom counts of the
    dsgdb9nsd members (ustar, GNU long names, pax ``path``)."""
    gdb, off, size, natoms, ordinal, names = [], [], [], [], [], []
    total = os.path.getsize(tar_path)
    k = 0
    with open(tar_path, "rb") as f:
        pos = 0
        long_name = None
        while pos + 512 <= total:
            f.seek(pos)
            hdr = f.read(512)
            if hdr == b"\0" * 512:
                break
            try:
                n = _octal(hdr[124:136])
            except ValueError:
                raise SourceError(f"not a tar archive (bad header at byte {pos} of the "
                                  "decompressed stream)", path=archive, record=k,
                                  field="archive") from None
            kind = hdr[156:157]
            data = pos + 512
            end = data + ((n + 511) // 512) * 512
            if end > total:
                raise SourceError(f"archive is truncated or corrupt after {k} molecules (member "
                                  f"data past the end of the stream)", path=archive, record=k,
                                  field="archive")
            if kind == b"L":  # GNU long name of the next member
                long_name = f.read(n).rstrip(b"\0")
            elif kind in (b"x", b"g"):  # pax header: take path=
                body = f.read(n)
                mm = re.search(rb"\d+ path=([^\n]*)\n", body)
                if mm and kind == b"x":
                    long_name = mm.group(1)
            else:
                name = long_name if long_name is not None else hdr[0:100].split(b"\0", 1)[0]
                prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
                if long_name is None and prefix:
                    name = prefix + b"/" + name
                long_name = None
                m = _NAME.search(name)
                if kind in (b"0", b"\0", b"7") and m:
                    first = f.read(min(n, 64)).split(b"\n", 1)[0]
                    try:
                        na = int(first.split()[0])
                    except (ValueError, IndexError):
                        raise SourceError(f"atom count {first[:20]!r} is not an integer",
                                          path=f"{archive}:{name.decode('utf-8', 'replace')}",
                                          record=k, field="natoms") from None
                    gdb.append(int(m.group(1)))
                    off.append(data)
                    size.append(n)
                    natoms.append(na)
                    ordinal.append(k)
                    names.append(name.rsplit(b"/", 1)[-1])
                    k += 1
            pos = end
        else:
            if pos != total:
                raise SourceError(f"archive is truncated or corrupt after {k} molecules",
                                  path=archive, record=k, field="archive")
    order = np.argsort(np.asarray(gdb, dtype=np.int64), kind="stable")
    idx = {"gdb": np.asarray(gdb, dtype=np.int64)[order],
           "offset": np.asarray(off, dtype=np.int64)[order],
           "size": np.asarray(size, dtype=np.int64)[order],
           "natoms": np.asarray(natoms, dtype=np.int64)[order],
           "ordinal": np.asarray(ordinal, dtype=np.int64)[order],
           "name": np.asarray(names, dtype="S")[order] if names else np.zeros(0, "S1")}
    if len(idx["gdb"]) > 1 and (np.diff(idx["gdb"]) == 0).any():
        dup = int(idx["gdb"][1:][np.diff(idx["gdb"]) == 0][0])
        raise SourceError(f"molecule {dup} appears twice in the archive", path=archive,
                          field="archive")
    return idx


def stage(archive: str, scratch_dir: str | None = None) -> str:
    """Decompress ``archive`` once into a new scratch directory and index it; return the
    directory (members.tar + index.npz)."""
    root = scratch_dir or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    remove_stale(root)
    d = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)
    try:
        tar = os.path.join(d, "members.tar")
        try:
            _decompress_to(archive, tar)
        except FileNotFoundError:
            raise SourceError("file not found", path=archive) from None
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise SourceError(f"archive is truncated or corrupt ({type(exc).__name__}: {exc})",
                              path=archive, record=0, field="archive") from None
        idx = index_tar(tar, archive)
        np.savez(os.path.join(d, "index.npz"), **idx)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def owner_finalizer(obj, directory: str):
    """Remove ``directory`` when ``obj`` is collected or at interpreter exit."""
    return weakref.finalize(obj, _cleanup, directory)


def _cleanup(directory: str) -> None:
    entry = _OPEN.pop(directory, None)
    if entry is not None:
        try:
            os.close(entry[1])
        except OSError:
            pass
    shutil.rmtree(directory, ignore_errors=True)


def open_staged(directory: str) -> tuple[dict, int]:
    """(index, fd) of a staging directory, cached per process; FileNotFoundError if gone."""
    entry = _OPEN.get(directory)
    if entry is None:
        with np.load(os.path.join(directory, "index.npz")) as z:
            idx = {k: z[k] for k in z.files}
        fd = os.open(os.path.join(directory, "members.tar"), os.O_RDONLY)
        entry = _OPEN[directory] = (idx, fd)
    return entry


def read_member(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise EOFError(f"short read ({len(data)} of {size} bytes)")
    return data
