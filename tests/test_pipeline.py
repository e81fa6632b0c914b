"""Pipeline guarantees: balanced planning, race-free writes, kill + resume, fingerprint refusal,
bad sources."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (SAMPLES, SMALL_FEATURES, assert_stores_equal, kernel_cache_env,
                     write_features_yaml)

from gmp_pipeline.cli import main
from gmp_pipeline.config import knob
from gmp_pipeline.errors import StoreError
from gmp_pipeline.pipeline import featurize_to_store, plan_tasks
from gmp_pipeline.store import layout, open_store
from gmp_pipeline.store import lock, staging
from gmp_pipeline.store import writer as W

BENCH = Path(__file__).parents[1] / "benchmarks" / "data" / "oc20_like_200.extxyz"
TOY = SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def serial_store(kind, path, out, **kw):
    """The reference: the same source and features featurized in this process, no Dask."""
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader

    reader = open_reader(kind, os.path.abspath(path))
    return featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), progress=False,
                              log=lambda m: None, **kw)


# -- planning ------------------------------------------------------------------------------------

def test_plan_is_balanced_by_atoms_not_structures():
    rng = np.random.default_rng(1)
    n_atoms = np.concatenate([rng.integers(2, 6, 500), rng.integers(150, 250, 50)])
    tasks = plan_tasks(n_atoms, n_workers=2)
    assert tasks[0][0] == 0 and tasks[-1][1] == n_atoms.size
    assert all(a < b for a, b in tasks) and all(t[1] == u[0] for t, u in zip(tasks, tasks[1:]))
    loads = [n_atoms[a:b].sum() for a, b in tasks]
    counts = [b - a for a, b in tasks]
    assert max(loads) <= 1.5 * np.mean(loads) + 250     # balanced by atoms (within one structure)
    assert max(counts) > 5 * min(counts)                 # ... so not by structure count


def test_plan_chunk_size_and_edge_cases():
    assert plan_tasks([], n_workers=4) == []
    assert plan_tasks([10] * 100, chunk_size=10) == [(i, i + 10) for i in range(0, 100, 10)]
    assert plan_tasks([3, 4, 5], chunk_size=1) == [(0, 1), (1, 2), (2, 3)]
    assert len(plan_tasks([5] * 10, chunk_size=100)) == 1


@pytest.mark.parametrize("n_features", [1, 5, 21, 200])
@pytest.mark.parametrize("totals", [(1, 3, 9), (1000, 17_000, 1_300_000), (7, 0, 0)])
def test_assembly_jobs_own_disjoint_whole_chunks(n_features, totals):
    """Race-free by design: every assembly job writes whole chunks that no other job touches,
    and together they cover every row exactly once."""
    specs = layout.array_specs(n_features, "float32", True,
                               {"has_forces": True, "info": {"sid": "int64", "name": "str"},
                                "atom_info": {"tags": "int64"}})
    tot = dict(zip(("structures", "atoms", "pairs"), totals))
    jobs = W.assembly_jobs(specs, tot)
    for path, spec in specs.items():
        if path in layout.DIRECT:
            assert not any(p == path for p, _, _ in jobs)   # written by the tasks themselves
            continue
        n = tot[spec.level]
        rows = spec.chunk_rows(n)
        mine = sorted((a, b) for p, a, b in jobs if p == path)
        covered = [r for a, b in mine for r in range(a, b)] if n < 100_000 else None
        if covered is not None:
            assert covered == list(range(n))
        for a, b in mine:
            assert a % rows == 0 and (b % rows == 0 or b == n)
        if n * spec.row_bytes() >= knob("store.min-chunk-bytes"):
            assert rows * spec.row_bytes() >= knob("store.min-chunk-bytes")


def test_tasks_own_whole_chunks_of_dfeatures():
    """Race-free by design: each task's pairs/dfeatures region starts on a chunk boundary, is a
    whole number of chunks, holds every pair it can produce (n * n per structure) and no other
    task's region overlaps it."""
    rng = np.random.default_rng(3)
    n_atoms = rng.integers(1, 120, 300)
    spec = layout.array_specs(21, "float32", True, {})["pairs/dfeatures"]
    rows = spec.chunk_rows(1 << 62)
    assert rows * spec.row_bytes() >= knob("store.min-chunk-bytes")
    for tasks in (plan_tasks(n_atoms, n_workers=2), plan_tasks(n_atoms, chunk_size=1)):
        caps = W.pair_capacities(n_atoms, tasks, rows)
        base = np.concatenate([[0], np.cumsum(caps)])
        assert np.all(base % rows == 0) and np.all(caps % rows == 0)
        for (a, b), cap in zip(tasks, caps):
            assert cap >= int((n_atoms[a:b] ** 2).sum())


# -- race ----------------------------------------------------------------------------------------

