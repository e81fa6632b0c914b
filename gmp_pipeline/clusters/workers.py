"""Per-worker setup: each worker process gets its own numba cache directory (and malloc tuning).

Several worker processes writing one numba cache at once corrupt its index and crash workers
(numba issue 4807).  :class:`NumbaCachePlugin` runs in every worker process, current and
future (adaptive scaling, replaced jobs), before any task: it points ``NUMBA_CACHE_DIR`` and
``numba.config.CACHE_DIR`` at a sub-directory that no other live process uses.

Sub-directories are *slots* ``<base>/slot-<n>`` claimed with an exclusive ``flock`` held for the
worker's life, so a later run reuses the compiled kernels of an earlier one instead of
compiling again, while two live processes never share a slot.  Where the file system does not
support locks, the worker falls back to a private directory inside its local directory.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "gmp-pipeline-numba-cache"
QUIET_PLUGIN_NAME = "gmp-pipeline-quiet-task-logs"
MAX_SLOTS = 256

#: keys of the pipeline's tasks (pipeline.py submits them under these prefixes)
TASK_KEY_PREFIXES = ("gmp-task-", "gmp-assemble-", "gmp-count-")
#: functions the pipeline runs on every worker with ``client.run``
RUN_FUNCTIONS = {"warm_worker", "_where"}


class QuietTaskFailures(logging.Filter):
    """Drop distributed's ``Compute Failed`` / ``Run Failed`` log blocks for our own tasks
    (and the ``CancelledError`` warnings of our tasks cancelled when a run ends, and the
    heartbeat tracebacks of a worker whose scheduler went away as the run ended).

    Their exception reaches the driver, which prints it as one ``Error:`` line; the block with
    its traceback, printed by the worker before that, only buries it.  Other tasks' failures
    (on a shared scheduler) are still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if not isinstance(msg, str):
            return True
        if msg.startswith(("Failed to communicate with scheduler during heartbeat",
                           "Connection to scheduler broken")):
            # the scheduler went away under a worker of ours: the run ended (Ctrl-C, an error
            # the driver reports in one line); the nanny closes or reconnects the worker
            return False
        if msg.startswith("Async instruction for") and msg.endswith("with CancelledError"):
            # a task of ours cancelled because the run is ending (Ctrl-C, an error elsewhere)
            return not any(p in msg for p in TASK_KEY_PREFIXES)
        if not args or not isinstance(args, tuple):
            return True
        if msg.startswith("Compute Failed"):
            return not str(args[0]).startswith(TASK_KEY_PREFIXES)
        if msg.startswith("Run Failed"):
            return str(args[0]) not in RUN_FUNCTIONS
        return True


def quiet_task_failures() -> None:
    """Install :class:`QuietTaskFailures` on this process's distributed worker loggers."""
    for name in ("distributed.worker", "distributed.worker.state_machine"):
        log = logging.getLogger(name)
        if not any(isinstance(f, QuietTaskFailures) for f in log.filters):
            log.addFilter(QuietTaskFailures())


class QuietTaskFailuresPlugin(WorkerPlugin):
    """Runs :func:`quiet_task_failures` in every worker process (current and future)."""

    idempotent = True
    name = QUIET_PLUGIN_NAME

    def setup(self, worker):
        quiet_task_failures()


def default_cache_base() -> str:
    import dask

    base = dask.config.get("gmp-pipeline.cluster.numba-cache-dir", None)
    if base:
        return os.path.expanduser(os.path.expandvars(str(base)))
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".cache", "gmp-pipeline", "numba")


