"""Fault injection through the real command line (issue 12): every fault ends with one clean
line and the right exit status, leaves no store marked complete, and once the fault is gone
the rerun gives the store an uninterrupted run gives.

Each test runs ``python -m gmp_pipeline.cli featurize`` as a subprocess on a local cluster of
two worker processes: distributed's worker logs go to the file descriptors of that process
tree, which only a subprocess captures.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (SAMPLES, SMALL_FEATURES, assert_stores_equal, kernel_cache_env,
                     write_features_yaml)

from gmp_pipeline.store import writer as W
from gmp_pipeline.store.lock import store_lock

BENCH = Path(__file__).parents[1] / "benchmarks" / "data" / "oc20_like_200.extxyz"
QM9 = SAMPLES / "qm9"
TOY = SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"
CLI = [sys.executable, "-m", "gmp_pipeline.cli"]

#: what must never reach the user's terminal without --debug
NOISE = ("Traceback", "Compute Failed", "Run Failed", "CancelledError", "UserWarning",
         "distributed.", "still alive")


def featurize_cmd(kind, source, out, feats, *extra):
    return CLI + ["featurize", kind, str(source), "-o", str(out), "--features", str(feats),
                  "--workers", "2", "--no-progress", *map(str, extra)]


def run(cmd, cwd, timeout=600):
    return subprocess.run(cmd, env=kernel_cache_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_clean(stderr, want_line):
    """stderr ends with exactly one line matching *want_line* and carries no Dask noise."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    for bad in NOISE:
        assert bad not in stderr, f"{bad!r} in stderr:\n{stderr[-4000:]}"
    assert lines and re.search(want_line, lines[-1]), stderr[-4000:]
    assert sum(1 for ln in lines if ln.startswith(("Error:", "Interrupted"))) == 1, stderr


def assert_not_complete(out):
    attrs = W.read_root_attrs(out)
    assert attrs is None or attrs.get("complete") is not True, attrs


def serial_store(kind, path, out, **kw):
    """The uninterrupted reference, featurized in this process."""
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.readers import open_reader

    reader = open_reader(kind, os.path.abspath(path))
    featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), progress=False,
                       log=lambda m: None, **kw)
    return out


@pytest.fixture(scope="module")
def bench_reference(tmp_path_factory):
    """The uninterrupted store of the 200-structure benchmark source (one task per structure)."""
    return serial_store("ase", BENCH, tmp_path_factory.mktemp("ref") / "bench.zarr",
                        chunk_size=1)


