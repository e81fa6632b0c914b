"""MD17 and rMD17 readers against the real sample npz files (values read with np.load)."""
import pickle
import zipfile

import numpy as np
import pytest

from gmp_pipeline.errors import InputError, SourceError
from gmp_pipeline.readers import get_reader_class, open_reader, reader_names

SAMPLES = __import__("pathlib").Path(__file__).parent / "data" / "samples"
MD17 = SAMPLES / "md17" / "ethanol.npz"
RMD17 = SAMPLES / "rmd17" / "rmd17_ethanol_train_01.npz"
KCAL_TO_EV = 0.04336410390059322


def test_registry_has_all_formats():
    assert {"md17", "rmd17", "qm9", "ocp", "ase"} <= set(reader_names())
    assert get_reader_class("md17").name == "md17"
    with pytest.raises(InputError):
        get_reader_class("nope")


def test_md17_sample_matches_np_load():
    ref = np.load(MD17)
    r = open_reader("md17", MD17)
    assert len(r) == 2000 and ref["E"].shape == (2000, 1)
    assert np.array_equal(r.n_atoms(), np.full(2000, 9))
    got = list(r.read(1995, 2000))
    assert [s.source_index for s in got] == [1995, 1996, 1997, 1998, 1999]
    for s in got:
        i = s.source_index
        assert s.energy == ref["E"][i, 0]
        assert np.array_equal(s.positions, ref["R"][i]) and s.positions.dtype == np.float64
        assert np.array_equal(s.forces, ref["F"][i])
        assert np.array_equal(s.numbers, [6, 6, 8, 1, 1, 1, 1, 1, 1])
        assert not s.pbc.any() and not s.cell.any()
        assert s.info == {"molecule": "ethanol", "frame_index": i}
    # the magnitude documented for MD17 ethanol
    assert -97300 < got[0].energy < -97100
    assert r.units == {"length": "Angstrom", "energy": "kcal/mol",
                       "forces": "kcal/mol/Angstrom", "energy_kind": "total"}
    assert r.schema().as_dict()["info"] == {"molecule": "str", "frame_index": "int64"}


def test_md17_is_memory_mapped_and_pickles_small():
    r = open_reader("md17", MD17)
    next(r.read(0, 1))
    assert isinstance(r._npz.array("R"), np.memmap)
    blob = pickle.dumps(r)
    assert len(blob) < 4000
    r2 = pickle.loads(blob)
    assert "_npz" not in r2.__dict__
    assert next(r2.read(7, 8)).energy == np.load(MD17)["E"][7, 0]


def test_md17_energy_unit_conversion_is_explicit_and_recorded():
    ref = np.load(MD17)
    r = open_reader("md17", MD17, energy_unit="eV")
    s = next(r.read(3, 4))
    assert s.energy == pytest.approx(ref["E"][3, 0] * KCAL_TO_EV, rel=1e-15)
    assert np.allclose(s.forces, ref["F"][3] * KCAL_TO_EV, rtol=1e-15)
    assert r.units["energy"] == "eV" and r.units["forces"] == "eV/Angstrom"
    d = r.describe()
    assert d["options"]["energy_unit"] == "eV"
    assert d["energy_conversion"]["factor"] == KCAL_TO_EV
    with pytest.raises(InputError):
        open_reader("md17", MD17, energy_unit="furlong")


def test_rmd17_sample_matches_np_load_and_md17():
    ref = np.load(RMD17)
    r = open_reader("rmd17", RMD17)
    assert len(r) == 1000 and r.units["energy"] == "kcal/mol"
    structs = list(r.read(0, 1000))
    assert len(structs) == 1000
    for s in structs[::97]:
        i = s.source_index
        assert s.energy == ref["energies"][i]
        assert np.array_equal(s.positions, ref["coords"][i])
        assert np.array_equal(s.forces, ref["forces"][i])
        assert s.info["old_index"] == ref["old_indices"][i]
        assert s.info["old_energy"] == ref["old_energies"][i]
        assert s.info["molecule"] == "ethanol" and s.info["frame_index"] == i
    # frames that are also in the MD17 excerpt have the same coordinates (independent file)
    md = np.load(MD17)
    shared = [s for s in structs if s.info["old_index"] < 2000]
    assert shared
    for s in shared:
        assert np.array_equal(s.positions, md["R"][s.info["old_index"]])
        assert s.info["old_energy"] == md["E"][s.info["old_index"], 0]
        assert abs(s.energy - s.info["old_energy"]) > 50  # different level of theory


