"""The training read path: fields, the chunk cache, the chunk-aware sampler, worker pickling."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from helpers import SAMPLES, SMALL_FEATURES, TESTS

from gmp_pipeline.errors import StoreError
from gmp_pipeline.pipeline import featurize_to_store
from gmp_pipeline.store import ChunkShuffleSampler, open_store
from gmp_pipeline.store._rowcache import ChunkCache

V1_STORE = TESTS / "data" / "v1_store" / "ethanol3.zarr"


@pytest.fixture(scope="module")
def qm9_store(tmp_path_factory):
    """A features-only store with text extras (QM9's SMILES, InChI, frequencies)."""
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader

    out = tmp_path_factory.mktemp("read") / "qm9.zarr"
    reader = open_reader("qm9", os.fspath(SAMPLES / "qm9"))
    featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), derivatives=False,
                       chunk_size=3, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def many_chunks_store(tmp_path_factory):
    """A store with derivatives whose atoms arrays span several chunks (small chunk bytes)."""
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader
    import dask

    out = tmp_path_factory.mktemp("read") / "toy.zarr"
    reader = open_reader("ase", os.fspath(SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"))
    with dask.config.set({"gmp-pipeline.store.min-chunk-bytes": 2048}):
        featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), chunk_size=7,
                           progress=False, log=lambda m: None)
    return out


def reference_rows(path, s, name):
    """Rows of structure ``s`` of the array ``name`` read with plain zarr."""
    import zarr

    g = zarr.open_group(str(path), mode="r")
    a0, n = int(g["structures/atom_start"][s]), int(g["structures/n_atoms"][s])
    return np.asarray(g[name][a0:a0 + n])


def test_text_extras_only_when_asked(qm9_store):
    st = open_store(qm9_store)
    assert st.text_fields, st.fields
    text = st.text_fields[0]
    d = st[0]
    assert text not in d and "features" in d and "gap" in d
    d_all = st.get_batch([0], fields="all")[0]
    assert text in d_all and isinstance(d_all[text], str)
    assert st.get_batch([0], fields=[text])[0][text] == d_all[text]


def test_fields_select_and_unknown_field_is_named(qm9_store):
    st = open_store(qm9_store)
    d = st.get_batch([1], fields=["features", "energy"])[0]
    assert set(d) == {"index", "features", "energy"}
    np.testing.assert_array_equal(d["features"], st[1]["features"])
    with pytest.raises(StoreError, match="no field 'featurez'"):
        st.get_batch([0], fields=["featurez"])


def test_batches_equal_plain_zarr_across_chunks(many_chunks_store):
    st = open_store(many_chunks_store, cache_bytes=4096)   # smaller than the arrays: evicts
    assert st.array("atoms/features").chunks[0] < int(st.n_atoms().sum())
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(st), 40)
    for d, s in zip(st.get_batch(idx), idx):
        for name in ("features", "positions", "numbers", "tags"):
            np.testing.assert_array_equal(d[name], reference_rows(many_chunks_store, s,
                                                                  f"atoms/{name}"))
    assert st._cache.nbytes <= 4096 + max(a.nbytes for per in st._cache._chunks.values()
                                          for a in per.values())
    # the same values with no cache and with a big one, dfeatures included
    a = open_store(many_chunks_store, cache_bytes=0).get_batch(idx)
    b = open_store(many_chunks_store).get_batch(idx)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_returned_arrays_do_not_alias_the_cache(many_chunks_store):
    st = open_store(many_chunks_store)
    d = st[4]
    d["features"][:] = -1.0
    assert not np.any(st[4]["features"] == -1.0)


def test_chunk_cache_decodes_each_chunk_once():
    arr = np.arange(1000.0).reshape(250, 4)

    class Fake:                      # the two things the cache uses of a zarr array
        shape, chunks, dtype = arr.shape, (16, 4), arr.dtype

        def __getitem__(self, sl):
            return arr[sl]

    cache = ChunkCache(1 << 20)
    for a in range(0, 240, 7):
        np.testing.assert_array_equal(cache.rows("x", Fake(), a, a + 9), arr[a:a + 9])
    assert cache.decoded == 16       # 250 rows in chunks of 16
    np.testing.assert_array_equal(cache.take("x", Fake(), np.array([3, 17, 200, 249])),
                                  arr[[3, 17, 200, 249]])


def test_chunk_shuffle_sampler_covers_each_structure_once_per_epoch(many_chunks_store):
    st = open_store(many_chunks_store)
    sampler = ChunkShuffleSampler(st, buffer_size=10, seed=3)
    e1, e2 = list(sampler), list(sampler)
    assert sorted(e1) == list(range(len(st))) == sorted(e2) and len(sampler) == len(st)
    assert e1 != e2 and e1 != sorted(e1)               # new order every epoch
    sampler.set_epoch(0)
    assert list(sampler) == e1                          # reproducible by (seed, epoch)
    # locality: a window of at least 10 structures comes from a few consecutive blocks
    rows = st.array("atoms/features").chunks[0]
    block_of = st.atom_start() // rows
    first_window = {int(block_of[i]) for i in e1[:10]}
    assert len(first_window) <= 1 + 10


