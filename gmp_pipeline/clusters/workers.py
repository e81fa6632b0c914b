"""Per-worker setup: malloc tuning, quiet logs of the pipeline's own tasks, SIGINT.

:class:`WorkerSetupPlugin` runs in every worker process, current and future (adaptive scaling,
replaced jobs), before any task.  Worker processes used to get a numba cache directory each
(a ``NUMBA_CACHE_DIR`` slot): the kernels now keep one cache per machine whatever
``NUMBA_CACHE_DIR`` says, with a lock around the first compile (:mod:`gmp_pipeline._numba_cache`),
so the slots went.
"""
from __future__ import annotations

import logging
import sys

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "gmp-pipeline-worker-setup"
QUIET_PLUGIN_NAME = "gmp-pipeline-quiet-task-logs"

#: keys of the pipeline's tasks (pipeline.py submits them under these prefixes)
TASK_KEY_PREFIXES = ("gmp-task-", "gmp-assemble-", "gmp-count-")
#: functions the pipeline runs on every worker with ``client.run``
RUN_FUNCTIONS = {"warm_worker", "_applied"}


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


class QuietNannyKill(logging.Filter):
    """Drop the nanny's ``Worker process still alive after 4.0 seconds, killing``.

    A worker process that takes more than 4 s to exit when its cluster closes (a loaded
    machine; a worker that still frees a large heap) is killed by its nanny, which says so at
    WARNING.  Nothing is lost (the run is over: every result is on disk) and the user can do
    nothing about it; seen at the end of a CLI run on the full QM9, printed after the run's own
    summary because the nanny finishes closing after the muted shutdown of
    :func:`~gmp_pipeline.clusters.start_cluster`.  A worker killed for its memory is still
    reported (another message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage() if record.args else str(record.msg)
        return not (msg.startswith("Worker process still alive after")
                    and msg.endswith("killing"))


def quiet_nanny_kill() -> None:
    """Install :class:`QuietNannyKill` on this process's ``distributed.nanny`` logger (where a
    local or batch cluster's nannies log: the driver for ``local``, each job for batch)."""
    log = logging.getLogger("distributed.nanny")
    if not any(isinstance(f, QuietNannyKill) for f in log.filters):
        log.addFilter(QuietNannyKill())


class QuietTaskFailuresPlugin(WorkerPlugin):
    """Runs :func:`quiet_task_failures` in every worker process (current and future)."""

    idempotent = True
    name = QUIET_PLUGIN_NAME

    def setup(self, worker):
        quiet_task_failures()


_M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int | None = None, trim_threshold: int | None = None) -> dict:
    """Set glibc's malloc thresholds of this process (None: leave that one as it is).

    Workers get the values of config ``gmp-pipeline.cluster.malloc`` (see WorkerSetupPlugin).

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


class WorkerSetupPlugin(WorkerPlugin):
    """Tune malloc in every worker process (config ``gmp-pipeline.cluster.malloc``, read where
    the run is configured, see :func:`tune_malloc`)."""

    idempotent = True
    name = PLUGIN_NAME

    def __init__(self):
        # read where the run is configured (the driver), so a --cluster-config file counts on
        # batch-job workers, which do not share the driver's dask.config
        import dask

        self.malloc_config = dict(dask.config.get("gmp-pipeline.cluster.malloc", None) or {})
        self.malloc = {}

    def setup(self, worker):
        if self.malloc_config:
            self.malloc = tune_malloc(self.malloc_config.get("mmap-threshold"),
                                      self.malloc_config.get("trim-threshold"))


#: the former name (it also gave each worker a numba cache directory)
NumbaCachePlugin = WorkerSetupPlugin


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

    malloc is tuned (:class:`WorkerSetupPlugin`); distributed's ``Compute Failed`` /
    ``Run Failed`` blocks of the pipeline's own tasks are dropped (:class:`QuietTaskFailures`;
    not with ``--debug``).  *ignore_sigint*: worker processes ignore SIGINT (only for
    processes this run started, see :class:`IgnoreSigintPlugin`).  *cache_dir* is ignored (it
    set the per-worker numba cache directories of earlier versions).  Safe to call more than
    once.  Returns ``{worker address: malloc settings applied}`` for the workers connected now.
    """
    client.register_plugin(WorkerSetupPlugin(), name=PLUGIN_NAME)
    from .._signals import debug

    if not debug():
        quiet_task_failures()       # the driver too (threaded workers, client.run errors)
        client.register_plugin(QuietTaskFailuresPlugin(), name=QUIET_PLUGIN_NAME)
    if ignore_sigint:
        client.register_plugin(IgnoreSigintPlugin(), name=SIGINT_PLUGIN_NAME)

    def _applied(dask_worker):
        plugin = dask_worker.plugins.get(PLUGIN_NAME)
        return getattr(plugin, "malloc", {})

    if not client.scheduler_info().get("workers"):
        return {}
    return client.run(_applied, on_error="ignore")
