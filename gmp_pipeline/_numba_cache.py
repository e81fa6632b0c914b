"""Where numba caches the compiled kernels: a directory keyed on the kernels' sources.

numba validates a cached function only against the file that defines it.  The driver kernel
in ``_kernels.py`` inlines the generated loops of ``_fused.py``, so after an upgrade that
changes only ``_fused.py`` numba would load a stale driver and compute with the old loops,
silently.  Compiling into a directory named after a hash of every kernel source file rules
that out: other sources, other directory.

The base directory is numba's own choice (``NUMBA_CACHE_DIR`` / ``numba.config.CACHE_DIR``,
which the Dask worker plugin sets per worker), else ``__pycache__`` next to the package when
it is writable, else ``~/.cache/gmp-pipeline/numba``.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numba

HERE = Path(__file__).resolve().parent
KERNEL_SOURCES = ("_kernels.py", "_fused.py", "_numba_cache.py")


def source_tag() -> str:
    h = hashlib.sha256()
    for name in KERNEL_SOURCES:
        h.update(name.encode())
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    base = numba.config.CACHE_DIR
    if not base:
        in_tree = HERE / "__pycache__"
        try:
            in_tree.mkdir(exist_ok=True)
            usable = os.access(in_tree, os.W_OK)
        except OSError:
            usable = False
        base = str(in_tree) if usable else os.path.join(os.path.expanduser("~"), ".cache",
                                                        "gmp-pipeline", "numba")
    return os.path.join(base, f"gmp-kernels-{source_tag()}")


@contextmanager
def keyed_cache():
    """Functions decorated with ``cache=True`` inside this block cache under :func:`cache_dir`."""
    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = cache_dir()
    try:
        yield numba.config.CACHE_DIR
    finally:
        numba.config.CACHE_DIR = previous