def test_rmd17_old_forces_and_split_file(tmp_path):
    ref = np.load(RMD17)
    split = tmp_path / "index_train_01.csv"
    split.write_text("5\n2\n999\n")
    r = open_reader("rmd17", RMD17, split_file=split, include_old_forces=True)
    assert len(r) == 3 and np.array_equal(r.n_atoms(), [9, 9, 9])
    got = list(r.read())
    assert [s.source_index for s in got] == [0, 1, 2]
    assert [s.info["frame_index"] for s in got] == [5, 2, 999]
    assert got[2].energy == ref["energies"][999]
    assert np.array_equal(got[1].atom_info["old_forces"], ref["old_forces"][2])
    assert r.schema().as_dict()["atom_info"] == {"old_forces": ["float64", [3]]}
    bad = tmp_path / "bad.csv"
    bad.write_text("1\nx\n")
    with pytest.raises(SourceError, match="record 2.*'index'.*non-numeric"):
        len(open_reader("rmd17", RMD17, split_file=bad))


def _write_npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _md17_arrays(m=4, n=3):
    rng = np.random.default_rng(0)
    return {"R": rng.normal(size=(m, n, 3)), "z": np.array([8, 1, 1], np.uint8)[:n],
            "E": rng.normal(size=(m, 1)), "F": rng.normal(size=(m, n, 3))}


def test_md17_deflated_npz_and_metadata(tmp_path):
    a = _md17_arrays()
    p = _write_npz(tmp_path / "w.npz", compressed=True, name=np.array("water"),
                   theory=np.array("PBE"), e_unit=np.array("eV"), r_unit=np.array("Ang"), **a)
    r = open_reader("md17", p)
    s = list(r.read())
    assert [x.energy for x in s] == list(a["E"][:, 0])
    assert r.units["energy"] == "eV"  # the file says eV: recorded, not converted
    d = r.describe()
    assert d["molecule"] == "water" and d["metadata"]["theory"] == "PBE"
    assert d["deflated_members_loaded_whole"] == ["E", "F", "R"]


# -- bad input: one test per failure kind -----------------------------------------------------

def test_md17_missing_key(tmp_path):
    a = _md17_arrays()
    del a["F"]
    p = _write_npz(tmp_path / "m.npz", **a)
    with pytest.raises(SourceError, match=r"m\.npz.*field 'F'.*missing key"):
        len(open_reader("md17", p))


def test_md17_shape_mismatch(tmp_path):
    a = _md17_arrays()
    a["z"] = np.array([8, 1], np.uint8)
    p = _write_npz(tmp_path / "s.npz", **a)
    with pytest.raises(SourceError, match=r"field 'z'.*does not match 3 atoms"):
        len(open_reader("md17", p))


def test_md17_non_numeric(tmp_path):
    a = _md17_arrays()
    a["E"] = np.array([["a"], ["b"], ["c"], ["d"]])
    p = _write_npz(tmp_path / "n.npz", **a)
    with pytest.raises(SourceError, match=r"field 'E'.*non-numeric"):
        len(open_reader("md17", p))


def test_md17_truncated_file(tmp_path):
    data = MD17.read_bytes()
    p = tmp_path / "t.npz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"t\.npz"):
        r = open_reader("md17", p)
        list(r.read(1990, 2000))


def test_md17_corrupt_zip_member(tmp_path):
    a = _md17_arrays()
    p = _write_npz(tmp_path / "c.npz", compressed=True, **a)
    raw = bytearray(p.read_bytes())
    info = zipfile.ZipFile(p).getinfo("R.npy")
    start = info.header_offset + 30 + len("R.npy") + 5
    raw[start:start + 40] = b"\x00" * 40
    p.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=r"c\.npz"):
        list(open_reader("md17", p).read())


def test_md17_non_finite_record_skipped_and_logged(tmp_path, caplog):
    a = _md17_arrays()
    a["R"][2, 1, 0] = np.nan
    p = _write_npz(tmp_path / "f.npz", **a)
    with pytest.raises(SourceError, match=r"record 2, field 'R'.*non-finite"):
        list(open_reader("md17", p).read())
    r = open_reader("md17", p, skip_bad_records=True)
    with caplog.at_level("WARNING", logger="gmp_pipeline.readers"):
        got = [s.source_index for s in r.read()]
    assert got == [0, 1, 3]
    assert [i for i, _ in r.skipped] == [2] and "non-finite" in r.skipped[0][1]
    assert "skipping bad record 2" in caplog.text


def test_md17_range_checks():
    r = open_reader("md17", MD17)
    with pytest.raises(InputError):
        list(r.read(5, 2001))
    assert list(r.read(10, 10)) == []