_M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int | None = None, trim_threshold: int | None = None) -> dict:
    """Set glibc's malloc thresholds of this process (None: leave that one as it is).

    Workers get the values of config ``gmp-pipeline.cluster.malloc`` (see NumbaCachePlugin).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins the mmap
    threshold at 128 KiB, so every large temporary array (the kernels' per-structure scratch
    and derivative blocks, Zarr's chunk buffers) is a fresh mmap, page-faulted and zeroed each
    time.  Raising both thresholds lets freed memory be reused.  Returns what was set
    (``{}`` where there is no glibc, e.g. macOS, or nothing is configured).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others without mallopt
        return {}
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = {}
    for name, param, value in (("mmap-threshold", _M_MMAP_THRESHOLD, mmap_threshold),
                               ("trim-threshold", _M_TRIM_THRESHOLD, trim_threshold)):
        if value is not None and mallopt(param, int(value)) == 1:
            done[name] = int(value)
    return done


def _set_numba_cache(path: str) -> None:
    os.environ["NUMBA_CACHE_DIR"] = path
    numba = sys.modules.get("numba")
    if numba is None:
        try:
            import numba  # noqa: F811
        except ImportError:  # pragma: no cover - numba is a dependency
            return
    numba.config.CACHE_DIR = path


class NumbaCachePlugin(WorkerPlugin):
    """Give the worker process its own numba cache directory (see module docstring)."""

    idempotent = True
    name = PLUGIN_NAME

    def __init__(self, base: str | None = None):
        # None: decided on the worker, so that the worker's own environment and home count
        self.base = base
        self._lock = None
        self.cache_dir = None
        # read where the run is configured (the driver), so a --cluster-config file counts on
        # batch-job workers, which do not share the driver's dask.config
        import dask

        self.malloc_config = dict(dask.config.get("gmp-pipeline.cluster.malloc", None) or {})
        self.malloc = {}

    def _claim_slot(self, base: Path):
        import fcntl

        host = socket.gethostname().split(".")[0] or "host"
        root = base / host      # node-local slots even when base is on a shared file system
        root.mkdir(parents=True, exist_ok=True)
        for n in range(MAX_SLOTS):
            slot = root / f"slot-{n}"
            fd = os.open(str(root / f"slot-{n}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except OSError:
                os.close(fd)
                return None     # no locking here (some network file systems)
            slot.mkdir(exist_ok=True)
            self._lock = fd
            return slot
        return None

    def setup(self, worker):
        path = None
        try:
            base = Path(self.base or default_cache_base())
            path = self._claim_slot(base)
        except OSError:
            path = None
        if path is None:
            path = Path(worker.local_directory) / "numba-cache"
            path.mkdir(parents=True, exist_ok=True)
        self.cache_dir = str(path)
        _set_numba_cache(self.cache_dir)
        if self.malloc_config:
            self.malloc = tune_malloc(self.malloc_config.get("mmap-threshold"),
                                      self.malloc_config.get("trim-threshold"))

    def teardown(self, worker):
        if self._lock is not None:
            try:
                os.close(self._lock)
            except OSError:
                pass
            self._lock = None


SIGINT_PLUGIN_NAME = "gmp-pipeline-ignore-sigint"


class IgnoreSigintPlugin(WorkerPlugin):
    """Worker processes of a local cluster ignore SIGINT: the driver handles Ctrl-C.

    A Ctrl-C in a terminal reaches every process of the foreground group; each worker process
    then died printing a ``KeyboardInterrupt`` traceback while the driver was already closing
    the cluster in order.
    """

    idempotent = True
    name = SIGINT_PLUGIN_NAME

    def setup(self, worker):
        import signal

        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the worker process's main thread (an in-process worker)
            pass


def prepare_workers(client, cache_dir: str | None = None, *, ignore_sigint: bool = False) -> dict:
    """Set up every worker of *client* (now and those that join later) for GMP tasks.

    Gives each worker process its own numba cache directory under *cache_dir* (default: config
    ``gmp-pipeline.cluster.numba-cache-dir``, else the worker's ``$NUMBA_CACHE_DIR``, else
    ``~/.cache/gmp-pipeline/numba``).  Distributed's ``Compute Failed`` / ``Run Failed``
    blocks of the pipeline's own tasks are dropped (:class:`QuietTaskFailures`; not with
    ``--debug``).  *ignore_sigint*: worker processes ignore SIGINT (only for processes this
    run started, see :class:`IgnoreSigintPlugin`).  Safe to call more than once.  Returns
    ``{worker address: cache directory}`` for the workers connected now.
    """
    if cache_dir is None:
        import dask

        cache_dir = dask.config.get("gmp-pipeline.cluster.numba-cache-dir", None)
    client.register_plugin(NumbaCachePlugin(cache_dir), name=PLUGIN_NAME)
    from .._signals import debug

    if not debug():
        quiet_task_failures()       # the driver too (threaded workers, client.run errors)
        client.register_plugin(QuietTaskFailuresPlugin(), name=QUIET_PLUGIN_NAME)
    if ignore_sigint:
        client.register_plugin(IgnoreSigintPlugin(), name=SIGINT_PLUGIN_NAME)

    def _where():
        return os.environ.get("NUMBA_CACHE_DIR")

    if not client.scheduler_info().get("workers"):
        return {}
    return client.run(_where, on_error="ignore")
