"""Cluster layer: job scripts (dry-run), a local cluster, and real SLURM worker jobs.

Tests marked ``slurm`` need a running SLURM (``.ci/slurm-up.sh``; ``.ci/test.sh`` starts it).
Under CI (``CI=true``) they fail when SLURM is missing; elsewhere they are skipped.
"""
from __future__ import annotations

import os
import sys
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
            # malloc thresholds that keep freed memory for reuse (Linux/glibc)
            if sys.platform.startswith("linux"):
                from gmp_pipeline.clusters.workers import PLUGIN_NAME

                set_ = client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].malloc)
                assert all(v == {"mmap-threshold": 32 << 20, "trim-threshold": 256 << 20}
                           for v in set_.values()), set_
                # idempotent, and reports what it applied
                assert prepare_workers(client) == set_
            # no per-worker numba cache directory any more: the kernels keep one per machine
            assert set(client.run(lambda: os.environ.get("NUMBA_CACHE_DIR")).values()) == {
                os.environ.get("NUMBA_CACHE_DIR")}
    assert not (tmp_path / "numba").exists()


def test_nanny_kill_warning_at_shutdown_is_not_shown(caplog):
    import logging

    with start_cluster("local", workers=1, quiet=True) as client:
        client.submit(_inc, 1).result()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distributed.nanny"):
        nanny = logging.getLogger("distributed.nanny")
        nanny.warning("Worker process still alive after 4.0 seconds, killing")
        nanny.warning("Worker process still alive after %.1f seconds, killing", 3.2)
        nanny.warning("Worker exceeded 95% memory budget. Restarting...")
    assert [r.getMessage() for r in caplog.records if r.name == "distributed.nanny"] == [
        "Worker exceeded 95% memory budget. Restarting..."]


def test_connect_to_address():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster:
        with start_cluster(cluster.scheduler_address, quiet=True) as client:
            assert client.submit(_inc, 41).result() == 42
    with pytest.raises(ClusterError, match="neither"):
        with start_cluster("not an address"):
            pass


# --------------------------------------------------------------------------- real SLURM

@pytest.fixture(scope="module")
def slurm():
    """A usable SLURM, else: fail under CI (it must be there), skip elsewhere."""
    ok, reason = slurm_available()
    if not ok:
        if IN_CI:
            pytest.fail(f"CI=true but SLURM is not usable ({reason}); .ci/test.sh starts it "
                        f"with .ci/slurm-up.sh")
        pytest.skip(f"SLURM not available: {reason} (start one with .ci/slurm-up.sh as root)")
    return reason


@pytest.fixture(scope="module")
def shared_numba(tmp_path_factory):
    """One numba cache base for the CLI runs on SLURM, so the second reuses compiled kernels."""
    return tmp_path_factory.mktemp("numba-shared")


def _slurm_config(tmp_path, numba_dir=None, **overrides):
    section = {"cores": 1, "processes": 1, "memory": "1GiB", "walltime": "00:10:00",
               "interface": "lo", "log-directory": str(tmp_path / "slurm-logs"),
               "death-timeout": 30, "scheduler-options": {"dashboard_address": ":0"},
               # tasks below are functions of this module: let the job's workers import it
               # (prepended: the driver's PYTHONPATH, which sbatch passes on, names the
               # gmp_pipeline under test)
               "job-script-prologue": [f"export PYTHONPATH={os.path.dirname(__file__)}"
                                       "${PYTHONPATH:+:$PYTHONPATH}"]}
    section.update(overrides)
    return {"jobqueue": {"slurm": section},
            # replace a killed worker's job after 2 s instead of dask's default 15 s
            "distributed": {"deploy": {"lost-worker-timeout": "2s"}},
            "gmp-pipeline": {"cluster": {"numba-cache-dir": str(numba_dir or tmp_path / "numba")}}}


def _job_ids(client):
    return client.run(lambda: os.environ.get("SLURM_JOB_ID"), on_error="ignore")


def _slow_square(x):
    time.sleep(0.1)
    return x * x


@pytest.mark.slurm
def test_slurm_worker_job_runs_tasks(slurm, tmp_path):
    t0 = time.monotonic()
    with start_cluster("slurm", cluster_config=_slurm_config(tmp_path), min_jobs=1, max_jobs=1,
                       quiet=True) as client:
        client.wait_for_workers(1, timeout=120)
        ready = time.monotonic() - t0
        assert client.submit(_inc, 1).result(timeout=60) == 2
        ids = _job_ids(client)
        assert len(ids) == 1 and all(j and j.isdigit() for j in ids.values())
        job = next(iter(ids.values()))
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
        assert state == "RUNNING"
    print(f"first SLURM worker ready after {ready:.1f} s")
    # closing the cluster cancels its jobs
    for _ in range(50):
        left = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        if left in ("", "COMPLETING", "CANCELLED"):
            break
        time.sleep(0.2)
    assert left in ("", "COMPLETING", "CANCELLED"), left


