"""``--cluster local``: worker processes on this machine."""
from __future__ import annotations

import socket
import warnings

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
    dashboard = dashboard_address(
        dask.config.get("gmp-pipeline.cluster.local.dashboard-address", "127.0.0.1:8787"))
    memory_limit = dask.config.get("gmp-pipeline.cluster.local.memory-limit", "auto")
    try:
        with warnings.catch_warnings():
            # the port was free a moment ago; if another process took it since, distributed
            # picks another one itself, with a UserWarning the user cannot act on
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            return LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=dashboard,
                memory_limit=memory_limit,
                local_directory=local_directory,
            )
    except Exception as exc:  # noqa: BLE001 - report any start-up failure the same way
        raise ClusterError(f"could not start a local Dask cluster with {workers} worker "
                           f"processes: {type(exc).__name__}: {exc}") from exc


def dashboard_address(configured) -> str | None:
    """The dashboard address to use for *configured* (``"host:port"``, ``":port"``, or empty).

    The host defaults to 127.0.0.1 (loopback: the dashboard has no authentication, and on a
    shared machine or a login node it should not be visible to others; reach it with
    ``ssh -L 8787:127.0.0.1:8787 host``).  When the port is taken (a second run, another Dask)
    a free one is chosen instead of letting distributed warn about it.  Empty, null or false:
    no dashboard (None).
    """
    if configured in (None, "", False) or str(configured).lower() in ("none", "null", "off"):
        return None
    text = str(configured).strip()
    for scheme in ("http://", "https://", "tcp://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    host, sep, port = text.rpartition(":")
    if not sep:             # a bare port
        host, port = "127.0.0.1", text
    host = host.strip("[]")  # "" (from ":8787"): all interfaces, as distributed reads it
    try:
        port_n = int(port)
    except ValueError:
        raise ClusterError(f"dashboard address {configured!r} is not HOST:PORT "
                           f"(e.g. 127.0.0.1:8787)") from None
    if port_n and not port_free(host, port_n):
        port_n = 0
    return f"{host}:{port_n}"


def port_free(host: str, port: int) -> bool:
    """Whether a TCP server could listen on *host*:*port* now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "" if host in ("", "0.0.0.0", "::", "*") else host
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((bind_host, port))
        except OSError:
            return False
    # a server on all interfaces also takes the port for loopback, and the reverse
    if bind_host:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
    return True
