"""Fixtures shared by the test modules (pytest finds them here; nothing to import)."""
from __future__ import annotations

import pytest

from helpers import kernel_cache_dir


@pytest.fixture(scope="module")
def dask_address():
    """Address of a real multi-process LocalCluster (2 single-threaded worker processes),
    shared by the tests of one module; closed at the end of the module."""
    import dask

    from gmp_pipeline.clusters import start_cluster

    with dask.config.set({"gmp-pipeline.cluster.numba-cache-dir": kernel_cache_dir()}):
        with start_cluster("local", workers=2, quiet=True) as client:
            yield client.scheduler.address
