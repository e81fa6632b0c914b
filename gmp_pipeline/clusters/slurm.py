"""``--cluster slurm``: Dask workers as SLURM batch jobs (dask_jobqueue.SLURMCluster)."""
from __future__ import annotations

from dask_jobqueue import SLURMCluster

from ._jobqueue import Scheduler

SCHEDULER = Scheduler(
    "slurm", SLURMCluster, "SLURM",
    preflight_cmd=["sinfo", "--noheader", "--format=%P %a %D"],
    install_hint="or load the site's slurm module; for a test machine see .ci/slurm-up.sh",
    status_cmd=lambda ids: ["squeue", "-h", "-o", "%i %T reason=%r", "-j", ",".join(ids)],
    capacity_cmd=lambda queue: ["sinfo", "-h", "-o", "%c %m"] + (["-p", str(queue)] if queue else []),
)


def slurm_available(timeout: float = 15) -> tuple[bool, str]:
    """(True, partitions) when sbatch is on PATH and the SLURM controller answers ``sinfo``."""
    ok, reason = SCHEDULER.available(timeout=timeout)
    if ok and not any(" up " in f" {line} " for line in reason.splitlines()):
        return False, f"no SLURM partition is up: {reason!r}"
    return ok, reason
