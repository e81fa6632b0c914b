"""The store's low-level writers: direct shard files, streamed dfeatures, single-file staging."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from gmp_pipeline.errors import StoreError
from gmp_pipeline.pipeline import plan_tasks
from gmp_pipeline.store import staging as S
from gmp_pipeline.store.chunks import open_direct
from gmp_pipeline.store.layout import ArraySpec, codecs_for


def _make(path, spec: ArraySpec, n: int, rows: int, shard: int | None = None):
    """A sharded array as the store creates it (``rows`` per inner chunk, ``shard`` per shard,
    default 3 chunks), with its zarr.json written."""
    shard = shard or 3 * rows
    return zarr.create_array(str(path), shape=(n,) + spec.trailing, chunks=(rows,) + spec.trailing,
                             shards=(shard,) + spec.trailing, dtype=spec.dtype,
                             fill_value=spec.fill, compressors=codecs_for(spec))


def _chunk_files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "zarr.json"}


SPECS = [ArraySpec("pairs/dfeatures", "float32", (3, 5), fill=float("nan")),
         ArraySpec("atoms/features", "float64", (4,), fill=float("nan")),
         ArraySpec("atoms/numbers", "int64"),
         ArraySpec("pairs/neighbor", "int32", fill=-1),
         ArraySpec("structures/pbc", "bool", (3,), fill=False),
         ArraySpec("structures/cell", "float64", (3, 3))]


def _data(spec, n, rng):
    if spec.dtype == "bool":
        return rng.random((n,) + spec.trailing) < 0.5
    return (rng.standard_normal((n,) + spec.trailing) * 100).astype(spec.dtype)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.path)
def test_direct_shards_are_the_bytes_zarr_writes(tmp_path, spec):
    """Shard files written directly equal, byte for byte, what Zarr writes for the same rows:
    the inner chunks (bytes + blosc + crc32c) in order, the index (bytes + crc32c) at the end,
    chunks holding only the fill value left out (index entry all ones), a shard holding only
    such chunks without a file, and the array's last shard partial.  Zarr reads them back."""
    rng = np.random.default_rng(3)
    n, rows = 100, 8                     # shards of 24 rows: 5 shards, the last one partial
    data = _data(spec, n, rng)
    data[30:50] = spec.fill              # chunk 4 (rows 32-39) is only fill: left out
    data[72:98] = spec.fill              # shard 3 (rows 72-95) is only fill: no file
    if spec.dtype.startswith("float") and spec.fill == 0:
        data[40] = -0.0                  # -0.0 is data to Zarr (compared bit for bit)
    by_zarr = _make(tmp_path / "z", spec, n, rows)
    by_zarr[:] = data
    _make(tmp_path / "d", spec, n, rows)
    direct = open_direct(tmp_path / "d")
    assert direct is not None and (direct.rows, direct.chunk_rows) == (24, 8)
    direct.write(0, data[:48])                         # two shards in one block
    stream = direct.stream(48)                         # the rest streamed in odd pieces
    for a, b in ((48, 53), (53, 53), (53, 72)):
        stream.append(data[a:b])
    stream.skip_to(98)                                 # into the middle of a chunk
    stream.append(data[98:])
    stream.close()
    files = _chunk_files(tmp_path / "z")
    assert sorted(files) == sorted(_chunk_files(tmp_path / "d"))
    assert files == _chunk_files(tmp_path / "d")
    assert len(files) == 4                             # shard 3 has no file
    got = zarr.open_array(str(tmp_path / "d"), mode="r")[:]
    np.testing.assert_array_equal(got, data)


