"""``--cluster local``: worker processes on this machine."""
from __future__ import annotations

import dask
from dask.system import CPU_COUNT

from ..errors import ClusterError


def make_local_cluster(workers: int | None = None, local_directory: str | None = None):
    """A :class:`distributed.LocalCluster` with *workers* single-threaded worker processes.

    *workers* defaults to the number of cores available to this process (cgroup and affinity
    limits included).  Worker processes rather than threads: the GMP kernels hold the GIL
    between numba calls and each process needs its own numba cache (see ``prepare_workers``).
    """
    from distributed import LocalCluster

    if workers is None:
        workers = CPU_COUNT
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ClusterError(f"workers must be a positive integer, got {workers!r}")
    dashboard = dask.config.get("gmp-pipeline.cluster.local.dashboard-address", ":8787")
    memory_limit = dask.config.get("gmp-pipeline.cluster.local.memory-limit", "auto")
    try:
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard or None,
            memory_limit=memory_limit,
            local_directory=local_directory,
        )
    except Exception as exc:  # noqa: BLE001 - report any start-up failure the same way
        raise ClusterError(f"could not start a local Dask cluster with {workers} worker "
                           f"processes: {type(exc).__name__}: {exc}") from exc