def test_sampler_over_a_subset_dataset(many_chunks_store):
    pytest.importorskip("torch")
    st = open_store(many_chunks_store)
    ds = st.torch_dataset(indices=np.arange(20, 60))
    order = list(ChunkShuffleSampler(ds, seed=0))
    assert sorted(order) == list(range(40))


def test_dataloader_workers_with_spawn(many_chunks_store):
    torch = pytest.importorskip("torch")
    from gmp_pipeline.store import collate_energy_forces

    st = open_store(many_chunks_store)
    ds = st.torch_dataset(fields=["features", "numbers", "energy", "positions", "forces"])
    ds2 = pickle.loads(pickle.dumps(ds))
    assert len(ds2) == len(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2,
                                         multiprocessing_context="spawn",
                                         sampler=ChunkShuffleSampler(ds, seed=0),
                                         collate_fn=collate_energy_forces)
    seen = []
    for b in loader:
        seen += b["index"].tolist()
        assert b["features"].shape[0] == int(b["n_atoms"].sum())
    assert sorted(seen) == list(range(len(st)))


def test_plain_zarr_example_in_format_doc_runs(many_chunks_store, tmp_path, monkeypatch):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    section = doc[doc.index("## Reading with plain zarr"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "out.zarr").symlink_to(many_chunks_store)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "docs/format.md", "exec"), ns)   # noqa: S102 - our own documentation
    st = open_store(many_chunks_store)
    d = st[7]
    np.testing.assert_array_equal(ns["feats"], d["features"])
    np.testing.assert_array_equal(ns["dfeat"], d["dfeatures"])
    np.testing.assert_array_equal(ns["centre"], d["pair_center"])
    np.testing.assert_array_equal(ns["neighbour"], d["pair_neighbor"])


def test_derivative_atoms_free_keeps_exactly_the_pairs_of_free_neighbours(many_chunks_store,
                                                                         tmp_path):
    import dask

    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader
    from gmp_pipeline.store.verify import verify_store

    out = tmp_path / "free.zarr"
    reader = open_reader("ase", os.fspath(SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"))
    with dask.config.set({"gmp-pipeline.store.min-chunk-bytes": 2048}):
        featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), chunk_size=7,
                           derivative_atoms="free", progress=False, log=lambda m: None)
    full, free = open_store(many_chunks_store), open_store(out)
    assert free.derivative_atoms == "free" and full.derivative_atoms == "all"
    assert free.attrs["options"]["derivative_atoms"] == "free"
    n_fixed = 0
    for a, b in zip(full, free):
        keep = a["fixed"][a["pair_neighbor"]] == 0
        n_fixed += int(np.sum(a["fixed"] != 0))
        np.testing.assert_array_equal(b["features"], a["features"])
        np.testing.assert_array_equal(b["pair_center"], a["pair_center"][keep])
        np.testing.assert_array_equal(b["pair_neighbor"], a["pair_neighbor"][keep])
        np.testing.assert_array_equal(b["dfeatures"], a["dfeatures"][keep])
    assert n_fixed > 0, "the sample must have fixed atoms for this test to mean anything"
    assert free.attrs["counts"]["n_pairs"] < full.attrs["counts"]["n_pairs"]
    problems = verify_store(out, sample=5)
    assert list(problems) == [] and problems.checked == 5


def test_forces_on_free_atoms_from_a_free_store_equal_the_full_ones(many_chunks_store, tmp_path):
    torch = pytest.importorskip("torch")
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader
    from gmp_pipeline.store import collate_energy_forces

    out = tmp_path / "free.zarr"
    reader = open_reader("ase", os.fspath(SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"))
    featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), chunk_size=7,
                       derivative_atoms="free", progress=False, log=lambda m: None)
    w = torch.arange(1.0, 6.0)

    def forces(path):
        ds = open_store(path).torch_dataset(indices=range(30))
        b = collate_energy_forces(ds.__getitems__(list(range(30))))
        g = w.expand(b["features"].shape[0], 5)
        contrib = torch.einsum("pm,pxm->px", g[b["pair_center"]], b["dfeatures"])
        return -torch.zeros(b["features"].shape[0], 3).index_add(0, b["pair_neighbor"],
                                                                 contrib), b["fixed"]

    f_all, fixed = forces(many_chunks_store)
    f_free, fixed2 = forces(out)
    free = fixed == 0
    assert torch.equal(fixed, fixed2) and bool(free.any()) and bool((~free).any())
    torch.testing.assert_close(f_free[free], f_all[free])
    assert torch.count_nonzero(f_free[~free]) == 0


