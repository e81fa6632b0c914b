"""``--cluster sge``: Dask workers as Grid Engine batch jobs (dask_jobqueue.SGECluster)."""
from __future__ import annotations

from dask_jobqueue import SGECluster

from ._jobqueue import Scheduler

SCHEDULER = Scheduler("sge", SGECluster, "SGE", preflight_cmd=["qstat"],
                      install_hint="or load the site's Grid Engine settings")
