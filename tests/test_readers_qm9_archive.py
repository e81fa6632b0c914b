"""QM9 archive staging (one decompression pass per run, gdb order whatever the member order,
scratch cleaned up) and the batch parser (same records as the per-file parser, same errors)."""
from __future__ import annotations

import gc
import io
import os
import pickle
import random
import tarfile

import numpy as np
import pytest

from gmp_pipeline.errors import SourceError
from gmp_pipeline.readers import _qm9_archive as A
from gmp_pipeline.readers import open_reader
from gmp_pipeline.readers._qm9_text import NotParsed, parse_batch
from gmp_pipeline.readers.qm9 import parse_qm9_text

SAMPLES = __import__("pathlib").Path(__file__).parent / "data" / "samples" / "qm9"
FILES = sorted(SAMPLES.glob("dsgdb9nsd_*.xyz"))


def _archive(path, files, mode="w:bz2", shuffle_seed=None, prefix=""):
    files = list(files)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    with tarfile.open(path, mode) as t:
        if prefix:
            d = tarfile.TarInfo(prefix.rstrip("/"))
            d.type = tarfile.DIRTYPE
            t.addfile(d)
        for f in files:
            t.add(f, arcname=prefix + f.name)
    return path


def _stage_dirs(root):
    return sorted(p for p in os.listdir(root) if p.startswith(A.PREFIX))


def test_unsorted_archive_reads_in_gdb_order_and_equals_directory(tmp_path):
    arc = _archive(tmp_path / "shuffled.tar.bz2", FILES, shuffle_seed=3, prefix="dsgdb9nsd/")
    with tarfile.open(arc) as t:
        order = [n for n in t.getnames() if n.endswith(".xyz")]
    assert order != sorted(order)  # really unsorted
    r = open_reader("qm9", arc, scratch_dir=tmp_path / "scratch")
    d = open_reader("qm9", SAMPLES)
    assert len(r) == len(d) == 20
    assert np.array_equal(r.n_atoms(), d.n_atoms())
    got, ref = list(r.read()), list(d.read())
    assert [s.info["gdb_index"] for s in got] == [s.info["gdb_index"] for s in ref]
    for x, y in zip(got, ref):
        y.info.pop("uncharacterized")
        assert x.info == y.info and x.source_index == y.source_index
        assert np.array_equal(x.positions, y.positions)
        assert np.array_equal(x.atom_info["charges"], y.atom_info["charges"])
    r.close()