def test_derivative_atoms_free_is_refused_without_fixed(tmp_path):
    from gmp_pipeline.errors import InputError
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader

    reader = open_reader("md17", os.fspath(SAMPLES / "md17" / "ethanol.npz"))
    with pytest.raises(InputError, match="needs a per-atom 'fixed'"):
        featurize_to_store(reader, tmp_path / "x.zarr", GMPFeaturizer(**SMALL_FEATURES),
                           derivative_atoms="free", progress=False, log=lambda m: None)
    with pytest.raises(InputError, match="needs derivatives"):
        featurize_to_store(reader, tmp_path / "x.zarr", GMPFeaturizer(**SMALL_FEATURES),
                           derivatives=False, derivative_atoms="free", progress=False,
                           log=lambda m: None)
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("derivatives", [True, False])
def test_incomplete_store_reads_exactly_the_finished_tasks(tmp_path, derivatives):
    from gmp_pipeline.errors import SourceError
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader

    path = os.fspath(SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz")
    full_path, part_path = tmp_path / "full.zarr", tmp_path / "part.zarr"
    fz = GMPFeaturizer(**SMALL_FEATURES)
    featurize_to_store(open_reader("ase", path), full_path, fz, chunk_size=10,
                       derivatives=derivatives, progress=False, log=lambda m: None)
    reader = open_reader("ase", path)
    read = reader.read

    def failing(start, stop):      # the in-process run stops at the task starting at 60
        if start >= 60:
            raise SourceError(f"{path}: record {start}: injected failure")
        return read(start, stop)

    reader.read = failing
    with pytest.raises(SourceError, match="injected"):
        featurize_to_store(reader, part_path, fz, chunk_size=10, derivatives=derivatives,
                           progress=False, log=lambda m: None)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(part_path)
    part, full = open_store(part_path, allow_incomplete=True), open_store(full_path)
    assert not part.complete and part.finished_tasks >= 1
    n = len(part)
    assert 0 < n < len(full)
    src = [int(d["source_index"]) for d in part]
    assert src == list(range(n))       # the finished tasks are the first ones, in order
    got = part.get_batch(range(n))
    want = full.get_batch(range(n))
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    pickle.loads(pickle.dumps(part))[n - 1]


def _inner_chunk_ranges(shard: bytes, n_chunks: int) -> list[tuple[int, int]]:
    """(offset, length) of the stored inner chunks of a shard file (index at the end)."""
    index = np.frombuffer(shard[-(16 * n_chunks + 4):-4], dtype="<u8").reshape(-1, 2)
    return [(int(o), int(n)) for o, n in index if o != 2 ** 64 - 1]


@pytest.mark.parametrize("where", ["inner chunk", "shard index"])
@pytest.mark.parametrize("array", ["atoms/features", "pairs/dfeatures"])
def test_verify_names_the_array_whose_shard_bytes_were_flipped(many_chunks_store, tmp_path,
                                                                 where, array):
    """A byte flipped inside an inner chunk of a shard, or inside the shard's index, fails a
    crc32c checksum; verify names the array and the shard."""
    import json
    import shutil

    from gmp_pipeline.store.verify import verify_store

    bad = tmp_path / "bad.zarr"
    shutil.copytree(many_chunks_store, bad)
    meta = json.loads((bad / array / "zarr.json").read_text())
    (codec,) = meta["codecs"]
    conf = codec["configuration"]
    assert codec["name"] == "sharding_indexed"
    assert [c["name"] for c in conf["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
    assert json.loads((bad / "atoms" / "zarr.json").read_text())["attributes"][
        "encoding-type"] == "gmp-atoms"
    n_chunks = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // conf["chunk_shape"][0]
    assert n_chunks > 1
    if array == "atoms/features":
        assert list(verify_store(bad, sample=0)) == []
    shard = sorted(p for p in (bad / array / "c").rglob("*") if p.is_file())[0]
    raw = bytearray(shard.read_bytes())
    chunks = _inner_chunk_ranges(bytes(raw), n_chunks)
    assert len(chunks) > 1
    if where == "inner chunk":
        off, length = chunks[1]
        raw[off + length // 2] ^= 0xFF
    else:
        raw[len(raw) - 4 - 16 * n_chunks + 3] ^= 0x10      # an offset of the first entry
    shard.write_bytes(bytes(raw))
    problems = verify_store(bad, sample=0)
    assert any(p.startswith(f"{array}: shard 0 (rows 0-") and "corrupt" in p
               for p in problems), problems


def test_verify_reads_a_v1_store_and_catches_a_flipped_chunk(tmp_path):
    """verify still checks format-v1 stores (plain chunks, crc32c last in the chain)."""
    import shutil

    from gmp_pipeline.store.verify import verify_store

    bad = tmp_path / "v1.zarr"
    shutil.copytree(V1_STORE, bad)
    assert list(verify_store(bad, sample=0)) == []
    chunk = next(p for p in sorted((bad / "atoms" / "features" / "c").rglob("*")) if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    problems = verify_store(bad, sample=0)
    assert any(p.startswith("atoms/features: chunk 0 (rows 0-") and "corrupt" in p
               for p in problems), problems
