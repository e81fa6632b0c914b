"""``--cluster pbs``: Dask workers as PBS / Torque batch jobs (dask_jobqueue.PBSCluster)."""
from __future__ import annotations

from dask_jobqueue import PBSCluster

from ._jobqueue import Scheduler

SCHEDULER = Scheduler(
    "pbs", PBSCluster, "PBS",
    preflight_cmd=["qstat", "-B"],
    install_hint="or load the site's PBS module",
    status_cmd=lambda ids: ["qstat", *ids],
)

