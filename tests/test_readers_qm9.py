"""QM9 reader against the real dsgdb9nsd sample files and a hand-made tar.bz2 archive."""
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from gmp_pipeline.errors import InputError, SourceError
from gmp_pipeline.readers import open_reader

SAMPLES = __import__("pathlib").Path(__file__).parent / "data" / "samples" / "qm9"
HARTREE_EV = 27.211386024367243

# a hand-written linear molecule (CO2-like, 3 atoms, 3N-5 = 4 frequencies) with *^ exponents
LINEAR = """3
gdb 900001\t0.\t11.7\t11.7\t0.\t15.5\t-0.37\t-0.01\t0.36\t100.5\t0.011\t-188.5*^0\t-188.4\t-188.3\t-188.6\t6.9\t
C\t 0.\t 0.\t 1.5*^-7\t 0.5
O\t 0.\t 0.\t 1.16\t-0.25
O\t 0.\t 0.\t-1.16\t-0.25
667.1\t667.1\t1372.3\t2436.0
O=C=O\tO=C=O\t
InChI=1S/CO2/c2-1-3\tInChI=1S/CO2/c2-1-3
"""


def test_ch4_header_values():
    r = open_reader("qm9", SAMPLES)
    assert len(r) == 20
    s = next(r.read(0, 1))
    assert list(s.numbers) == [6, 1, 1, 1, 1]
    i = s.info
    assert i["gdb_index"] == 1 and i["file_name"] == "dsgdb9nsd_000001.xyz"
    expect = {"A": 157.7118, "B": 157.70997, "C": 157.70699, "mu": 0.0, "alpha": 13.21,
              "homo": -0.3877, "lumo": 0.1171, "gap": 0.5048, "r2": 35.3641, "zpve": 0.044749,
              "U0": -40.47893, "U": -40.476062, "H": -40.475117, "G": -40.498597, "Cv": 6.469}
    for k, v in expect.items():
        assert i[k] == v, k
    assert s.energy == -40.47893 and r.units["energy"] == "Hartree"
    assert r.units["energy_kind"] == "U0" and "forces" not in r.units
    assert s.forces is None and not s.pbc.any() and not s.cell.any()
    assert np.array_equal(s.positions[1], [0.002150416, -0.0060313176, 0.0019761204])
    assert np.array_equal(s.atom_info["charges"],
                          [-0.535689, 0.133921, 0.133922, 0.133923, 0.133923])
    assert i["n_frequencies"] == 9 and i["frequencies"].split()[0] == "1341.307"
    assert i["smiles_gdb"] == "C" and i["inchi_relaxed"] == "InChI=1S/CH4/h1H4"
    assert i["uncharacterized"] is False and i["linear"] is False


def test_all_samples_parse_and_atom_counts_match():
    r = open_reader("qm9", SAMPLES)
    counts = r.n_atoms()
    got = list(r.read())
    assert [len(s) for s in got] == list(counts)
    assert [s.info["gdb_index"] for s in got] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 5000, 5001,
                                                   5002, 5003, 5004, 5005, 100001, 100002,
                                                   100003, 100004]
    for s in got:
        n = len(s)
        assert s.info["n_frequencies"] in (3 * n - 6, 3 * n - 5)
    # acetylene (4) and HCN (5) are linear: A = 0 and 3N-5 frequencies
    for s in got[3:5]:
        assert s.info["linear"] and s.info["A"] == 0.0
        assert s.info["n_frequencies"] == 3 * len(s) - 5
    # *^ exponent in dsgdb9nsd_005005.xyz: oxygen z coordinate 7.9254*^-6
    s5005 = got[15]
    assert s5005.info["gdb_index"] == 5005 and s5005.numbers[7] == 8
    assert s5005.positions[7, 2] == 7.9254e-6


def test_energy_key_and_explicit_unit():
    r = open_reader("qm9", SAMPLES, energy_key="G", energy_unit="eV")
    s = next(r.read(0, 1))
    assert s.energy == pytest.approx(-40.498597 * HARTREE_EV, rel=1e-15)
    assert s.info["G"] == -40.498597  # info keeps the original unit
    assert r.units["energy"] == "eV" and r.units["energy_kind"] == "G"
    assert r.describe()["property_units"]["alpha"] == "Bohr^3"
    with pytest.raises(InputError):
        open_reader("qm9", SAMPLES, energy_key="mu")


@pytest.fixture
def archive(tmp_path):
    """A tar.bz2 in the release layout: flat dsgdb9nsd_*.xyz members (real files + a linear one)."""
    p = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    lin = tmp_path / "dsgdb9nsd_900001.xyz"
    lin.write_text(LINEAR)
    with tarfile.open(p, "w:bz2") as t:
        for f in sorted(SAMPLES.glob("dsgdb9nsd_*.xyz")):
            t.add(f, arcname=f.name)
        t.add(lin, arcname=lin.name)
    lin.unlink()
    return p


