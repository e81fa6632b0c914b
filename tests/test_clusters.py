"""Cluster layer: job scripts (dry-run), a local cluster, and real SLURM worker jobs.

Tests marked ``slurm`` need a running SLURM (``.ci/slurm-up.sh``; ``.ci/test.sh`` starts it).
Under CI (``CI=true``) they fail when SLURM is missing; elsewhere they are skipped.
"""
from __future__ import annotations

import os
import subprocess
import time

import dask
import pytest

from gmp_pipeline.clusters import (ClusterError, job_script, prepare_workers, slurm_available,
                                   start_cluster)
from gmp_pipeline.clusters.config import parse_walltime, worker_lifetime

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inc(x):
    return x + 1


# --------------------------------------------------------------------------- dry-run scripts

def test_slurm_job_script_has_directives(tmp_path):
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(
        "jobqueue:\n"
        "  slurm:\n"
        "    account: chem123\n"
        "    queue: compute\n"
        "    cores: 4\n"
        "    processes: 2\n"
        "    memory: 16GiB\n"
        "    walltime: '02:00:00'\n"
        "    lifetime: 100m\n"
        "    lifetime-stagger: 5m\n"
        "    interface: ib0\n"
        "    job-extra-directives: ['--constraint=cpu']\n"
        "    local-directory: $TMPDIR\n"
    )
    text = job_script("slurm", cluster_config=str(cfg))
    lines = text.splitlines()
    assert lines[0].startswith("#!")
    for directive in ("#SBATCH -A chem123", "#SBATCH -p compute", "#SBATCH --cpus-per-task=4",
                      "#SBATCH --mem=16G", "#SBATCH -t 02:00:00",
                      "#SBATCH --constraint=cpu"):
        assert directive in lines, (directive, text)
    cmd = lines[-1]
    assert "--lifetime 6000s" in cmd and "--lifetime-stagger 300s" in cmd
    assert "--nworkers 2" in cmd and "--nthreads 2" in cmd
    assert "--interface ib0" in cmd
    assert "--local-directory $TMPDIR" in cmd


def test_pbs_job_script_has_directives():
    text = job_script("pbs", cluster_config={"pbs": {
        "account": "proj9", "queue": "workq", "cores": 8, "processes": 8,
        "memory": "64GB", "walltime": "04:00:00"}})
    lines = text.splitlines()
    assert "#PBS -A proj9" in lines and "#PBS -q workq" in lines
    assert "#PBS -l walltime=04:00:00" in lines
    select = [line for line in lines if line.startswith("#PBS -l select=")]
    # 64 GB = 59.6 GiB; PBS reads GB as GiB, so dask-jobqueue rounds up to a whole unit
    assert select == ["#PBS -l select=1:ncpus=8:mem=60GB"], text
    # automatic lifetime: 4 h walltime, stagger 5 min, margin 10 min -> 225 min
    assert "--lifetime 13500s --lifetime-stagger 300s" in lines[-1]


def test_shipped_cluster_configs_make_valid_scripts():
    for kind in ("slurm", "pbs", "sge", "lsf"):
        path = os.path.join(REPO, "cluster_configs", f"{kind}.yaml")
        text = job_script(kind, cluster_config=path)
        assert "distributed.cli.dask_worker" in text
        assert "--lifetime" in text, kind


def test_environment_variables_still_configure(monkeypatch):
    with dask.config.set({"jobqueue.slurm.account": "from-env-or-user-config"}):
        assert "#SBATCH -A from-env-or-user-config" in job_script("slurm")
    # a --cluster-config file wins over the ambient config
    with dask.config.set({"jobqueue.slurm.account": "ambient"}):
        text = job_script("slurm", cluster_config={"slurm": {"account": "file"}})
        assert "#SBATCH -A file" in text and "ambient" not in text


@pytest.mark.parametrize("cfg, message", [
    ({"slurm": {"acount": "x"}}, "unknown key"),
    ({"slurm": {"memory": "lots"}}, "memory"),
    ({"slurm": {"walltime": "00:10:00", "lifetime": "20m"}}, "before walltime"),
    ({"slurm": {"cores": 2, "processes": 4}}, "cores"),
])
def test_bad_settings_are_named(cfg, message):
    with pytest.raises(ClusterError, match=message):
        job_script("slurm", cluster_config=cfg)


def test_bad_spec_and_missing_file(tmp_path):
    with pytest.raises(ClusterError, match="neither"):
        job_script("kubernetes")
    with pytest.raises(ClusterError, match="does not exist"):
        job_script("slurm", cluster_config=str(tmp_path / "nope.yaml"))


def test_walltime_and_lifetime_rules():
    assert parse_walltime("01:00:00", "slurm") == 3600
    assert parse_walltime("30", "slurm") == 1800            # SLURM: bare number = minutes
    assert parse_walltime("10:30", "slurm") == 630          # SLURM: M:S
    assert parse_walltime("1-12", "slurm") == 36 * 3600
    assert parse_walltime("10:30", "pbs") == 630
    assert parse_walltime("02:30", "lsf") == 9000           # LSF: H:M
    life, stagger = worker_lifetime("00:10:00", "auto", "auto", "slurm")
    assert life + stagger < 600 and stagger > 0
    assert worker_lifetime("01:00:00", "off", "auto", "slurm") is None


def test_missing_sbatch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match="sbatch"):
        with start_cluster("slurm", quiet=True):
            pass


# --------------------------------------------------------------------------- local cluster

def test_local_cluster_two_processes(tmp_path):
    with dask.config.set({"gmp-pipeline.cluster.local.dashboard-address": ":0",
                          "gmp-pipeline.cluster.numba-cache-dir": str(tmp_path / "numba")}):
        with start_cluster("local", workers=2, quiet=True) as client:
            info = client.scheduler_info()["workers"]
            assert len(info) == 2
            assert all(w["nthreads"] == 1 for w in info.values())
            futures = client.map(_inc, range(20))
            assert client.gather(futures) == list(range(1, 21))
            pids = set(client.run(os.getpid).values())
            assert len(pids) == 2 and os.getpid() not in pids
            # each worker process has its own numba cache directory
            caches = client.run(lambda: os.environ.get("NUMBA_CACHE_DIR"))
            assert len(set(caches.values())) == 2
            assert all(c.startswith(str(tmp_path / "numba")) for c in caches.values())
            import numba  # noqa: F401

            dirs = client.run(lambda: __import__("numba").config.CACHE_DIR)
            assert dirs == caches
            # idempotent
            prepare_workers(client)
            assert client.run(lambda: os.environ.get("NUMBA_CACHE_DIR")) == caches


def test_connect_to_address():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        with start_cluster(cluster.scheduler_address, quiet=True) as client:
            assert client.submit(_inc, 41).result() == 42
    with pytest.raises(ClusterError, match="neither"):
        with start_cluster("not an address"):
            pass
