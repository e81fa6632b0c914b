"""The store's low-level writers: direct chunk files, streamed dfeatures, single-file staging."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from gmp_pipeline.errors import StoreError
from gmp_pipeline.pipeline import plan_tasks
from gmp_pipeline.store import staging as S
from gmp_pipeline.store.chunks import open_direct
from gmp_pipeline.store.layout import ArraySpec, codecs_for


def _make(path, spec: ArraySpec, n: int, rows: int):
    return zarr.create_array(str(path), shape=(n,) + spec.trailing, chunks=(rows,) + spec.trailing,
                             dtype=spec.dtype, fill_value=spec.fill, compressors=codecs_for(spec))


def _chunk_files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "zarr.json"}


SPECS = [ArraySpec("pairs/dfeatures", "float32", (3, 5), fill=float("nan")),
         ArraySpec("atoms/features", "float64", (4,), fill=float("nan")),
         ArraySpec("atoms/numbers", "int64"),
         ArraySpec("pairs/neighbor", "int32", fill=-1),
         ArraySpec("structures/pbc", "bool", (3,), fill=False)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.path)
def test_direct_chunks_are_the_bytes_zarr_writes(tmp_path, spec):
    """Chunk files written directly equal, byte for byte, what Zarr writes for the same rows
    (last chunk partial, so the fill padding is covered), and Zarr reads them back."""
    rng = np.random.default_rng(3)
    n, rows = 23, 8
    if spec.dtype == "bool":
        data = rng.random((n,) + spec.trailing) < 0.5
    else:
        data = (rng.standard_normal((n,) + spec.trailing) * 100).astype(spec.dtype)
    by_zarr = _make(tmp_path / "z", spec, n, rows)
    by_zarr[:] = data
    _make(tmp_path / "d", spec, n, rows)
    direct = open_direct(tmp_path / "d")
    assert direct is not None
    direct.write(0, data[:16])
    direct.write(16, data[16:])
    assert _chunk_files(tmp_path / "z") == _chunk_files(tmp_path / "d")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "d"), mode="r")[:], data)


def test_direct_writer_refuses_misaligned_and_oversized_blocks(tmp_path):
    spec = SPECS[2]
    _make(tmp_path / "a", spec, 20, 8)
    direct = open_direct(tmp_path / "a")
    with pytest.raises(StoreError, match="does not start a chunk"):
        direct.write(3, np.zeros(4, dtype=np.int64))
    with pytest.raises(StoreError, match="exceed"):
        direct.write(16, np.zeros(8, dtype=np.int64))


def test_text_arrays_are_left_to_zarr(tmp_path):
    spec = ArraySpec("structures/name", "str", fill="")
    zarr.create_array(str(tmp_path / "t"), shape=(4,), chunks=(4,), dtype=str,
                      compressors=codecs_for(spec))
    assert open_direct(tmp_path / "t") is None


@pytest.mark.parametrize("blocks", [[5, 7, 1, 0, 9], [30], [8, 8], []])
def test_pair_stream_writes_what_it_is_given_across_chunk_boundaries(tmp_path, blocks):
    spec = SPECS[0]
    rows, base, capacity = 8, 16, 32
    arr = _make(tmp_path / "pairs" / "dfeatures", spec, 64, rows)
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((k,) + spec.trailing) for k in blocks]   # float64 in
    stream = S.PairStream(tmp_path, spec, base, capacity)
    for p in parts:
        stream.append(p)
    n = stream.close()
    assert n == sum(blocks)
    got = arr[:]
    expect = np.full((64,) + spec.trailing, np.nan, dtype=np.float32)
    if parts:
        expect[base:base + n] = np.concatenate(parts).astype(np.float32)
    np.testing.assert_array_equal(got, expect)           # NaN outside the rows written
    with pytest.raises(StoreError, match="rows reserved"):
        S.PairStream(tmp_path, spec, base, capacity).append(np.zeros((capacity + 1, 3, 5)))


def test_staged_task_round_trip_and_truncation_is_reported(tmp_path):
    arrays = {"atoms/features": np.arange(12, dtype=np.float32).reshape(4, 3),
              "structures/n_atoms": np.array([1, 3], dtype=np.int64),
              "structures/pbc": np.array([[True, False, True]] * 2),
              "structures/name": np.array(["CH4", "water"]),
              "atoms/empty": np.zeros((0, 3))}
    (tmp_path / "_staging" / "tasks").mkdir(parents=True)
    assert S.write_staged(tmp_path, 0, arrays, {"task": 0})
    assert not S.write_staged(tmp_path, 0, arrays, {"task": 0})   # already there: kept
    got = S.StagedTasks(tmp_path).arrays(0)
    assert set(got) == set(arrays)
    for k, a in arrays.items():
        np.testing.assert_array_equal(got[k], a)
        assert got[k].dtype == a.dtype and got[k].shape == a.shape
    blob = S.task_dir(tmp_path, 0) / S.STAGED_FILE
    blob.write_bytes(blob.read_bytes()[:40])
    with pytest.raises(StoreError, match="task 0 .* truncated"):
        S.StagedTasks(tmp_path).arrays(0)


def test_plan_tapers_the_last_round_with_several_workers():
    n_atoms = np.full(400, 50)
    tasks = plan_tasks(n_atoms, n_workers=2)
    loads = [int(n_atoms[a:b].sum()) for a, b in tasks]
    assert sum(loads) == n_atoms.sum()
    full = np.mean(loads[:-6])                              # within one structure (50 atoms)
    assert all(abs(x - full) <= 50 for x in loads[:-6])
    assert all(abs(x - full / 2) <= 50 for x in loads[-6:-4])
    assert all(abs(x - full / 4) <= 50 for x in loads[-4:])
    one = plan_tasks(n_atoms, n_workers=1)                 # one worker: nothing to balance
    assert np.ptp([int(n_atoms[a:b].sum()) for a, b in one]) <= 50