def test_archive_read_in_place(archive, tmp_path):
    r = open_reader("qm9", archive)
    d = open_reader("qm9", SAMPLES)
    assert len(r) == 21
    assert list(r.n_atoms()[:20]) == list(d.n_atoms()) and r.n_atoms()[20] == 3
    # any range, in any order, equals the directory reader
    for a, b in [(15, 17), (0, 2), (19, 21), (3, 4)]:
        for x, y in zip(r.read(a, min(b, 20)), d.read(a, min(b, 20))):
            y.info.pop("uncharacterized")  # the directory has the list next to it
            assert x.info == y.info and np.array_equal(x.positions, y.positions)
    lin = list(r.read(20, 21))[0]
    assert lin.info["gdb_index"] == 900001 and lin.info["linear"]
    assert lin.info["n_frequencies"] == 4 and lin.info["U0"] == -188.5
    assert lin.positions[0, 2] == 1.5e-7
    assert "uncharacterized" not in r.schema().info
    r2 = pickle.loads(pickle.dumps(r))
    assert [s.info["gdb_index"] for s in r2.read(10, 12)] == [5000, 5001]
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # nothing extracted


def test_exclude_uncharacterized(tmp_path):
    for f in SAMPLES.glob("dsgdb9nsd_00000*.xyz"):
        shutil.copy(f, tmp_path / f.name)
    lst = tmp_path / "uncharacterized.txt"
    lst.write_text("\n header\n =====\n  Index  SMILES\n =====\n     2 N N N 0.1\n"
                   "     7 CC CC CC 0.2\n =====\n")
    r = open_reader("qm9", tmp_path, exclude_uncharacterized=True)
    assert [s.info["gdb_index"] for s in r.read()] == [1, 3, 4, 5, 6, 8, 9]
    assert len(r) == 7
    keep = open_reader("qm9", tmp_path)
    flags = {s.info["gdb_index"]: s.info["uncharacterized"] for s in keep.read()}
    assert flags[2] and flags[7] and not flags[1]
    # the real list has 3,054 entries; of the 20 samples only 5003 is on it (its B3LYP SMILES
    # NC1=C(OC=CC1)[NH] differs from the GDB-17 one; SOURCES.md wrongly says none is)
    from gmp_pipeline.readers.qm9 import read_uncharacterized
    real = read_uncharacterized(SAMPLES / "uncharacterized.txt")
    assert len(real) == 3054 and 5003 in real
    r = open_reader("qm9", SAMPLES, exclude_uncharacterized=True)
    kept = [s.info["gdb_index"] for s in r.read()]
    assert len(r) == 19 and 5003 not in kept and kept[10:12] == [5000, 5001]
    with pytest.raises(InputError, match="uncharacterized"):
        len(open_reader("qm9", tmp_path / "nowhere.tar.bz2", exclude_uncharacterized=True))


# -- bad input ------------------------------------------------------------------------------

def _one(tmp_path, text, name="dsgdb9nsd_000001.xyz"):
    d = tmp_path / "q"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    return d


CH4 = (SAMPLES / "dsgdb9nsd_000001.xyz").read_text()


def test_truncated_molecule_file(tmp_path):
    d = _one(tmp_path, "\n".join(CH4.splitlines()[:5]))
    with pytest.raises(SourceError, match=r"dsgdb9nsd_000001\.xyz.*record 0.*field 'atoms'.*"
                                          r"truncated"):
        list(open_reader("qm9", d).read())


def test_non_numeric_property(tmp_path):
    d = _one(tmp_path, CH4.replace("-40.47893", "-40.4x893"))
    with pytest.raises(SourceError, match=r"record 0, field 'U0'.*non-numeric"):
        list(open_reader("qm9", d).read())


def test_atom_line_shape_mismatch(tmp_path):
    d = _one(tmp_path, CH4.replace("\t 0.133921\n", "\n"))
    with pytest.raises(SourceError, match=r"field 'atoms'.*4 fields"):
        list(open_reader("qm9", d).read())


def test_missing_property(tmp_path):
    d = _one(tmp_path, CH4.replace("\t6.469\t", "\t"))
    with pytest.raises(SourceError, match=r"field 'properties'.*16 fields"):
        list(open_reader("qm9", d).read())


