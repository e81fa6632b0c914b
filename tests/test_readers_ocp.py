"""OCP readers: the real PyG2 LMDB sample, hand-made PyG1 LMDBs, both .aselmdb dialects and an
S2EF shard pair, plus the torch-free and refuse-malicious-pickle guarantees."""
import os
import pickle
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest

from gmp_pipeline.errors import SourceError
from gmp_pipeline.readers import open_reader
from gmp_pipeline.readers.ocp import _torchfree
from fixtures.ocp_writers import pyg_pickle, write_aselmdb, write_pyg_lmdb, write_s2ef_shard

SAMPLE = (__import__("pathlib").Path(__file__).parent / "data" / "samples" / "oc20_lmdb"
          / "pyg2_is2re_style" / "data.lmdb")
REPO = __import__("pathlib").Path(__file__).parent.parent


def test_pyg2_sample():
    r = open_reader("ocp", SAMPLE)
    assert type(r).__name__ == "LegacyLMDBReader" and r.name == "ocp"
    assert len(r) == 32
    d = r.describe()
    assert d["dialect"] == "PyG2 pickle" and d["energy_source_field"] == "y_relaxed"
    structs = list(r.read())
    from gmp_pipeline.readers.ocp import open_lmdb
    env = open_lmdb(SAMPLE)  # py-lmdb allows one environment per file and process
    for s in structs:
        assert s.info["sid"] == s.source_index == s.info["key"]  # sample: sid = key
        assert len(s) == r.n_atoms()[s.source_index]
        assert s.positions.dtype == np.float64 and s.pbc.all()
        assert not s.atom_info["fixed"].any() and not s.atom_info["tags"].any()
        assert s.energy == s.info["energy_relaxed"]
        assert s.forces is None and s.info["fid"] == -1
        # independent check of the decoded bytes: every stored edge is <= 6 Angstrom long
        with env.begin() as txn:
            a, _ = _torchfree.data_attributes(_torchfree.unpickle(
                txn.get(str(s.source_index).encode())))
        ei, off = a["edge_index"], a["cell_offsets"]
        vec = s.positions[ei[0]] - s.positions[ei[1]] + off @ s.cell
        assert 0 < np.linalg.norm(vec, axis=1).max() <= 6.0 + 1e-4
        assert a["natoms"] == len(s)
    assert 19 in {int(z) for s in structs for z in s.numbers}  # K adsorbates (see SOURCES.md)
    assert structs[0].energy == pytest.approx(-0.16493904000016357, abs=0)
    assert structs[0].info["energy_init"] == pytest.approx(-0.2039080399994333, abs=0)


def _s2ef_record(rng, n, sid, fid):
    return {"atomic_numbers": rng.choice([1, 6, 8, 29], n).astype(np.float32),
            "pos": rng.uniform(0, 10, (n, 3)).astype(np.float32),
            "cell": (np.eye(3, dtype=np.float32) * 10)[None],
            "natoms": n, "tags": rng.integers(0, 3, n), "fixed": (rng.random(n) < 0.3).astype(
                np.float32), "sid": sid, "fid": fid, "y": np.float64(rng.normal()),
            "force": rng.normal(size=(n, 3)).astype(np.float32)}


def test_pyg1_lmdb_fixture_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    recs = [_s2ef_record(rng, n, 1000 + i, i % 3) for i, n in enumerate([5, 9, 2, 7])]
    (tmp_path / "d").mkdir()
    write_pyg_lmdb(tmp_path / "d" / "data.0000.lmdb", recs[:3], layout="pyg1")
    write_pyg_lmdb(tmp_path / "d" / "data.0001.lmdb", recs[3:], layout="pyg1", length_key=False)
    r = open_reader("ocp", tmp_path / "d")
    assert len(r) == 4 and list(r.n_atoms()) == [5, 9, 2, 7]
    assert r.describe()["dialect"] == "PyG1 pickle"
    assert r.describe()["records_per_file"] == [3, 1]
    assert r.schema().has_forces and "energy" in r.schema().info
    assert "referenced if the LMDB was built with --ref-energy" in r.units["energy_kind"]
    got = list(r.read(1, 4))
    for s, rec in zip(got, recs[1:]):
        assert np.array_equal(s.numbers, rec["atomic_numbers"].astype(int))
        assert np.array_equal(s.positions, rec["pos"].astype(np.float64))
        assert np.array_equal(s.forces, rec["force"].astype(np.float64))
        assert np.array_equal(s.cell, rec["cell"][0])
        assert s.energy == rec["y"] == s.info["energy"]
        assert s.info["sid"] == rec["sid"] and s.info["fid"] == rec["fid"]
        assert np.array_equal(s.atom_info["tags"], rec["tags"])
        assert np.array_equal(s.atom_info["fixed"], rec["fixed"] == 1)
    assert got[2].info["file_name"] == "data.0001.lmdb" and got[2].info["key"] == 0
    # pickles cheaply and reopens lazily
    r2 = pickle.loads(pickle.dumps(r))
    assert next(r2.read(3, 4)).info["sid"] == 1003