@pytest.mark.slurm
def test_slurm_lost_worker_job_is_replaced(slurm, tmp_path):
    n = 300
    with start_cluster("slurm", cluster_config=_slurm_config(tmp_path), min_jobs=2, max_jobs=2,
                       quiet=True) as client:
        client.wait_for_workers(2, timeout=120)
        before = _job_ids(client)
        assert len(set(before.values())) == 2
        futures = client.map(_slow_square, range(n))
        # let work start, then kill one worker job as a node failure or preemption would
        deadline = time.monotonic() + 60
        while sum(f.done() for f in futures) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(f.done() for f in futures) < n, "tasks finished before the kill"
        victim = sorted(before.values())[0]
        subprocess.run(["scancel", victim], check=True, timeout=30)
        t_kill = time.monotonic()
        # adaptive scaling submits a new job for the lost worker while the work goes on
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            after = set(_job_ids(client).values())
            if len(after) == 2 and victim not in after:
                break
            time.sleep(0.2)
        replaced = time.monotonic() - t_kill
        assert victim not in after and len(after - set(before.values())) == 1, (before, after)
        results = client.gather(futures)
        assert results == [x * x for x in range(n)]
        print(f"killed worker job {victim} replaced by a new worker after {replaced:.1f} s")


def _square_where(x):
    time.sleep(0.1)
    return x * x, os.environ.get("SLURM_JOB_ID")


@pytest.mark.slurm
def test_slurm_workers_retire_at_lifetime_and_are_replaced(slurm, tmp_path):
    """Workers leave at --lifetime (as they must before their walltime); new jobs take over.

    Results are collected as they complete, as the pipeline does: a retiring worker's memory
    is not needed afterwards.
    """
    from distributed import as_completed

    cfg = _slurm_config(tmp_path, lifetime="8s", **{"lifetime-stagger": "2s"})
    n = 250
    t0 = time.monotonic()
    with start_cluster("slurm", cluster_config=cfg, min_jobs=2, max_jobs=2,
                       quiet=True) as client:
        futures = client.map(_square_where, range(n))
        index = {f.key: i for i, f in enumerate(futures)}
        results = [None] * n
        for future in as_completed(futures, timeout=180):
            results[index[future.key]] = future.result()
            future.release()
    assert [r[0] for r in results] == [x * x for x in range(n)]
    jobs = {r[1] for r in results}
    assert len(jobs) >= 3, (f"all {n} tasks ran in jobs {jobs} in {time.monotonic() - t0:.0f} s: "
                            f"no worker retired")


