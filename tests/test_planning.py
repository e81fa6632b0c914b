"""Planning at scale (issue 11, item 5): atom counts of a source without a size table (a legacy
OC20 LMDB without fairchem's metadata.npz) are counted in tasks on the cluster, not in the
driver, and cached in the store's staging area so that a resumed run does not count again."""
from __future__ import annotations

import numpy as np
import pytest

from gmp_pipeline.errors import SourceError
from gmp_pipeline.pipeline import counts as counts_mod
from gmp_pipeline.pipeline.counts import atom_counts, count_ranges, counts_path
from gmp_pipeline.pipeline.executors import DaskExecutor, InProcessExecutor
from gmp_pipeline.readers import open_reader
from gmp_pipeline.readers.ocp.pyg_lmdb import LegacyLMDBReader
from gmp_pipeline.store.staging import staging_dir
from fixtures.ocp_writers import write_pyg_lmdb


def _record(rng, n, i):
    return {"atomic_numbers": rng.choice([1, 8, 29], n).astype(np.float32),
            "pos": rng.uniform(0, 8, (n, 3)).astype(np.float32),
            "cell": (np.eye(3, dtype=np.float32) * 8)[None], "natoms": n,
            "tags": rng.integers(0, 3, n), "fixed": (rng.random(n) < 0.3).astype(np.float32),
            "sid": i, "fid": 0, "y": np.float64(rng.normal()),
            "force": rng.normal(size=(n, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def legacy_lmdb(tmp_path_factory):
    """A two-file legacy LMDB of 1,300 records of 1..12 atoms, no metadata.npz."""
    d = tmp_path_factory.mktemp("lmdb") / "src"
    d.mkdir()
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 13, 1300)
    recs = [_record(rng, int(n), i) for i, n in enumerate(sizes)]
    write_pyg_lmdb(d / "data.0000.lmdb", recs[:700])
    write_pyg_lmdb(d / "data.0001.lmdb", recs[700:], length_key=False)
    return d, sizes


def test_legacy_lmdb_has_no_cheap_table_but_counts_any_range(legacy_lmdb):
    d, sizes = legacy_lmdb
    r = open_reader("ocp", d)
    assert r.cheap_n_atoms() is None
    assert list(r.n_atoms_range(690, 710)) == list(sizes[690:710])   # across the two files
    assert np.array_equal(r.n_atoms(), sizes)                       # the driver's own count
    assert np.array_equal(r.cheap_n_atoms(), sizes)                 # ... now known here


def test_metadata_npz_is_the_cheap_path(tmp_path, legacy_lmdb):
    d, sizes = legacy_lmdb
    src = tmp_path / "src"
    src.mkdir()
    for f in d.iterdir():
        (src / f.name).symlink_to(f)
    np.savez(src / "metadata.npz", natoms=sizes)
    r = open_reader("ocp", src)
    assert np.array_equal(r.cheap_n_atoms(), sizes)
    store = tmp_path / "s.zarr"
    got, info = atom_counts(r, str(store), InProcessExecutor())
    assert info["source"] == "table" and np.array_equal(got, sizes)
    assert not counts_path(store).exists()


def test_count_ranges_cover_the_source():
    for n, w in ((0, 1), (1, 1), (1300, 2), (10**6, 2), (10**6, 64)):
        rs = count_ranges(n, w)
        assert [a for a, _ in rs] == sorted(a for a, _ in rs)
        assert sum(b - a for a, b in rs) == n and all(b > a for a, b in rs)
        assert all(b - a <= counts_mod.COUNT_TASK_RECORDS for a, b in rs)
    assert len(count_ranges(1300, 2)) == 3          # >= 500 records a task
    assert len(count_ranges(10**6, 2)) == 50        # <= 20,000 records a task


def test_counted_on_the_cluster_equal_the_driver_count_and_are_cached(tmp_path, legacy_lmdb,
                                                                      dask_address,
                                                                      monkeypatch):
    from distributed import Client

    d, sizes = legacy_lmdb
    store = str(tmp_path / "s.zarr")
    logs = []
    with Client(dask_address) as client:
        ex = DaskExecutor(client)
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        got, info = atom_counts(open_reader("ocp", d), store, ex, log=logs.append)
    assert info["source"] == "counted" and info["tasks"] == 3
    assert np.array_equal(got, open_reader("ocp", d).n_atoms())
    assert np.array_equal(np.load(counts_path(store)), sizes)
    assert not (staging_dir(store) / counts_mod.COUNTS_DIR).exists()   # joined, parts removed
    assert any("counting the atoms of 1300 records on 2 workers" in m for m in logs)
    assert len(pids) == 2
    # a resumed run takes the cached counts: nothing is decoded again
    monkeypatch.setattr(LegacyLMDBReader, "n_atoms_range", _refuse)
    again, info = atom_counts(open_reader("ocp", d), store, InProcessExecutor(), log=logs.append)
    assert info["source"] == "cache" and np.array_equal(again, sizes)


def _refuse(self, start, stop):
    raise AssertionError(f"records [{start}, {stop}) counted again")


def test_an_interrupted_count_resumes_with_the_ranges_not_saved(tmp_path, legacy_lmdb,
                                                               monkeypatch):
    d, sizes = legacy_lmdb
    store = str(tmp_path / "s.zarr")
    r = open_reader("ocp", d)
    (a, b), *_ = count_ranges(len(r), 2)
    counts_mod.count_range(r, store, a, b)          # the first range was saved, then Ctrl-C
    calls = []
    orig = LegacyLMDBReader.n_atoms_range

    def spy(self, start, stop):
        calls.append((start, stop))
        return orig(self, start, stop)

    monkeypatch.setattr(LegacyLMDBReader, "n_atoms_range", spy)
    got, info = atom_counts(open_reader("ocp", d), store, InProcessExecutor())
    assert info["ranges_reused"] == 1 and (a, b) not in calls and len(calls) == 2
    assert np.array_equal(got, sizes)


def test_featurize_a_legacy_lmdb_counts_on_the_cluster_and_a_resume_does_not(
        tmp_path, legacy_lmdb, dask_address, monkeypatch):
    from distributed import Client

    from gmp_pipeline import GMPFeaturizer, open_store
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.store import staging

    d, sizes = legacy_lmdb
    fz = GMPFeaturizer(orders=[0, 1], sigmas=[0.4], psp="QE-kjpaw")
    store = tmp_path / "out.zarr"
    calls = []
    orig = staging.write_staged

    def stop_after_two(path, task, arrays, meta):      # the run is killed after two tasks
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(task)
        return orig(path, task, arrays, meta)

    monkeypatch.setattr("gmp_pipeline.pipeline.tasks.write_staged", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        featurize_to_store(open_reader("ocp", d), store, fz, derivatives=False,
                           progress=False, chunk_size=200)
    assert np.array_equal(np.load(counts_path(store)), sizes)     # counted once, kept
    monkeypatch.undo()
    monkeypatch.setattr(LegacyLMDBReader, "n_atoms_range", _refuse)
    with Client(dask_address) as client:
        s = featurize_to_store(open_reader("ocp", d), store, fz, derivatives=False,
                               progress=False, client=client)
    assert s.state == "resume" and s.count_source == "" and s.tasks_skipped == 2
    st = open_store(store)
    assert len(st) == 1300 and np.array_equal(st.n_atoms(), sizes)


def test_a_new_run_counts_on_the_cluster(tmp_path, legacy_lmdb, dask_address):
    from distributed import Client

    from gmp_pipeline import GMPFeaturizer
    from gmp_pipeline.pipeline import featurize_to_store

    d, sizes = legacy_lmdb
    fz = GMPFeaturizer(orders=[0], sigmas=[0.4], psp="QE-kjpaw")
    logs = []
    with Client(dask_address) as client:
        s = featurize_to_store(open_reader("ocp", d), tmp_path / "o.zarr", fz,
                               derivatives=False, progress=False, client=client,
                               log=logs.append)
    assert s.count_source == "counted" and s.n_atoms == int(sizes.sum()) and s.plan_seconds > 0
    assert any("on 2 workers" in m for m in logs)


def test_a_bad_record_while_counting_is_one_error_naming_file_record_field(tmp_path):
    import lmdb

    d = tmp_path / "src"
    d.mkdir()
    rng = np.random.default_rng(1)
    write_pyg_lmdb(d / "data.0000.lmdb", [_record(rng, 3, i) for i in range(4)])
    env = lmdb.open(str(d / "data.0000.lmdb"), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"2", b"\x80\x04not a pickle")
    env.close()
    r = open_reader("ocp", d)
    with pytest.raises(SourceError, match=r"data\.0000\.lmdb.*record 2.*field 'pickle'"):
        atom_counts(r, str(tmp_path / "s.zarr"), InProcessExecutor())
    r = open_reader("ocp", d, skip_bad_records=True)
    got, _ = atom_counts(r, str(tmp_path / "s2.zarr"), InProcessExecutor())
    assert list(got) == [3, 3, 0, 3]


def test_the_reader_is_pickled_once_per_phase_not_once_per_task(tmp_path, legacy_lmdb,
                                                               dask_address, monkeypatch):
    """The driver used to pickle the reader into every task (a reader's index grows with its
    source: the full QM9's driver peaked at 1.9 GB); now once per phase (count, warm-up,
    featurize), and at most 16 tasks are in flight however many the run has."""
    from distributed import Client

    from gmp_pipeline import GMPFeaturizer
    from gmp_pipeline.pipeline import executors, featurize_to_store
    from gmp_pipeline.readers.base import Reader

    d, sizes = legacy_lmdb
    pickled = []
    orig = Reader.__getstate__

    def counting(self):
        pickled.append(1)
        return orig(self)

    monkeypatch.setattr(LegacyLMDBReader, "__getstate__", counting)
    in_flight = []
    orig_window = executors.DaskExecutor._window
    monkeypatch.setattr(executors.DaskExecutor, "_window",
                        lambda self: in_flight.append(1) or 3)
    fz = GMPFeaturizer(orders=[0], sigmas=[0.4], psp="QE-kjpaw")
    with Client(dask_address) as client:
        s = featurize_to_store(open_reader("ocp", d), tmp_path / "o.zarr", fz,
                               derivatives=False, progress=False, client=client, chunk_size=40)
        tasks = {k for k in client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.tasks))}
    assert s.n_tasks == 33 and s.tasks_computed == 33
    assert len(pickled) <= 6, len(pickled)     # before: once per task, 33 more
    assert in_flight and orig_window is not None
    assert not any(k.startswith("gmp-task-") for k in tasks)    # all released


def test_counting_reads_tensor_shapes_only_with_the_same_whitelist(tmp_path):
    """n_atoms_range decodes each record with its tensors left unread (4x faster on the
    OC20-like records); same counts for both PyG layouts, a natoms tensor without
    atomic_numbers falls back to the full decode, and a foreign global is still refused."""
    import pickle

    from gmp_pipeline.readers.ocp import _torchfree

    rng = np.random.default_rng(3)
    for layout in ("pyg1", "pyg2"):
        d = tmp_path / layout
        d.mkdir()
        recs = [_record(rng, n, i) for i, n in enumerate([4, 1, 7])]
        write_pyg_lmdb(d / "data.lmdb", recs, layout=layout)
        r = open_reader("ocp", d)
        assert list(r.n_atoms_range(0, 3)) == [4, 1, 7] == [len(s) for s in r.read()]
    d = tmp_path / "natoms_tensor"
    d.mkdir()
    write_pyg_lmdb(d / "data.lmdb", [{"natoms": np.array([5]), "pos": np.zeros((5, 3))}])
    assert list(open_reader("ocp", d).n_atoms_range(0, 1)) == [5]

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, ("true",))

    with pytest.raises(_torchfree.RefusedGlobal, match="posix.system|os.system"):
        _torchfree.unpickle_shapes(pickle.dumps(Evil()))
