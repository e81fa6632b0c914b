"""Dask clusters for gmp-pipeline: ``local``, batch schedulers, or an existing scheduler.

>>> from gmp_pipeline.clusters import start_cluster, job_script
>>> with start_cluster("local", workers=2) as client:       # doctest: +SKIP
...     client.submit(sum, [1, 2]).result()

``spec`` is ``"local"``, ``"slurm"``, ``"pbs"``, ``"sge"``, ``"lsf"`` or the address of a
running Dask scheduler (``tcp://host:8786``).  Batch clusters are dask-jobqueue clusters
configured through dask.config (see :mod:`gmp_pipeline.clusters.config` for the priority of
config sources and ``cluster_configs/`` in the repository for documented example files).
"""
from __future__ import annotations

import contextlib
import logging
import re

import dask

from ..errors import ClusterError
from . import config as _config  # noqa: F401  (loads gmp-pipeline.yaml into dask.config)
from .config import flatten, load_cluster_config, normalize_cluster_config
from .slurm import slurm_available
from .workers import NumbaCachePlugin, WorkerSetupPlugin, prepare_workers, quiet_nanny_kill

logger = logging.getLogger("gmp_pipeline.clusters")

__all__ = ["ClusterError", "KINDS", "NumbaCachePlugin", "WorkerSetupPlugin", "check_spec",
           "job_script",
           "prepare_workers", "scheduler_for", "slurm_available", "start_cluster"]

KINDS = ("local", "slurm", "pbs", "sge", "lsf")
_ADDRESS = re.compile(r"^([a-z0-9+]+://)?[^\s/:]+:\d+/?$|^[a-z0-9+]+://\S+$", re.IGNORECASE)


def scheduler_for(kind: str):
    """The :class:`~gmp_pipeline.clusters._jobqueue.Scheduler` of a batch-system name."""
    kind = kind.lower()
    if kind == "slurm":
        from .slurm import SCHEDULER
    elif kind == "pbs":
        from .pbs import SCHEDULER
    elif kind == "sge":
        from .sge import SCHEDULER
    elif kind == "lsf":
        from .lsf import SCHEDULER
    else:
        raise ClusterError(f"{kind!r} is not a batch scheduler; choose one of slurm, pbs, sge, lsf")
    return SCHEDULER