def test_pyg1_is2rs_fields_and_energy_key(tmp_path):
    rec = _s2ef_record(np.random.default_rng(2), 4, 5, 0)
    for k in ("y", "force", "fid"):
        rec.pop(k)
    rec.update(y_init=np.float64(0.5), y_relaxed=-1.25, pos_relaxed=rec["pos"] + 1)
    write_pyg_lmdb(tmp_path / "is2re.lmdb", [rec], layout="pyg2")
    r = open_reader("ocp", tmp_path / "is2re.lmdb", energy_key="y_init", energy_kind="referenced")
    s = next(r.read())
    assert s.energy == 0.5 and s.info["energy_relaxed"] == -1.25
    assert np.array_equal(s.atom_info["pos_relaxed"], rec["pos_relaxed"].astype(np.float64))
    assert r.units["energy_kind"] == "referenced"
    assert r.schema().atom_info["pos_relaxed"].shape == (3,)


def test_reads_where_importing_torch_fails(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules['torch'] = None            # 'import torch' now raises ImportError
        sys.modules['torch_geometric'] = None
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit('torch importable')
        from gmp_pipeline.readers import open_reader
        r = open_reader('ocp', {str(SAMPLE)!r})
        structs = list(r.read())
        assert len(structs) == 32 and structs[31].info['sid'] == 31
        print('OK', sum(len(s) for s in structs))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK ")


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    calls = []
    blob = pickle.dumps({"pos": _Evil(f"touch {marker}")}, protocol=4)
    assert b"system" in blob
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))  # would record a call
    env = lmdb.open(str(tmp_path / "evil.lmdb"), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", pyg_pickle({"atomic_numbers": np.ones(1, np.float32),
                                  "pos": np.zeros((1, 3), np.float32),
                                  "cell": np.eye(3, dtype=np.float32)[None]}))
        txn.put(b"1", blob)
    env.close()
    r = open_reader("ocp", tmp_path / "evil.lmdb", format="lmdb")
    with pytest.raises(SourceError, match=r"record 1.*os\.system|record 1.*posix\.system"):
        list(r.read())
    assert calls == [] and not marker.exists()
    # builtins.eval / exec are refused too
    with pytest.raises(_torchfree.RefusedGlobal):
        _torchfree.unpickle(b"\x80\x04cbuiltins\neval\n(S'1+1'\ntR.")
    assert calls == [] and not marker.exists()


def _row(n, i):
    rng = np.random.default_rng(i)
    return {"numbers": np.array([29] * (n - 1) + [8]), "positions": rng.uniform(0, 5, (n, 3)),
            "cell": np.diag([5.0, 5.0, 20.0]), "pbc": np.array([True, True, True]),
            "unique_id": f"{i:032x}", "tags": np.array([0] * (n - 1) + [2]),
            "constraints": [{"name": "FixAtoms", "kwargs": {"indices": [0, 1]}}],
            "energy": -10.0 - i, "free_energy": -10.5 - i, "forces": rng.normal(size=(n, 3)),
            "stress": np.arange(6.0) * (i + 1), "key_value_pairs": {"sid": 70 + i},
            "data": {"fid": i, "note": "x"}, "ctime": 24.0, "mtime": 24.0, "user": "u",
            "calculator": "singlepoint"}


@pytest.mark.parametrize("dialect", ["ase", "orjson"])
def test_aselmdb_dialects(tmp_path, dialect):
    rows = [_row(3, 0), _row(4, 1), _row(5, 2)]
    p = tmp_path / "data.0000.aselmdb"
    write_aselmdb(p, rows, dialect=dialect, deleted_ids=[2])
    r = open_reader("ocp", p)
    assert type(r).__name__ == "AseLMDBReader"
    assert len(r) == 2 and list(r.n_atoms()) == [3, 5]
    assert ("orjson" in r.describe()["dialect"]) == (dialect == "orjson")
    got = list(r.read())
    for s, row, rid in zip(got, [rows[0], rows[2]], [1, 3]):
        assert np.array_equal(s.positions, row["positions"])
        assert np.array_equal(s.forces, row["forces"]) and s.energy == row["energy"]
        assert np.array_equal(s.cell, row["cell"]) and s.pbc.all()
        assert s.info["row_id"] == rid and s.info["sid"] == row["key_value_pairs"]["sid"]
        assert s.info["fid"] == row["data"]["fid"] and s.info["note"] == "x"
        assert s.info["free_energy"] == row["free_energy"]
        assert s.info["stress_xy"] == row["stress"][5]
        assert list(s.atom_info["fixed"]) == [True, True] + [False] * (len(s) - 2)
        assert list(s.atom_info["tags"]) == list(row["tags"])


