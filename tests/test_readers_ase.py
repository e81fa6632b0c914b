"""The generic ``ase`` reader against the real extxyz and ASE JSON-db samples."""
import pickle

import ase.io
import numpy as np
import pytest

from gmp_pipeline.errors import SourceError
from gmp_pipeline.readers import open_reader

SAMPLES = __import__("pathlib").Path(__file__).parent / "data" / "samples"
XYZ = SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"


def test_extxyz_sample_matches_ase_io():
    r = open_reader("ase", XYZ)
    assert len(r) == 101 and set(r.n_atoms()) == {38}
    assert r.schema().has_energy and r.schema().has_forces
    for i in (0, 50, 100):
        ref = ase.io.read(XYZ, index=i)
        s = next(r.read(i, i + 1))
        assert s.source_index == i and s.info["frame_index"] == i
        assert np.array_equal(s.positions, ref.positions)
        assert np.array_equal(s.cell, ref.cell[:]) and s.pbc.all()
        assert s.energy == ref.get_potential_energy()
        assert np.array_equal(s.forces, ref.get_forces(apply_constraint=False))
        assert np.array_equal(s.atom_info["tags"], ref.get_tags())
        assert s.atom_info["fixed"].sum() == 18
    assert r.units["energy"] == "eV"
    r2 = pickle.loads(pickle.dumps(r))
    assert next(r2.read(100, 101)).energy == pytest.approx(8.35892145140813, abs=0)


def test_ase_json_db_sample():
    r = open_reader("ase", SAMPLES / "ase_db_json" / "atoms.json")
    assert len(r) == 1 and list(r.n_atoms()) == [34]
    s = next(r.read())
    assert s.energy == pytest.approx(-135.66393572, abs=0) and s.info["row_id"] == 1
    assert s.atom_info["fixed"].sum() > 0 and s.forces.shape == (34, 3)


def test_ase_energy_unit(tmp_path):
    r = open_reader("ase", XYZ, energy_unit="kcal/mol")
    s = next(r.read(0, 1))
    assert s.energy == pytest.approx(ase.io.read(XYZ, 0).get_potential_energy()
                                     / 0.04336410390059322, rel=1e-15)
    assert r.describe()["energy_conversion"]["to"] == "kcal/mol"


def test_ase_truncated_and_bad_frames(tmp_path):
    text = XYZ.read_text().splitlines(keepends=True)
    p = tmp_path / "cut.extxyz"
    p.write_text("".join(text[: 40 + 20]))
    with pytest.raises(SourceError, match=r"cut\.extxyz.*record 1, field 'atoms'"):
        len(open_reader("ase", p))
    q = tmp_path / "bad.extxyz"
    lines = text[:80]
    lines[40 + 5] = lines[40 + 5].replace("Cu", "Xx", 1)
    q.write_text("".join(lines))
    r = open_reader("ase", q, skip_bad_records=True)
    assert [s.source_index for s in r.read()] == [0]
    assert [i for i, _ in r.skipped] == [1]
    with pytest.raises(SourceError, match=r"record 1, field 'frame'"):
        list(open_reader("ase", q).read())