# -- SIGINT / SIGTERM ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, code, group", [
    (signal.SIGINT, 130, True),      # Ctrl-C in a terminal: the whole process group
    (signal.SIGTERM, 143, False),    # `kill`, or a batch system ending the job: the CLI only
])
def test_signal_mid_run_exits_with_its_code_and_the_rerun_resumes(sig, code, group, tmp_path,
                                                                   bench_reference):
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / "run.zarr"
    cmd = featurize_cmd("ase", BENCH, out, feats, "--chunk-size", 1)
    proc = subprocess.Popen(cmd, env=kernel_cache_env(), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900   # the first run may compile the kernels
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and len(W.finished_tasks(out)) >= 3:
                if group:   # worker processes get it too: they must not print tracebacks
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
                break
            time.sleep(0.01)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == code, (proc.returncode, stderr[-4000:])
    assert_clean(stderr, r"^Interrupted; rerun the same command to resume$")
    assert_not_complete(out)
    n_done = len(W.finished_tasks(out))
    assert 3 <= n_done < 200, n_done

    rerun = run(cmd, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"{n_done} already done" in rerun.stdout, rerun.stdout
    assert_stores_equal(out, bench_reference)


def test_importing_the_cluster_layer_keeps_the_sigint_handler():
    """dask_jobqueue.runner installs `lambda *_: sys.exit()` for SIGINT at import time."""
    code = ("import signal, gmp_pipeline.clusters, dask_jobqueue.runner; "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


# -- a bad record: in a task, and in the record the warm-up reads ---------------------------------

def _qm9_with_bad_value(tmp_path, name, field_index):
    src = tmp_path / "qm9"
    shutil.copytree(QM9, src, ignore=shutil.ignore_patterns("*.md"))
    f = src / name
    lines = f.read_text().split("\n")
    props = lines[1].split("\t")
    props[field_index] = "not-a-number"
    lines[1] = "\t".join(props)
    f.write_text("\n".join(lines))
    return src


def _extxyz_with_nan(tmp_path, frame):
    lines = TOY.read_text().split("\n")
    n = int(lines[0])
    k = frame * (n + 2) + 2 + 1
    parts = lines[k].split()
    parts[1] = "nan"
    lines[k] = "  ".join(parts)
    path = tmp_path / "nan.extxyz"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qm9-task", "qm9-warmup", "extxyz-nan"])
def test_bad_record_is_one_error_line(case, tmp_path):
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / "bad.zarr"
    if case == "qm9-task":
        # record 4 (gdb 5): a task reads it; the warm-up reads record 0
        src, kind, want = _qm9_with_bad_value(tmp_path, "dsgdb9nsd_000005.xyz", 2), "qm9", \
            r"^Error: file '.*dsgdb9nsd_000005\.xyz', record 4, field 'B': non-numeric"
    elif case == "qm9-warmup":
        # record 0 is the one every worker reads in warm_worker (client.run)
        src, kind, want = _qm9_with_bad_value(tmp_path, "dsgdb9nsd_000001.xyz", 4), "qm9", \
            r"^Error: file '.*dsgdb9nsd_000001\.xyz', record 0, field 'mu': non-numeric"
    else:
        src, kind, want = _extxyz_with_nan(tmp_path, 3), "ase", \
            r"^Error: file '.*nan\.extxyz', record 3, field 'positions': atom \d+ has a non-finite"
    res = run(featurize_cmd(kind, src, out, feats, "--chunk-size", 2), tmp_path)
    assert res.returncode == 1, res.stderr[-4000:]
    assert_clean(res.stderr, want)
    assert_not_complete(out)
    if case == "qm9-warmup":
        # --debug shows what was hidden
        dbg = run(CLI + ["--debug"] + featurize_cmd(kind, src, out, feats, "--chunk-size", 2)[3:],
                  tmp_path)
        assert dbg.returncode == 1 and "Traceback" in dbg.stderr, dbg.stderr[-4000:]


# -- a full disk ---------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (root only) and a function growing it to 256 MiB."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)

    try:
        yield mnt, grow
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_full_disk_is_one_error_line_and_resumes_once_there_is_space(tmp_path, small_tmpfs):
    mnt, grow = small_tmpfs
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = mnt / "full.zarr"
    cmd = featurize_cmd("ase", BENCH, out, feats, "--chunk-size", 10)
    res = run(cmd, tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr[-4000:]
    assert_clean(res.stderr, rf"^Error: no space left on the device writing {re.escape(str(mnt))}")
    assert_not_complete(out)

    grow()
    rerun = run(cmd, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    ref = serial_store("ase", BENCH, tmp_path / "ref.zarr", chunk_size=10)
    assert_stores_equal(out, ref)


# -- the dashboard port --------------------------------------------------------------------------

@pytest.mark.slow
def test_port_8787_taken_no_warning_dashboard_on_loopback(tmp_path):
    feats = write_features_yaml(tmp_path / "f.yaml")
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            blocker.bind(("", 8787))
            blocker.listen(1)
        except OSError:
            pass    # already taken (another Dask on this machine): the same situation
        res = run(featurize_cmd("qm9", QM9, tmp_path / "q.zarr", feats), tmp_path)
    finally:
        blocker.close()
    assert res.returncode == 0, res.stderr[-4000:]
    for bad in NOISE + ("Warning", "WARNING", "already in use"):
        assert bad not in res.stderr, f"{bad!r} in stderr:\n{res.stderr}"
    m = re.search(r"Dask dashboard: http://([^:/]+):(\d+)/", res.stderr)
    assert m, res.stderr
    assert m.group(1) == "127.0.0.1" and m.group(2) != "8787", m.group(0)


# -- checks that need no cluster come first ------------------------------------------------------

def _cli_in_process(*args):
    from click.testing import CliRunner

    from gmp_pipeline.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_store_lock_and_configuration_mismatch_are_refused_before_the_cluster(tmp_path):
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / "q.zarr"
    serial_store("qm9", QM9, out)
    other = write_features_yaml(tmp_path / "g.yaml", sigmas=[0.3, 0.7])
    res = _cli_in_process("featurize", "qm9", QM9, "-o", out, "--features", other,
                          "--workers", 1, "--no-progress")
    assert res.exit_code == 1 and "different configuration" in res.output, res.output
    assert "Dask dashboard" not in res.output, res.output       # no cluster was started

    locked = tmp_path / "locked.zarr"
    with store_lock(str(locked)):
        res = _cli_in_process("featurize", "qm9", QM9, "-o", locked, "--features", feats,
                              "--workers", 1, "--no-progress")
    assert res.exit_code == 1 and "being written by another" in res.output, res.output
    assert "Dask dashboard" not in res.output, res.output

    (tmp_path / "file.zarr").write_text("x")
    res = _cli_in_process("featurize", "qm9", QM9, "-o", tmp_path / "file.zarr", "--features",
                          feats, "--workers", 1, "--no-progress")
    assert res.exit_code == 1 and "not a directory" in res.output, res.output
    assert "Dask dashboard" not in res.output, res.output


# -- workers killed ------------------------------------------------------------------------------

def _worker_processes(pid):
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in
            " ".join(p.cmdline())]


@pytest.mark.slow
def test_worker_killed_by_sigkill_mid_task_is_replaced_and_the_run_completes(tmp_path,
                                                                             bench_reference):
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / "run.zarr"
    proc = subprocess.Popen(featurize_cmd("ase", BENCH, out, feats, "--chunk-size", 1),
                            env=kernel_cache_env(), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    killed = None
    try:
        deadline = time.monotonic() + 900   # the first run may compile the kernels
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and len(W.finished_tasks(out)) >= 3:
                workers = _worker_processes(proc.pid)
                assert workers, "no worker process found"
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)     # the OOM killer, a node failure
                break
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert killed is not None, f"the run ended before a worker was killed:\n{stderr[-4000:]}"
    assert proc.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert W.read_root_attrs(out)["complete"] is True
    assert_stores_equal(out, bench_reference)


@pytest.mark.slow
def test_workers_over_their_memory_limit_give_one_error_and_the_rerun_completes(tmp_path):
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / "mem.zarr"
    cmd = featurize_cmd("qm9", QM9, out, feats)
    env = {**kernel_cache_env(), "DASK_GMP_PIPELINE__CLUSTER__LOCAL__MEMORY_LIMIT": "170MB"}
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 1, res.stderr[-4000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "died" in last and "memory" in last, res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    assert "exceeded 95% memory budget" in res.stderr     # distributed says which worker
    assert_not_complete(out)

    rerun = run(cmd, tmp_path)                             # the limit removed
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert_stores_equal(out, serial_store("qm9", QM9, tmp_path / "ref.zarr"))


# -- a closed output pipe ------------------------------------------------------------------------

def test_closed_output_pipe_ends_quietly():
    """``gmp-pipeline inspect STORE | head -1`` when the reader has already left: the command
    ends quietly with SIGPIPE's status, no ``Error:`` line and no traceback."""
    store = Path(__file__).parent / "data" / "v1_store" / "ethanol3.zarr"
    r, w = os.pipe()
    os.close(r)  # nobody will read: every write of the command meets a closed pipe
    try:
        p = subprocess.run(CLI + ["inspect", str(store)], env=kernel_cache_env(), stdout=w,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
    finally:
        os.close(w)
    err = p.stderr.decode()
    assert p.returncode == 141, err
    assert "Error" not in err and "Traceback" not in err and "Exception ignored" not in err, err