def test_direct_shards_replace_older_files_as_zarr_does(tmp_path):
    """Rewriting a shard (a retried task) truncates its file; a shard that now holds only the
    fill value loses its file, as with Zarr."""
    spec = SPECS[0]
    rng = np.random.default_rng(1)
    data = _data(spec, 48, rng)
    _make(tmp_path / "d", spec, 48, 8)
    direct = open_direct(tmp_path / "d")
    direct.write(0, data)
    assert len(_chunk_files(tmp_path / "d")) == 2
    small = data[:5].copy()
    direct.write(0, small)
    stream = direct.stream(24)
    stream.skip_to(48)
    stream.close()
    by_zarr = _make(tmp_path / "z", spec, 48, 8)
    expect = np.full_like(data, np.nan)
    expect[:5] = small
    by_zarr[:] = expect
    assert _chunk_files(tmp_path / "d") == _chunk_files(tmp_path / "z")
    assert len(_chunk_files(tmp_path / "d")) == 1


def test_direct_writer_refuses_misaligned_and_oversized_blocks(tmp_path):
    spec = SPECS[2]
    _make(tmp_path / "a", spec, 40, 8)
    direct = open_direct(tmp_path / "a")
    with pytest.raises(StoreError, match="does not start a shard"):
        direct.write(8, np.zeros(4, dtype=np.int64))
    with pytest.raises(StoreError, match="exceed"):
        direct.write(24, np.zeros(24, dtype=np.int64))


@pytest.mark.parametrize("make", [
    "unsharded",                  # format v1's chain: bytes + blosc + crc32c, no shards
    "zstd inside",                # an inner compressor it does not know
    "no index checksum",
    "index at start",
])
def test_direct_writer_refuses_a_chain_it_does_not_know(tmp_path, make):
    """Any codec chain but sharding_indexed[bytes + blosc + crc32c | bytes + crc32c, end] is
    refused with a StoreError naming the array and its chain."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    spec = SPECS[1]
    path = tmp_path / "atoms" / "features"
    if make == "unsharded":
        zarr.create_array(str(path), shape=(16, 4), chunks=(8, 4), dtype="float64",
                          compressors=codecs_for(spec))
        chain = "bytes + blosc + crc32c"
    else:
        inner = [BytesCodec(), BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                 Crc32cCodec()]
        index = [BytesCodec(), Crc32cCodec()]
        where = "end"
        if make == "zstd inside":
            inner = [BytesCodec(), ZstdCodec(level=3), Crc32cCodec()]
        elif make == "no index checksum":
            index = [BytesCodec()]
        else:
            where = "start"
        zarr.create_array(str(path), shape=(16, 4), chunks=(16, 4), dtype="float64",
                          serializer=ShardingCodec(chunk_shape=(8, 4), codecs=inner,
                                                   index_codecs=index, index_location=where),
                          compressors=None)
        chain = json.loads((path / "zarr.json").read_text())["codecs"][0]["name"]
    with pytest.raises(StoreError) as exc:
        open_direct(path)
    msg = str(exc.value)
    assert "atoms/features" in msg and chain in msg and "codec chain" in msg, msg
    if make != "unsharded":
        detail = {"zstd inside": "bytes + zstd + crc32c", "no index checksum": "index bytes at",
                  "index at start": "at start"}[make]
        assert detail in msg, msg


def test_text_arrays_are_left_to_zarr(tmp_path):
    spec = ArraySpec("structures/name", "str", fill="")
    zarr.create_array(str(tmp_path / "t"), shape=(4,), chunks=(2,), shards=(4,), dtype=str,
                      compressors=codecs_for(spec))
    assert open_direct(tmp_path / "t") is None


@pytest.mark.parametrize("blocks", [[5, 7, 1, 0, 9], [30], [8, 8], []])
def test_pair_stream_writes_what_it_is_given_across_chunk_boundaries(tmp_path, blocks):
    spec = SPECS[0]
    rows, base, capacity = 8, 16, 32
    arr = _make(tmp_path / "pairs" / "dfeatures", spec, 64, rows, shard=16)
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
    with pytest.raises(StoreError, match="not shard-aligned"):
        S.PairStream(tmp_path, spec, 8, capacity)


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