def _classify(spec) -> tuple[str, str]:
    """('local'|'slurm'|...|'address', value)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ClusterError(f"cluster must be one of {', '.join(KINDS)} or a scheduler address "
                           f"like tcp://127.0.0.1:8786, got {spec!r}")
    text = spec.strip()
    if text.lower() in KINDS:
        return text.lower(), text.lower()
    if _ADDRESS.match(text):
        return "address", text
    raise ClusterError(f"cluster {spec!r} is neither one of {', '.join(KINDS)} nor a scheduler "
                       f"address like tcp://127.0.0.1:8786")


def _overlay(cluster_config) -> dict:
    if cluster_config is None:
        return {}
    if isinstance(cluster_config, dict):
        return flatten(normalize_cluster_config(cluster_config))
    return flatten(load_cluster_config(cluster_config))


def job_script(spec: str, cluster_config=None, *, workers=None, local_directory=None,
               interface=None) -> str:
    """The batch job script that ``start_cluster(spec, ...)`` would submit (for ``--dry-run``).

    Needs neither the scheduler's commands nor a network: the scheduler address in the script
    is a placeholder.
    """
    kind, _ = _classify(spec)
    if kind in ("local", "address"):
        raise ClusterError(f"--dry-run prints a batch job script; cluster {spec!r} submits no "
                           f"jobs (use slurm, pbs, sge or lsf)")
    with dask.config.set(_overlay(cluster_config)):
        return scheduler_for(kind).job_script(workers=workers, local_directory=local_directory,
                                              interface=interface)


@contextlib.contextmanager
def start_cluster(spec: str, *, workers: int | None = None, cluster_config=None,
                  min_jobs: int | None = None, max_jobs: int | None = None,
                  local_directory=None, interface: str | None = None, quiet: bool = False,
                  prepare: bool = True, log_directory=None, tls: bool | None = None):
    """Start (or connect to) a Dask cluster and yield a :class:`distributed.Client` for it.

    local
        ``LocalCluster`` with *workers* single-threaded worker processes (default: one per core).
    slurm, pbs, sge, lsf
        dask-jobqueue cluster from dask.config, overlaid with the YAML file *cluster_config*
        (path or dict); adaptive between *min_jobs* (default 1) and *max_jobs* (default
        ``gmp-pipeline.cluster.jobqueue.max-jobs``) jobs, so lost workers are replaced.
        *workers*, if given, is the number of worker processes per job.  *interface* overrides
        ``jobqueue.<kind>.interface`` (network interface of scheduler and workers).
        *log_directory*: the jobs' output files (unless ``jobqueue.<kind>.log-directory`` is
        set).  *tls* (default config ``gmp-pipeline.cluster.jobqueue.tls``, true): TLS with
        credentials made for this run, so that nobody else can connect to the scheduler.
    address (``tcp://host:port``)
        Connects to a running scheduler; *workers* and the job options are ignored.

    Everything started here is closed on exit (batch jobs are cancelled).  With *prepare*
    (default) :func:`prepare_workers` is applied.  Raises :class:`ClusterError`.
    """
    kind, value = _classify(spec)
    from distributed import Client

    from .._signals import debug

    if not debug():
        quiet_nanny_kill()

    with contextlib.ExitStack() as stack:
        # closing a cluster logs what the user cannot act on ("Worker process still alive
        # after 4.0 seconds, killing", CancelledErrors of tasks in flight): muted from the end
        # of the run (_quiet_close, entered last) until everything is closed (this, first)
        stack.callback(_quiet_close_done)
        stack.enter_context(dask.config.set(_overlay(cluster_config)))
        if kind == "address":
            timeout = dask.config.get("distributed.comm.timeouts.connect", "30s")
            try:
                client = Client(value, timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"cannot reach the Dask scheduler at {value}: {exc}") from exc
            stack.callback(client.close)
            if not quiet:
                logger.info("gmp-pipeline: connected to Dask scheduler %s, dashboard %s", value,
                            client.dashboard_link)
        else:
            if kind == "local":
                from .local import make_local_cluster

                cluster = make_local_cluster(workers, local_directory=local_directory)
                if not quiet:
                    logger.info("gmp-pipeline: local Dask cluster, %d worker processes, "
                                "dashboard %s", len(cluster.workers), cluster.dashboard_link)
            else:
                cluster = scheduler_for(kind).make_cluster(
                    min_jobs=min_jobs, max_jobs=max_jobs, quiet=quiet, workers=workers,
                    local_directory=local_directory, interface=interface,
                    log_directory=log_directory, tls=tls)
            cleanup = getattr(cluster, "_gmp_cleanup", None)
            if cleanup is not None:
                stack.callback(cleanup)
            stack.callback(cluster.close)
            watchdog = getattr(cluster, "_gmp_watchdog", None)
            if watchdog is not None:
                stack.callback(watchdog.stop)
                stack.enter_context(_watchdog_reason(watchdog))
            try:
                client = Client(cluster)
            except Exception as exc:  # noqa: BLE001
                raise ClusterError(f"could not connect to the {kind} cluster: {exc}") from exc
            stack.callback(client.close)
        if prepare:
            prepare_workers(client, ignore_sigint=kind == "local")
        stack.enter_context(_quiet_close())
        yield client


def check_spec(spec) -> str:
    """Raise :class:`ClusterError` now for a *spec* that :func:`start_cluster` would refuse.

    Lets the CLI refuse ``--cluster bogus`` before it opens the source or starts anything.
    Returns the kind (``local``, ``slurm``, ... or ``address``).
    """
    return _classify(spec)[0]


_CLOSING = {"depth": 0}


@contextlib.contextmanager
def _quiet_close():
    """Nothing while the run goes on; on the way out, distributed's shutdown chatter is muted
    (unless ``--debug``) while the cluster closes."""
    try:
        yield
    finally:
        _CLOSING["depth"] += 1
        _mute(True)


def _quiet_close_done():
    _CLOSING["depth"] -= 1
    if _CLOSING["depth"] <= 0:
        _CLOSING["depth"] = 0
        _mute(False)


_MUTED: dict = {}


def _mute(on: bool) -> None:
    import logging

    from .._signals import debug

    if debug():
        return
    names = ("distributed.nanny", "distributed.worker", "distributed.core",
             "distributed.scheduler", "distributed.batched", "distributed.client",
             "distributed.deploy", "distributed.comm", "tornado.application", "asyncio")
    if on:
        for name in names:
            log = logging.getLogger(name)
            _MUTED.setdefault(name, log.level)
            log.setLevel(logging.CRITICAL + 1)
    else:
        for name, level in list(_MUTED.items()):
            logging.getLogger(name).setLevel(level)
        _MUTED.clear()


@contextlib.contextmanager
def _watchdog_reason(watchdog):
    """Turn the watchdog's interrupt ("no job could be submitted") into a ClusterError."""
    try:
        yield
    except KeyboardInterrupt:
        if watchdog.gave_up:
            raise ClusterError(watchdog.gave_up) from None
        raise