def test_aselmdb_sample_row_encoding(tmp_path):
    """The real ASE JSON row (fairchem's atoms.json) put into an .aselmdb value unchanged."""
    import json
    import zlib
    raw = json.loads((REPO / "tests/data/samples/ase_db_json/atoms.json").read_text())
    row = raw["1"]
    env = lmdb.open(str(tmp_path / "s.aselmdb"), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"1", zlib.compress(json.dumps(row).encode()))
        txn.put(b"nextid", zlib.compress(b"2"))
    env.close()
    s = next(open_reader("ocp", tmp_path / "s.aselmdb").read())
    assert len(s) == 34 and s.energy == pytest.approx(-135.66393572, abs=0)
    assert s.atom_info["fixed"].sum() == len(row["constraints"][0]["kwargs"]["indices"])
    assert s.cell[2, 2] == pytest.approx(39.37850739)


def _frames(rng, sizes):
    out = []
    for n in sizes:
        out.append({"numbers": rng.choice([1, 6, 29], n), "positions": rng.uniform(0, 9, (n, 3)),
                    "cell": np.diag([9.0, 9.0, 30.0]), "fixed": rng.random(n) < 0.4,
                    "tags": rng.integers(0, 3, n), "forces": rng.normal(size=(n, 3)),
                    "energy": float(rng.normal(-300, 5)), "free_energy": float(rng.normal(-300, 5))})
    return out


def test_s2ef_shard_pair(tmp_path):
    rng = np.random.default_rng(3)
    f0, f1 = _frames(rng, [4, 6, 3]), _frames(rng, [5])
    write_s2ef_shard(tmp_path, "0", f0, ["random11,frame0,-290.5", "random12,frame7,-280.25",
                                         "random13,frame1,-270"])
    write_s2ef_shard(tmp_path, "1", f1, ["random99,frame3,-1.5"])
    r = open_reader("ocp", tmp_path)
    assert type(r).__name__ == "S2EFExtxyzReader"
    assert len(r) == 4 and list(r.n_atoms()) == [4, 6, 3, 5]
    got = list(r.read(1, 4))
    for s, fr in zip(got, f0[1:] + f1):
        assert np.allclose(s.positions, fr["positions"], atol=5e-9, rtol=0)
        assert np.allclose(s.forces, fr["forces"], atol=5e-9, rtol=0)
        assert np.array_equal(s.numbers, fr["numbers"])
        assert np.array_equal(s.atom_info["fixed"], fr["fixed"])
        assert np.array_equal(s.atom_info["tags"], fr["tags"])
        assert s.energy == fr["energy"] == s.info["energy"]
        assert s.info["free_energy"] == fr["free_energy"]
    assert got[0].info["sid"] == 12 and got[0].info["fid"] == 7
    assert got[0].info["reference_energy"] == -280.25
    assert got[2].info["sid"] == 99 and got[2].info["file_name"] == "1.extxyz.xz"
    ref = open_reader("ocp", tmp_path, energy_target="referenced")
    s = next(ref.read(1, 2))
    assert s.energy == f0[1]["energy"] - (-280.25)
    assert ref.units["energy_kind"].startswith("referenced")


def test_ocp_extxyz_sample_matches_ase():
    import ase.io
    p = REPO / "tests/data/samples/extxyz/toy_c3h8_relax.extxyz"
    r = open_reader("ocp", p)
    assert len(r) == 101
    ref = ase.io.read(p, index="37")
    s = next(r.read(37, 38))
    assert np.array_equal(s.positions, ref.positions) and s.energy == ref.get_potential_energy()
    # raw forces: ASE's get_forces() would zero the fixed atoms
    assert np.array_equal(s.forces, ref.get_forces(apply_constraint=False))
    assert s.atom_info["fixed"].sum() == 18 and np.array_equal(s.atom_info["tags"],
                                                               ref.get_tags())


# -- bad input ------------------------------------------------------------------------------

