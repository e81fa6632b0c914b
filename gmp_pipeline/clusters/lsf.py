"""``--cluster lsf``: Dask workers as LSF batch jobs (dask_jobqueue.LSFCluster)."""
from __future__ import annotations

from dask_jobqueue import LSFCluster

from ._jobqueue import Scheduler

SCHEDULER = Scheduler("lsf", LSFCluster, "LSF", preflight_cmd=["bqueues"],
                      install_hint="or source the site's LSF profile")
