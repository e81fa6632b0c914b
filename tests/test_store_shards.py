"""Format v2 sharding: who owns which shard, the shard sizes, and a store written by the
pipeline holding exactly the shard files Zarr writes for the same values."""
from __future__ import annotations

import json
import os

import dask
import numpy as np
import pytest
import zarr
from helpers import SAMPLES, SMALL_FEATURES

from gmp_pipeline.config import knob
from gmp_pipeline.pipeline import plan_tasks
from gmp_pipeline.store import layout
from gmp_pipeline.store import writer as W


@pytest.fixture(scope="module")
def small_shards_store(tmp_path_factory):
    """A store with derivatives whose arrays have several chunks per shard and several shards
    (tiny chunk and shard sizes), written by the pipeline in-process."""
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.readers import open_reader

    out = tmp_path_factory.mktemp("shards") / "toy.zarr"
    reader = open_reader("ase", os.fspath(SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"))
    with dask.config.set({"gmp-pipeline.store.min-chunk-bytes": 4096,
                          "gmp-pipeline.store.shard-bytes": 3 * 4096}):
        featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), chunk_size=9,
                           progress=False, log=lambda m: None)
    return out


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "zarr.json"}


def test_every_array_of_a_pipeline_store_is_what_zarr_writes(small_shards_store, tmp_path):
    """Each array of a store the pipeline wrote (tasks streaming dfeatures, assembly jobs
    streaming the rest, text through zarr) is rewritten through zarr with the same metadata:
    the shard files are the same bytes."""
    g = zarr.open_group(str(small_shards_store), mode="r")
    checked = 0
    several = False
    for level in ("structures", "atoms", "pairs"):
        for name, arr in g[level].arrays():
            src = small_shards_store / level / name
            meta = json.loads((src / "zarr.json").read_text())
            assert meta["codecs"][0]["name"] == "sharding_indexed", f"{level}/{name}"
            dst = tmp_path / level / name
            dst.mkdir(parents=True)
            (dst / "zarr.json").write_text(json.dumps(meta))
            values = arr[...]
            out = zarr.open_array(str(dst), mode="r+")
            out[...] = values
            assert _files(src) == _files(dst), f"{level}/{name}"
            several |= len(_files(src)) > 1 and arr.shards[0] > arr.chunks[0]
            checked += 1
    assert checked >= 10 and several


def test_dfeatures_regions_are_whole_shards_and_unreached_shards_have_no_file(
        small_shards_store):
    plan_shards = json.loads((small_shards_store / "zarr.json").read_text())
    meta = json.loads((small_shards_store / "pairs" / "dfeatures" / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    counts = plan_shards["attributes"]["counts"]
    assert counts["pair_rows"] % shard == 0
    files = [p for p in (small_shards_store / "pairs" / "dfeatures").rglob("*")
             if p.is_file() and p.name != "zarr.json"]
    assert 0 < len(files) <= counts["pair_rows"] // shard


def test_pair_shard_rows_fit_the_largest_task_up_to_the_knob():
    spec = layout.array_specs(21, "float32", True, {})["pairs/dfeatures"]
    inner = spec.chunk_rows(1 << 62)
    full = spec.shard_rows(1 << 62)
    assert full % inner == 0 and full * spec.row_bytes() >= knob("store.shard-bytes")
    small = np.full(50, 9)                         # ethanol-sized tasks: far below a shard
    tasks = plan_tasks(small, chunk_size=10)
    rows = W.pair_shard_rows(spec, small, tasks)
    assert rows % inner == 0 and rows >= 10 * 81 and rows < full
    oc20 = np.full(3000, 72)                       # OC20-like tasks of 20000 atoms: one
    tasks = plan_tasks(oc20, n_workers=1)          # shard (file) per task
    rows = W.pair_shard_rows(spec, oc20, tasks)
    assert rows < full and np.all(W.pair_capacities(oc20, tasks, rows) == rows)
    big = np.full(3000, 200)                       # larger tasks: shards of the knob's size
    assert W.pair_shard_rows(spec, big, plan_tasks(big, chunk_size=100)) == full


def test_tasks_own_whole_shards_of_dfeatures():
    rng = np.random.default_rng(3)
    n_atoms = rng.integers(1, 120, 300)
    spec = layout.array_specs(21, "float32", True, {})["pairs/dfeatures"]
    for tasks in (plan_tasks(n_atoms, n_workers=2), plan_tasks(n_atoms, chunk_size=1)):
        rows = W.pair_shard_rows(spec, n_atoms, tasks)
        caps = W.pair_capacities(n_atoms, tasks, rows)
        base = np.concatenate([[0], np.cumsum(caps)])
        assert np.all(base % rows == 0) and np.all(caps % rows == 0)
        for (a, b), cap in zip(tasks, caps):
            assert cap >= int((n_atoms[a:b] ** 2).sum())


@pytest.mark.parametrize("totals", [{"structures": 7, "atoms": 50, "pairs": 300},
                                    {"structures": 100_000, "atoms": 7_200_000,
                                     "pairs": 520_000_000}])
def test_assembly_jobs_own_disjoint_whole_shards(totals):
    specs = layout.array_specs(21, "float32", True, {"info": {"name": "str"}})
    jobs = W.assembly_jobs(specs, totals)
    for path, spec in specs.items():
        if path in layout.DIRECT:
            continue
        n = totals[spec.level]
        shard = spec.shard_rows(n)
        assert shard % spec.chunk_rows(n) == 0
        mine = sorted((a, b) for p, a, b in jobs if p == path)
        assert mine[0][0] == 0 and mine[-1][1] == n
        for (a, b), (c, _) in zip(mine, mine[1:]):
            assert b == c
        for a, b in mine:
            assert a % shard == 0 and (b % shard == 0 or b == n)


def test_the_reader_decodes_inner_chunks_itself_and_equals_zarr(small_shards_store, tmp_path):
    """The chunk cache's own inner-chunk reader gives zarr's values for every chunk of every
    array (absent chunks as fill, the last chunk cut at the array's end), and a flipped byte in
    a chunk or in a shard index is a StoreError naming the array."""
    import shutil

    from gmp_pipeline.errors import StoreError
    from gmp_pipeline.store import open_store
    from gmp_pipeline.store._shardread import shard_reader

    g = zarr.open_group(str(small_shards_store), mode="r")
    fast = 0
    for level in ("structures", "atoms", "pairs"):
        for name, arr in g[level].arrays():
            r = shard_reader(arr, f"{level}/{name}")
            if r is None:
                assert "str" in str(arr.dtype).lower() or arr.dtype.kind in "OUT", name
                continue
            fast += 1
            c = arr.chunks[0]
            for ci in range(-(-arr.shape[0] // c)):
                want = np.asarray(arr[ci * c:min((ci + 1) * c, arr.shape[0])])
                got = r.chunk(ci)
                assert got.dtype == want.dtype and got.shape == want.shape
                np.testing.assert_array_equal(got, want, err_msg=f"{level}/{name} {ci}")
    assert fast >= 10
    st = open_store(small_shards_store)
    st.get_batch([0, 5])
    assert st._cache._readers.get("atoms/features") is not None

    bad = tmp_path / "bad.zarr"
    shutil.copytree(small_shards_store, bad)
    shard = sorted(p for p in (bad / "atoms" / "features" / "c").rglob("*") if p.is_file())[0]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="atoms/features: chunk 0 of shard 0"):
        open_store(bad, cache_bytes=0).get_batch([0])
    raw[10] ^= 0xFF
    raw[-6] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="atoms/features: the index of shard 0"):
        open_store(bad, cache_bytes=0).get_batch([0])