def _lmdb_with(tmp_path, values, name="bad.lmdb"):
    env = lmdb.open(str(tmp_path / name), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, v in enumerate(values):
            txn.put(str(i).encode(), v)
    env.close()
    return tmp_path / name


GOOD = {"atomic_numbers": np.array([8, 1], np.float32), "pos": np.zeros((2, 3), np.float32),
        "cell": np.eye(3, dtype=np.float32)[None], "y": 1.0}


def test_lmdb_truncated_file(tmp_path):
    p = write_pyg_lmdb(tmp_path / "t.lmdb", [GOOD] * 50) and tmp_path / "t.lmdb"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SourceError, match=r"t\.lmdb.*truncated"):
        len(open_reader("ocp", p, format="lmdb"))


def test_lmdb_undecodable_record(tmp_path):
    good = pyg_pickle(GOOD)
    p = _lmdb_with(tmp_path, [good, good[: len(good) // 2], good])
    with pytest.raises(SourceError, match=r"bad\.lmdb.*record 1, field 'pickle'.*undecodable"):
        list(open_reader("ocp", p).read())


def test_lmdb_missing_key(tmp_path):
    rec = dict(GOOD)
    del rec["pos"]
    p = _lmdb_with(tmp_path, [pyg_pickle(GOOD), pyg_pickle(rec)])
    with pytest.raises(SourceError, match=r"record 1, field 'pos'.*missing key"):
        list(open_reader("ocp", p).read())


def test_lmdb_non_numeric_field(tmp_path):
    rec = dict(GOOD, y="abc")
    p = _lmdb_with(tmp_path, [pyg_pickle(GOOD), pyg_pickle(rec)])
    with pytest.raises(SourceError, match=r"record 1, field 'y'.*expected one number"):
        list(open_reader("ocp", p).read())


def test_lmdb_shape_mismatch(tmp_path):
    rec = dict(GOOD, pos=np.zeros((3, 3), np.float32))
    p = _lmdb_with(tmp_path, [pyg_pickle(GOOD), pyg_pickle(rec)])
    with pytest.raises(SourceError, match=r"record 1, field 'pos'.*shape \(3, 3\).*2 atoms"):
        list(open_reader("ocp", p).read())


def test_lmdb_skip_bad_records(tmp_path, caplog):
    good = pyg_pickle(GOOD)
    p = _lmdb_with(tmp_path, [good, b"garbage", pyg_pickle(dict(GOOD, pos=np.zeros((1, 3)))),
                              good])
    r = open_reader("ocp", p, skip_bad_records=True)
    with caplog.at_level("WARNING", logger="gmp_pipeline.readers"):
        assert [s.source_index for s in r.read()] == [0, 3]
    assert [i for i, _ in r.skipped] == [1, 2]
    assert "skipping bad record 1" in caplog.text


def test_aselmdb_corrupt_row(tmp_path):
    p = tmp_path / "c.aselmdb"
    write_aselmdb(p, [_row(3, 0), _row(3, 1)])
    env = lmdb.open(str(p), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"2", b"not zlib")
    env.close()
    with pytest.raises(SourceError, match=r"c\.aselmdb.*record 2, field 'row'.*undecodable"):
        list(open_reader("ocp", p).read())


def test_s2ef_truncated_shard_and_count_mismatch(tmp_path):
    rng = np.random.default_rng(4)
    xyz, txt = write_s2ef_shard(tmp_path, "0", _frames(rng, [4, 4]),
                                ["random1,frame0,0.0", "random1,frame1,0.0"])
    raw = open(xyz, "rb").read()
    open(xyz, "wb").write(raw[: len(raw) - 40])
    with pytest.raises(SourceError, match=r"0\.extxyz\.xz.*truncated or corrupt"):
        len(open_reader("ocp", tmp_path))
    write_s2ef_shard(tmp_path, "0", _frames(rng, [4, 4]), ["random1,frame0,0.0"])
    with pytest.raises(SourceError, match=r"field 'txt'.*2 frames but.*1 lines"):
        len(open_reader("ocp", tmp_path))


def test_s2ef_non_numeric_and_shape(tmp_path):
    p = tmp_path / "0.extxyz"
    good = ('2\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3 energy=1.0 '
            'pbc="T T T"\nH 0 0 0\nH 0 0 0.7\n')
    p.write_text(good + good.replace("0.7", "zz"))
    with pytest.raises(SourceError, match=r"record 1, field 'pos'.*non-numeric"):
        list(open_reader("ocp", p).read())
    p.write_text(good + good.replace("H 0 0 0.7", "H 0 0"))
    with pytest.raises(SourceError, match=r"record 1, field 'atoms'.*3 columns"):
        list(open_reader("ocp", p).read())