@pytest.mark.slurm
def test_cli_featurize_on_slurm_then_verify(slurm, tmp_path, shared_numba):
    """The command a user runs on a login node, end to end, on real SLURM worker jobs."""
    import sys

    import yaml

    sample = os.path.join(REPO, "tests", "data", "samples", "oc20_lmdb", "pyg2_is2re_style")
    if not os.path.exists(sample):
        pytest.skip(f"OC20 sample {sample} not in this checkout")
    cfg = tmp_path / "slurm.yaml"
    full = _slurm_config(tmp_path, numba_dir=shared_numba, memory="2GiB")
    full["jobqueue"]["slurm"].pop("job-script-prologue")  # the CLI's tasks import everywhere
    cfg.write_text(yaml.safe_dump(full))
    out = tmp_path / "out.zarr"
    cli = [sys.executable, "-m", "gmp_pipeline.cli"]
    run = subprocess.run(cli + ["featurize", "ocp", sample, "-o", str(out), "--cluster", "slurm",
                                "--cluster-config", str(cfg), "--max-jobs", "2"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    check = subprocess.run(cli + ["verify", str(out)], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert check.returncode == 0 and "OK" in check.stdout, (check.stdout, check.stderr[-3000:])
    left = subprocess.run(["squeue", "-h", "-n", "gmp-worker", "-t", "RUNNING,PENDING"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    assert left == "", f"worker jobs left behind: {left}"


@pytest.mark.slurm
def test_cli_featurize_survives_a_killed_worker_job(slurm, tmp_path, shared_numba):
    """`featurize --cluster slurm` while one worker job is scancelled mid-run (a lost node or
    preemption): adaptive scaling replaces it, the run completes and `verify` accepts the store."""
    import sys

    import yaml

    from gmp_pipeline.store.writer import finished_tasks, load_plan

    source = os.path.join(REPO, "benchmarks", "data", "oc20_like_200.extxyz")
    cfg = _slurm_config(tmp_path, numba_dir=shared_numba, memory="2GiB")
    cfg["jobqueue"]["slurm"].pop("job-script-prologue")
    cfg_file = tmp_path / "slurm.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    # enough work per task that the run is still going when the job is killed
    feats = tmp_path / "features.yaml"
    feats.write_text(yaml.safe_dump({"orders": [-1, 0, 1, 2, 3, 4],
                                     "sigmas": [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6],
                                     "psp": "QE-kjpaw", "overlap_threshold": 1e-16}))
    out = tmp_path / "out.zarr"
    cli = [sys.executable, "-m", "gmp_pipeline.cli"]
    proc = subprocess.Popen(cli + ["featurize", "ase", source, "-o", str(out), "--features",
                                   str(feats), "--cluster", "slurm", "--cluster-config",
                                   str(cfg_file), "--min-jobs", "2", "--max-jobs", "2",
                                   "--chunk-size", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if len(finished_tasks(out)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before a worker could be killed"
        n_tasks = len(load_plan(out)["tasks"])
        done_at_kill = len(finished_tasks(out))
        assert done_at_kill < n_tasks
        jobs = subprocess.run(["squeue", "-h", "-n", "gmp-worker", "-t", "RUNNING", "-o", "%i"],
                              capture_output=True, text=True, timeout=30).stdout.split()
        assert jobs, "no running worker job to kill"
        subprocess.run(["scancel", sorted(jobs)[0]], check=True, timeout=30)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert f"tasks: {n_tasks} planned" in stdout, stdout
    check = subprocess.run(cli + ["verify", str(out), "--sample", "5"], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert check.returncode == 0 and "OK" in check.stdout, (check.stdout, check.stderr[-3000:])
    inspect = subprocess.run(cli + ["inspect", str(out)], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert "complete:    yes" in inspect.stdout, inspect.stdout
    left = subprocess.run(["squeue", "-h", "-n", "gmp-worker", "-t", "RUNNING,PENDING"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    assert left == "", f"worker jobs left behind: {left}"
    print(f"killed job {sorted(jobs)[0]} after {done_at_kill}/{n_tasks} tasks; run completed")


# --------------------------------------------------------------------------- issue 12

def test_dashboard_address_loopback_and_a_free_port_when_taken():
    import socket

    from gmp_pipeline.clusters.local import dashboard_address

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        taken = sock.getsockname()[1]
        assert dashboard_address(f"127.0.0.1:{taken}") == "127.0.0.1:0"
        assert dashboard_address(f"{taken}") == "127.0.0.1:0"       # a bare port: loopback
    assert dashboard_address(":0") == ":0"                            # all interfaces, if asked
    assert dashboard_address("") is None and dashboard_address(None) is None
    with pytest.raises(ClusterError, match="HOST:PORT"):
        dashboard_address("127.0.0.1:http")


def test_local_cluster_dashboard_listens_on_loopback_only(tmp_path):
    with dask.config.set({"gmp-pipeline.cluster.numba-cache-dir": str(tmp_path / "numba")}):
        with start_cluster("local", workers=1, quiet=True) as client:
            link = client.dashboard_link
            assert link.startswith("http://127.0.0.1:"), link
            assert client.scheduler.address.startswith("tcp://127.0.0.1:")
            # the socket itself, not just the link: bound to loopback, not 0.0.0.0 / ::
            import psutil

            port = int(link.split(":")[2].split("/")[0])
            listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
            assert listening == {"127.0.0.1"}, listening


def test_featurize_help_lists_every_batch_scheduler():
    from click.testing import CliRunner

    from gmp_pipeline.cli import main

    text = " ".join(CliRunner().invoke(main, ["featurize", "--help"]).output.split())
    for kind in ("local", "slurm", "pbs", "sge", "lsf"):
        assert kind in text, kind


def test_bogus_cluster_is_refused_before_anything_starts(tmp_path):
    """`--cluster bogus` fails at once: no source opened (a missing one is not even noticed),
    no worker started, no store written."""
    out = subprocess.run([sys.executable, "-m", "gmp_pipeline.cli", "featurize", "qm9",
                          str(tmp_path / "missing"), "-o", str(tmp_path / "o.zarr"),
                          "--cluster", "bogus"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    assert out.stderr.startswith("Error: cluster 'bogus' is neither"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "o.zarr").exists()


def _no_security_client_fails(address):
    """A distributed.Client without this run's credentials, by TLS and by plain tcp."""
    from distributed import Client

    import gc

    failures = []
    for addr in (address, address.replace("tls://", "tcp://")):
        try:
            c = Client(addr, timeout=5)
        except Exception as exc:  # noqa: BLE001 - any refusal will do
            failures.append(f"{addr}: {type(exc).__name__}")
        else:
            c.close()
            pytest.fail(f"a client without credentials connected to {addr}")
        # collect the failed Client here: collected later, inside the start of the next
        # Client's loop thread, its __del__ waits for the lock that start holds (a deadlock
        # seen in CI: Thread.start never returned)
        gc.collect()
    # ... and one with other temporary credentials (another user's) fails too
    from distributed.security import Security

    try:
        c = Client(address, timeout=5, security=Security.temporary())
    except Exception as exc:  # noqa: BLE001
        failures.append(f"other credentials: {type(exc).__name__}")
    else:
        c.close()
        pytest.fail(f"a client with other credentials connected to {address}")
    gc.collect()
    return failures


@pytest.mark.slurm
def test_slurm_scheduler_refuses_clients_without_the_runs_credentials(slurm, tmp_path):
    cfg = _slurm_config(tmp_path)
    cfg["jobqueue"]["slurm"].pop("log-directory")
    logs = tmp_path / "run.logs"
    work = tmp_path / "cwd"
    work.mkdir()
    old = os.getcwd()
    os.chdir(work)
    try:
        with start_cluster("slurm", cluster_config=cfg, min_jobs=1, max_jobs=1, quiet=True,
                           log_directory=logs) as client:
            address = client.scheduler.address
            assert address.startswith("tls://"), address
            client.wait_for_workers(1, timeout=120)
            # the run's own client and worker jobs work over TLS
            assert client.submit(_inc, 1).result(timeout=60) == 2
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
            failures = _no_security_client_fails(address)
            assert len(failures) == 3, failures
            credentials = list(logs.glob(".dask-jobqueue.worker.*"))
            assert credentials, list(logs.iterdir())
            assert all((p.stat().st_mode & 0o077) == 0 for p in credentials)
            job = next(iter(_job_ids(client).values()))
    finally:
        os.chdir(old)
    # job logs beside the run, none in the working directory; credentials removed at close
    for _ in range(50):
        if list(logs.glob(f"*{job}*")):
            break
        time.sleep(0.2)
    assert list(logs.glob(f"*{job}*")), list(logs.iterdir())
    assert not list(work.iterdir()), list(work.iterdir())
    assert not list(logs.glob(".dask-jobqueue.worker.*"))


@pytest.mark.slurm
def test_slurm_tls_can_be_turned_off(slurm, tmp_path):
    cfg = _slurm_config(tmp_path)
    cfg["gmp-pipeline"]["cluster"]["jobqueue"] = {"tls": False}
    with start_cluster("slurm", cluster_config=cfg, min_jobs=1, max_jobs=1,
                       quiet=True) as client:
        assert client.scheduler.address.startswith("tcp://")
        client.wait_for_workers(1, timeout=120)
        assert client.submit(_inc, 1).result(timeout=60) == 2


@pytest.mark.slurm
def test_cli_on_slurm_uses_tls_and_writes_job_logs_beside_the_store(slurm, tmp_path,
                                                                   shared_numba):
    import yaml

    cfg = _slurm_config(tmp_path, numba_dir=shared_numba, memory="2GiB")
    cfg["jobqueue"]["slurm"].pop("job-script-prologue")
    cfg["jobqueue"]["slurm"].pop("log-directory")
    cfg_file = tmp_path / "slurm.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "out.zarr"
    sample = os.path.join(REPO, "tests", "data", "samples", "qm9")
    run = subprocess.run([sys.executable, "-m", "gmp_pipeline.cli", "featurize", "qm9", sample,
                          "-o", str(out), "--cluster", "slurm", "--cluster-config",
                          str(cfg_file), "--max-jobs", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=work,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "UserWarning" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    logs = tmp_path / "out.zarr.logs"
    job_logs = [p for p in logs.iterdir() if not p.name.startswith(".")]
    assert job_logs, list(logs.iterdir())
    text = "".join(p.read_text(errors="replace") for p in job_logs)
    assert "tls://" in text and "tcp://" not in text.split("Registered to:")[-1][:40], text[-2000:]
    assert not list(work.iterdir()), list(work.iterdir())
    assert not list(logs.glob(".dask-jobqueue.worker.*"))      # credentials removed