def test_bad_records_skipped(tmp_path, caplog):
    d = _one(tmp_path, CH4)
    (d / "dsgdb9nsd_000002.xyz").write_text("oops\n")
    shutil.copy(SAMPLES / "dsgdb9nsd_000003.xyz", d)
    r = open_reader("qm9", d, skip_bad_records=True)
    with caplog.at_level("WARNING", logger="gmp_pipeline.readers"):
        assert [s.info["gdb_index"] for s in r.read()] == [1, 3]
    assert [i for i, _ in r.skipped] == [1] and "natoms" in r.skipped[0][1]
    assert "skipping bad record 1" in caplog.text


def test_truncated_archive(archive, tmp_path):
    raw = archive.read_bytes()
    cut = tmp_path / "cut.tar.bz2"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SourceError, match=r"cut\.tar\.bz2.*field 'archive'.*truncated or corrupt"):
        len(open_reader("qm9", cut))


def test_atomref_table_and_atomization_energy_of_methane():
    from gmp_pipeline.readers.qm9 import read_atomref

    ref = read_atomref(SAMPLES / "atomref.txt")
    assert sorted(ref) == [1, 6, 7, 8, 9]
    assert ref[1]["U0"] == -0.500273 and ref[9]["G"] == -99.733544 and ref[6]["Cv"] == 2.981
    ch4 = next(open_reader("qm9", SAMPLES).read(0, 1))
    assert list(ch4.numbers) == [6, 1, 1, 1, 1]
    atomization = ch4.info["U0"] - sum(ref[int(z)]["U0"] for z in ch4.numbers)
    assert atomization == pytest.approx(-40.47893 - (-37.846772 - 4 * 0.500273), abs=1e-9)
    assert atomization == pytest.approx(-0.631066, abs=1e-6)  # about -17.2 eV


def test_atomref_bad_values(tmp_path):
    from gmp_pipeline.readers.qm9 import read_atomref

    bad = tmp_path / "atomref.txt"
    bad.write_text("   H     0.000000     -0.5oops      -0.498857       -0.497912       -0.510927       2.981\n")
    with pytest.raises(SourceError, match=r"atomref.txt.*line 1.*'U0'.*non-numeric"):
        read_atomref(bad)
    short = tmp_path / "short.txt"
    short.write_text("   C     0.0  -37.8\n")
    with pytest.raises(SourceError, match="expected 7 columns"):
        read_atomref(short)


def test_nonfinite_position_and_missing_element_checks(tmp_path):
    """The task's two checks take a fast path for QM9 (one vectorised finiteness test, the
    five-element grammar); a bad molecule still gets the per-molecule error."""
    d = _one(tmp_path, CH4)
    shutil.copy(SAMPLES / "dsgdb9nsd_000003.xyz", d)
    bad = (SAMPLES / "dsgdb9nsd_000002.xyz").read_text().replace("-0.0404260543", "inf", 1)
    assert "inf" in bad
    (d / "dsgdb9nsd_000002.xyz").write_text(bad)
    r = open_reader("qm9", d, skip_bad_records=True)
    st = list(r.read())
    assert len(st) == 3
    kept = r.drop_nonfinite(st)
    assert [s.info["gdb_index"] for s in kept] == [1, 3]
    assert "positions" in r.skipped[-1][1] and "non-finite" in r.skipped[-1][1]
    assert r.drop_missing_elements(kept, lambda z: True, "psp x") == kept
    assert [s.info["gdb_index"] for s in r.drop_missing_elements(kept, lambda z: z != 8,
                                                                 "psp x")] == [1]
    assert "Z=8" in r.skipped[-1][1]
    with pytest.raises(SourceError, match=r"dsgdb9nsd_000002\.xyz.*record 1.*field 'positions'"):
        strict = open_reader("qm9", d)
        strict.drop_nonfinite(list(strict.read()))


def test_structures_are_canonical_on_every_parse_path(tmp_path):
    """The reader builds its Structures without __post_init__'s conversions, so every parse
    path (compiled batch, line by line, file by file) must give canonical arrays."""
    bad_batch = _one(tmp_path, CH4.replace("-40.47893", "-40.478930000000000001"))  # >15 digits
    for src in (SAMPLES, bad_batch):
        for s in open_reader("qm9", src).read():
            assert s.numbers.dtype == np.int64 and s.numbers.flags.c_contiguous
            assert s.positions.dtype == np.float64 and s.positions.shape == (len(s), 3)
            assert s.positions.flags.c_contiguous and s.cell.shape == (3, 3)
            assert s.pbc.dtype == bool and s.atom_info["charges"].shape == (len(s),)
    from gmp_pipeline.readers.qm9 import parse_qm9_text
    rec = parse_qm9_text(CH4, path="x", record=0)
    assert rec["positions"].flags.c_contiguous and rec["charges"].flags.c_contiguous
