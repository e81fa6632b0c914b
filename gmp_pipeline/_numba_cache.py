"""One numba cache per machine for the kernels, shared by every process, clone and run.

numba's own locators put a function's cache under ``NUMBA_CACHE_DIR`` or ``__pycache__`` in a
sub-directory named after a hash of the *source file's path*: every clone (and every Dask
worker slot with its own ``NUMBA_CACHE_DIR``) compiled the same kernels again.  Here a custom
locator, registered before any kernel is decorated, places the cache of every jitted function
defined in this package in one directory

    ``$GMP_PIPELINE_KERNEL_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/gmp-pipeline/kernels``
    ``/<tag>``,  tag = hash of the kernel sources, numba/llvmlite/Python versions and the CPU

whatever the clone path or ``NUMBA_CACHE_DIR``.  Keying on every kernel source also rules out
a stale driver: numba validates a cached function only against the file that defines it, and
the driver in ``_kernels.py`` calls the generated loops of ``_fused.py``.  Inside that
directory numba checks each file's contents (it hashes the source) and its index keys on the
signature and the CPU, so two clones of one version load each other's compiled code.

:func:`compile_lock` serialises the first compile across processes (``flock`` on a file in the
cache directory): the first process compiles and writes the cache, the others wait and then
load it instead of compiling the same kernels in parallel.  If the directory is not writable
the cache falls back to a per-user directory under the temporary directory.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numba
from numba.core import caching

HERE = Path(__file__).resolve().parent
KERNEL_SOURCES = ("_kernels.py", "_fused.py", "_numba_cache.py", "_harmonics.py")
ENV = "GMP_PIPELINE_KERNEL_CACHE"


def _cpu() -> str:
    import llvmlite.binding as ll

    name = numba.config.CPU_NAME or ll.get_host_cpu_name()
    feats = numba.config.CPU_FEATURES or ll.get_host_cpu_features().flatten()
    return f"{name}|{feats}"


@lru_cache(maxsize=None)
def source_tag() -> str:
    """Hash of the kernel sources, numba, llvmlite and Python versions and the host CPU."""
    import llvmlite

    h = hashlib.sha256()
    for name in KERNEL_SOURCES:
        h.update(name.encode())
        h.update((HERE / name).read_bytes())
    h.update(f"numba {numba.__version__} llvmlite {llvmlite.__version__} "
             f"python {sys.version_info[:3]} {_cpu()}".encode())
    return h.hexdigest()[:16]


def cache_base() -> str:
    env = os.environ.get(ENV)
    if env:
        return os.path.expanduser(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "gmp-pipeline", "kernels")


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


@lru_cache(maxsize=None)
def cache_dir() -> str:
    """The kernels' cache directory on this machine (created)."""
    path = os.path.join(cache_base(), source_tag())
    if not _writable(path):
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        path = os.path.join(tempfile.gettempdir(), f"gmp-pipeline-kernels-{uid}", source_tag())
        os.makedirs(path, exist_ok=True)
    return path


class KernelCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba cache locator for functions defined in this package: :func:`cache_dir`."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno

    def get_cache_path(self):
        return cache_dir()

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            if Path(py_file).resolve().parent != HERE:
                return None
        except OSError:
            return None
        return super().from_function(py_func, py_file)


def register() -> None:
    """Put :class:`KernelCacheLocator` first in numba's locator list (idempotent)."""
    classes = caching.CacheImpl._locator_classes
    if KernelCacheLocator not in classes:
        classes.insert(0, KernelCacheLocator)


register()


@contextmanager
def compile_lock():
    """Exclusive lock on ``<cache_dir>/compile.lock`` while held (no-op where there is no flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(os.path.join(cache_dir(), "compile.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # file systems without locks
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