def test_one_decompression_pass_for_len_atoms_and_reads_in_any_order(tmp_path):
    arc = _archive(tmp_path / "a.tar.bz2", FILES)
    scratch = tmp_path / "scratch"
    before = A.passes
    r = open_reader("qm9", arc, scratch_dir=scratch)
    for _ in range(3):
        assert len(r) == 20
    r.n_atoms()
    for a, b in [(15, 17), (0, 2), (19, 20), (3, 4), (0, 20)]:
        assert [s.source_index for s in r.read(a, b)] == list(range(a, b))
    # copies (what Dask workers get) read the staged members, they do not decompress
    clone = pickle.loads(pickle.dumps(r))
    assert len(pickle.dumps(r)) < 5000  # paths and options, not the index
    assert [s.info["gdb_index"] for s in clone.read(10, 12)] == [5000, 5001]
    assert len(clone) == 20
    assert A.passes - before == 1
    assert len(_stage_dirs(scratch)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.bz2", "scratch"]
    # pickling a fresh reader stages first, so that the copies share one staging
    fresh = open_reader("qm9", arc, scratch_dir=scratch)
    c2 = pickle.loads(pickle.dumps(fresh))
    assert len(c2) == 20 and A.passes - before == 2
    r.close()
    fresh.close()
    assert _stage_dirs(scratch) == []


def test_scratch_removed_on_close_collection_and_stale_owner(tmp_path):
    arc = _archive(tmp_path / "a.tar.bz2", FILES[:3])
    scratch = tmp_path / "scratch"
    r = open_reader("qm9", arc, scratch_dir=scratch)
    len(r)
    assert len(_stage_dirs(scratch)) == 1
    del r
    gc.collect()
    assert _stage_dirs(scratch) == []
    # a directory left by a process that no longer exists goes at the next staging
    dead = scratch / f"{A.PREFIX}999999999-x"
    dead.mkdir()
    r = open_reader("qm9", arc, scratch_dir=scratch)
    len(r)
    assert not dead.exists() and len(_stage_dirs(scratch)) == 1
    # scratch_dir is where, not what: it is not part of the options (the store fingerprint)
    assert "scratch_dir" not in r.describe()["options"]
    r.close()


def test_worker_that_cannot_see_the_staging_restages_with_a_warning(tmp_path, caplog):
    arc = _archive(tmp_path / "a.tar.bz2", FILES[:4])
    r = open_reader("qm9", arc, scratch_dir=tmp_path / "s1")
    len(r)
    blob = pickle.dumps(r)
    r.close()  # the staging is gone, as on a node that does not see it
    w = pickle.loads(blob)
    w._scratch_dir = str(tmp_path / "s2")
    with caplog.at_level("WARNING", logger="gmp_pipeline.readers"):
        assert [s.info["gdb_index"] for s in w.read(2, 4)] == [3, 4]
    assert "decompressing the archive again" in caplog.text
    w.close()


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w"])
def test_other_compressions_and_plain_tar(tmp_path, mode):
    arc = _archive(tmp_path / "a.tar", FILES[:5], mode=mode)
    r = open_reader("qm9", arc, scratch_dir=tmp_path / "s")
    assert [s.info["gdb_index"] for s in r.read()] == [1, 2, 3, 4, 5]
    r.close()


def test_corrupt_archive_names_file_and_field(tmp_path):
    arc = _archive(tmp_path / "a.tar.bz2", FILES)
    raw = arc.read_bytes()
    bad = tmp_path / "flipped.tar.bz2"
    bad.write_bytes(raw[:2000] + bytes(b ^ 0xFF for b in raw[2000:2100]) + raw[2100:])
    with pytest.raises(SourceError, match=r"flipped\.tar\.bz2.*field 'archive'.*corrupt"):
        len(open_reader("qm9", bad, scratch_dir=tmp_path / "s"))
    assert _stage_dirs(tmp_path / "s") == []  # a failed staging leaves nothing


def test_batch_parser_equals_per_file_parser_on_every_sample():
    blobs = [f.read_bytes() for f in FILES]
    fast = parse_batch(blobs)
    for f, b, rec in zip(FILES, blobs, fast):
        ref = parse_qm9_text(b.decode(), path=str(f), record=0)
        assert rec["info"] == ref["info"], f.name
        for k in ("numbers", "positions", "charges"):
            assert np.array_equal(rec[k], ref[k]) and rec[k].dtype == ref[k].dtype, (f.name, k)
    assert fast[15]["positions"][7, 2] == 7.9254e-6  # the *^ exponent of 005005
    crlf = [b.replace(b"\n", b"\r\n") for b in blobs]
    assert [r["info"] for r in parse_batch(crlf)] == [r["info"] for r in fast]


@pytest.mark.parametrize("edit", [
    lambda t: t.replace(b"-40.47893", b"-40.4x893"),           # non-numeric property
    lambda t: t.replace(b"\t 0.133921\n", b"\n"),              # short atom line
    lambda t: t.replace(b"\t6.469\t", b"\t"),                  # missing property
    lambda t: t.replace(b"\nC\t", b"\nCl\t", 1),               # unknown element
    lambda t: b"\n".join(t.split(b"\n")[:5]),                  # truncated
    lambda t: t.replace(b"1341.307\t", b""),                   # frequency count
    lambda t: t.replace(b"1341.307", b"13x41"),                # non-numeric frequency
    lambda t: t.replace(b"C\tC\t\n", b"C\n"),                  # one SMILES
    lambda t: t.replace(b"gdb 1\t", b"gdb x\t"),               # index
])
def test_batch_parser_refuses_what_the_per_file_parser_refuses(edit):
    good = [f.read_bytes() for f in FILES[1:4]]
    bad = edit(FILES[0].read_bytes())
    with pytest.raises(SourceError):
        parse_qm9_text(bad.decode(), path="x", record=0)
    with pytest.raises(NotParsed):
        parse_batch(good + [bad])


def test_bad_file_in_a_batch_reported_by_file_record_and_field(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    for f in FILES:
        (d / f.name).write_bytes(f.read_bytes())
    p = d / "dsgdb9nsd_005001.xyz"
    p.write_bytes(p.read_bytes().replace(b"-0.2044", b"-0.2x44", 1)
                  if b"-0.2044" in p.read_bytes() else p.read_bytes().replace(b"\t", b"\tx", 1))
    with pytest.raises(SourceError, match=r"dsgdb9nsd_005001\.xyz.*record 11.*field"):
        list(open_reader("qm9", d).read())
    r = open_reader("qm9", d, skip_bad_records=True)
    got = [s.info["gdb_index"] for s in r.read()]
    assert 5001 not in got and len(got) == 19 and [i for i, _ in r.skipped] == [11]


@pytest.mark.parametrize("old,new", [
    (b"-0.0126981359", b"-0.01269813591234567"),   # 16 significant digits: numpy path
    (b"157.7118", b"1.577118e2"),                  # e exponent
    (b"-0.535689", b"-5.35689*^-1"),               # Mathematica exponent
    (b"157.70997", b"nan"),                        # what float() takes, numpy path
])
def test_batch_parser_number_paths_give_float_values(old, new):
    """Compiled scanner (<= 15 digits, |exponent| <= 22) and numpy fallback: the same doubles
    as Python's float()."""
    blobs = [f.read_bytes() for f in FILES]
    blobs[0] = blobs[0].replace(old, new, 1)
    assert new in blobs[0]
    fast = parse_batch(blobs)
    for b, rec in zip(blobs, fast):
        ref = parse_qm9_text(b.decode(), path="x", record=0)
        assert np.array_equal(rec["positions"], ref["positions"])
        assert np.array_equal(rec["charges"], ref["charges"])
        assert {k: v for k, v in rec["info"].items() if k != "B"} == \
            {k: v for k, v in ref["info"].items() if k != "B"}
        assert np.array_equal([rec["info"]["B"]], [ref["info"]["B"]], equal_nan=True)


def test_archive_excludes_uncharacterized(tmp_path):
    import shutil

    arc = _archive(tmp_path / "a.tar.bz2", FILES, shuffle_seed=1)
    shutil.copy(SAMPLES / "uncharacterized.txt", tmp_path / "uncharacterized.txt")
    r = open_reader("qm9", arc, exclude_uncharacterized=True, scratch_dir=tmp_path / "s")
    got = [s.info["gdb_index"] for s in r.read()]
    assert len(r) == 19 and 5003 not in got and got == sorted(got)
    assert list(r.n_atoms()) == [len(s) for s in r.read()]
    clone = pickle.loads(pickle.dumps(r))
    assert [s.info["gdb_index"] for s in clone.read(12, 14)] == got[12:14]
    r.close()