def test_many_tiny_tasks_on_several_processes_equal_a_serial_run(tmp_path, dask_address):
    """101 one-structure tasks racing on 2 worker processes give exactly the serial store."""
    out = tmp_path / "par.zarr"
    res = run_cli("featurize", "ase", TOY, "-o", out, "--features",
                  write_features_yaml(tmp_path / "f.yaml"), "--chunk-size", 1,
                  "--cluster", dask_address, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "tasks: 101 planned, 101 computed, 0 already done" in res.output
    serial_store("ase", TOY, tmp_path / "ser.zarr", chunk_size=1)
    assert_stores_equal(out, tmp_path / "ser.zarr")
    assert open_store(out).attrs["counts"]["n_tasks"] == 101


# -- kill and resume -----------------------------------------------------------------------------

def _cli_cmd(out, feats):
    return [sys.executable, "-m", "gmp_pipeline.cli", "featurize", "ase", str(BENCH), "-o",
            str(out), "--features", str(feats), "--chunk-size", "2", "--workers", "2",
            "--no-progress"]


def test_killed_run_is_incomplete_and_resume_gives_the_uninterrupted_store(tmp_path):
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / "killed.zarr"
    env = kernel_cache_env()
    proc = subprocess.Popen(_cli_cmd(out, feats), env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(staging.finished_tasks(out)) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)    # the CLI, its scheduler and workers
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, output
    time.sleep(0.5)
    table = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True,
                           text=True).stdout.split("\n")
    survivors = [ln for ln in table if ln.split()[1:2] == [str(proc.pid)]
                 and not ln.split()[2].startswith("Z")]
    assert not survivors, f"processes of the killed run survive: {survivors}"

    attrs = layout.read_root_attrs(out)
    assert attrs["complete"] is False
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    n_total = len(staging.load_plan(out)["tasks"])
    n_done = len(staging.finished_tasks(out))
    assert n_total == 100 and 3 <= n_done < n_total, (n_done, n_total)
    res = run_cli("inspect", out)
    assert "complete:    NO" in res.output and f"of {n_total} tasks done" in res.output

    rerun = subprocess.run(_cli_cmd(out, feats), env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (f"tasks: {n_total} planned, {n_total - n_done} computed, {n_done} already done"
            in rerun.stdout), rerun.stdout
    assert f"resuming {out}: {n_done} of {n_total} tasks already done" in rerun.stderr
    assert layout.read_root_attrs(out)["complete"] is True
    assert not (out / layout.STAGING_DIR).exists()

    serial_store("ase", BENCH, tmp_path / "uninterrupted.zarr", chunk_size=2)
    assert_stores_equal(out, tmp_path / "uninterrupted.zarr")

    # a third run has nothing to do
    again = subprocess.run(_cli_cmd(out, feats), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "already complete" in again.stderr


# -- fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_mismatch_is_refused_and_overwrite_replaces(tmp_path):
    qm9 = SAMPLES / "qm9"
    out = tmp_path / "q.zarr"
    serial_store("qm9", qm9, out)
    fp = layout.read_root_attrs(out)["fingerprint"]
    other = write_features_yaml(tmp_path / "g.yaml", sigmas=[0.3, 0.7])
    args = ["featurize", "qm9", qm9, "-o", out, "--features", other, "--cluster", "local",
            "--workers", 1, "--no-progress"]
    res = run_cli(*args)
    assert res.exit_code == 1
    assert "different configuration" in res.output
    assert "feature_config.sigmas" in res.output and "0.7" in res.output
    assert "--overwrite" in res.output and "Traceback" not in res.output
    assert layout.read_root_attrs(out)["fingerprint"] == fp       # untouched

    for opt, key in ((["--no-derivatives"], "options.derivatives"),
                     (["--dtype", "float64"], "options.dtype")):
        res = run_cli("featurize", "qm9", qm9, "-o", out, "--features",
                      write_features_yaml(tmp_path / "s.yaml"), *opt, "--no-progress")
        assert res.exit_code == 1 and key in res.output, res.output

    res = run_cli(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    attrs = layout.read_root_attrs(out)
    assert attrs["complete"] and attrs["fingerprint"] != fp
    assert attrs["feature_config"]["sigmas"] == [0.3, 0.7]


def test_fingerprint_covers_psp_bytes_threshold_and_version():
    base = dict(feature_config={"orders": [0], "sigmas": [0.3], "psp": "QE-kjpaw",
                                "psp_sha256": "aa", "overlap_threshold": 1e-16,
                                "square": False},
                source={"reader": "ase", "path": "/x"}, options={"derivatives": True,
                                                                 "dtype": "float32"},
                version="0.1.0")
    fp = layout.fingerprint(layout.fingerprint_parts(**base))
    for key, change in (("feature_config", {"psp_sha256": "bb"}),
                        ("feature_config", {"overlap_threshold": 1e-12}),
                        ("source", {"path": "/y"}), ("options", {"dtype": "float64"})):
        other = {**base, key: {**base[key], **change}}
        assert layout.fingerprint(layout.fingerprint_parts(**other)) != fp
    assert layout.fingerprint(layout.fingerprint_parts(**{**base, "version": "0.2.0"})) != fp


def test_a_second_run_on_a_store_in_use_is_refused(tmp_path):
    """Two runs on one store would share its staging area; the second one stops at once,
    saying who holds the store, and the lock goes with the run that held it."""
    out = tmp_path / "q.zarr"
    lock_file = lock.lock_path(out)
    with lock.store_lock(out):
        info = json.loads(lock_file.read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(StoreError, match=rf"another gmp-pipeline run \(pid {os.getpid()}"):
            serial_store("qm9", SAMPLES / "qm9", out)
        res = run_cli("featurize", "qm9", SAMPLES / "qm9", "-o", out, "--features",
                      write_features_yaml(tmp_path / "f.yaml"), "--no-progress")
        assert res.exit_code == 1 and "being written by another" in res.output
        assert not out.exists()
    assert not lock_file.exists()
    serial_store("qm9", SAMPLES / "qm9", out)                 # free again
    assert layout.read_root_attrs(out)["complete"] and not lock_file.exists()


def test_non_store_directory_is_never_touched(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    res = run_cli("featurize", "qm9", SAMPLES / "qm9", "-o", d, "--features",
                  write_features_yaml(tmp_path / "f.yaml"), "--overwrite", "--no-progress")
    assert res.exit_code == 1 and "not a Zarr store" in res.output
    assert (d / "precious.txt").read_text() == "x"


# -- bad sources ---------------------------------------------------------------------------------

def test_missing_source_is_a_clean_error_and_writes_nothing(tmp_path):
    out = tmp_path / "x.zarr"
    res = run_cli("featurize", "md17", tmp_path / "nope.npz", "-o", out, "--no-progress")
    assert res.exit_code == 1
    assert res.output.startswith("Error:") and "nope.npz" in res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    res = run_cli("featurize", "nosuchkind", tmp_path / "nope.npz", "-o", out)
    assert res.exit_code == 1 and "unknown" in res.output and "md17" in res.output


def _corrupt_toy(path: Path, frame: int) -> Path:
    lines = TOY.read_text().splitlines(keepends=True)
    i, f = 0, 0
    while f < frame:
        i += int(lines[i].split()[0]) + 2
        f += 1
    parts = lines[i + 3].split()
    parts[1] = "abc"
    lines[i + 3] = " ".join(parts) + "\n"
    path.write_text("".join(lines))
    return path


def test_bad_record_mid_run_fails_cleanly_and_store_stays_incomplete(tmp_path, dask_address):
    bad = _corrupt_toy(tmp_path / "bad.extxyz", 60)
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / "bad.zarr"
    res = run_cli("featurize", "ase", bad, "-o", out, "--features", feats, "--chunk-size", 10,
                  "--cluster", dask_address, "--no-progress")
    assert res.exit_code == 1, res.output
    assert "Error:" in res.output and "bad.extxyz" in res.output and "record 60" in res.output
    assert "Traceback" not in res.output
    assert layout.read_root_attrs(out)["complete"] is False
    with pytest.raises(StoreError):
        open_store(out)
    res = run_cli("verify", out)
    assert res.exit_code == 1 and "incomplete" in res.output

    # with --skip-bad-records the run completes (a new configuration: --overwrite) and lists it
    res = run_cli("featurize", "ase", bad, "-o", out, "--features", feats, "--chunk-size", 10,
                  "--cluster", dask_address, "--no-progress", "--skip-bad-records", "--overwrite")
    assert res.exit_code == 0, res.output
    assert "record 60" in res.output
    st = open_store(out)
    assert len(st) == 100 and 60 not in st.array("structures/source_index")[:]
    assert st.attrs["counts"]["n_skipped_records"] == 1
    assert json.dumps(st.attrs["skipped_records"]).count("60") >= 1
    import zarr

    g = zarr.open_group(str(out), mode="r")                    # every skipped record, as arrays
    assert g["skipped/source_index"][:].tolist() == [60]
    assert "60" in str(g["skipped/message"][0])
    assert re.search(r"\b1 skipped records", run_cli("inspect", out).output)


def test_retry_with_skip_bad_records_keeps_the_finished_tasks(tmp_path, dask_address):
    bad = _corrupt_toy(tmp_path / "bad.extxyz", 60)
    feats = write_features_yaml(tmp_path / "f.yaml")
    out, ref = tmp_path / "retry.zarr", tmp_path / "ref.zarr"
    args = ["featurize", "ase", bad, "--features", feats, "--chunk-size", 10,
            "--cluster", dask_address, "--no-progress"]
    res = run_cli(*args, "-o", out)
    assert res.exit_code == 1 and "record 60" in res.output
    done = len(staging.finished_tasks(out))
    assert done > 0
    res = run_cli(*args, "-o", out, "--skip-bad-records")      # the retry: no --overwrite
    assert res.exit_code == 0, res.output
    m = re.search(r"(\d+) already done", res.output)
    assert m and int(m.group(1)) >= done, res.output
    assert run_cli(*args, "-o", ref, "--skip-bad-records").exit_code == 0
    assert_stores_equal(out, ref)
    # and the store now carries this run's configuration: the same command is "complete"
    res = run_cli(*args, "-o", out, "--skip-bad-records")
    assert res.exit_code == 0 and "nothing to do" in res.output
