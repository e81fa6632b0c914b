"""Per-atom vector extras reach the store with their shape, through the CLI (issue 10): OC20
IS2RE ``pos_relaxed`` (N, 3) from PyG 2.x and 1.x LMDBs, rMD17 ``old_forces`` (N, 3) with
``include_old_forces=true``, and an ASE per-atom vector array.  Values equal the source."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.ocp_writers import write_pyg_lmdb
from helpers import SAMPLES, write_features_yaml

from gmp_pipeline import open_store
from gmp_pipeline.cli import main


def featurize(tmp_path, address, kind, path, *options):
    out = tmp_path / f"{kind}.zarr"
    args = ["featurize", kind, str(path), "-o", str(out), "--features",
            str(write_features_yaml(tmp_path / "f.yaml")), "--cluster", address,
            "--no-progress", "--chunk-size", "2"]
    for o in options:
        args += ["--reader-option", o]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return open_store(out)


def _is2re_records(rng, sizes):
    recs = []
    for i, n in enumerate(sizes):
        pos = rng.uniform(0, 8, (n, 3)).astype(np.float32)
        recs.append({"atomic_numbers": rng.choice([1, 6, 8, 29], n).astype(np.float32),
                     "pos": pos, "cell": (np.eye(3, dtype=np.float32) * 8)[None], "natoms": n,
                     "tags": rng.integers(0, 3, n), "sid": 40 + i,
                     "fixed": (rng.random(n) < 0.3).astype(np.float32),
                     "y_init": np.float64(rng.normal()), "y_relaxed": float(rng.normal()),
                     "pos_relaxed": pos + rng.normal(scale=0.2, size=(n, 3)).astype(np.float32)})
    return recs


@pytest.mark.parametrize("layout", ["pyg2", "pyg1"])
def test_ocp_is2re_pos_relaxed(tmp_path, dask_address, layout):
    recs = _is2re_records(np.random.default_rng(5), [6, 9, 4, 11, 7])
    write_pyg_lmdb(tmp_path / "is2re.lmdb", recs, layout=layout)
    st = featurize(tmp_path, dask_address, "ocp", tmp_path / "is2re.lmdb")
    arr = st.array("atoms/pos_relaxed")
    assert arr.shape == (sum(len(r["pos"]) for r in recs), 3)
    for i, rec in enumerate(recs):
        d = st[i]
        assert d["pos_relaxed"].shape == (len(rec["pos"]), 3)
        np.testing.assert_array_equal(d["pos_relaxed"], rec["pos_relaxed"].astype(np.float64))
        np.testing.assert_array_equal(d["positions"], rec["pos"].astype(np.float64))
        assert float(d["energy"]) == rec["y_relaxed"] and int(d["sid"]) == rec["sid"]
    assert st.attrs["extras"]["atom_info"]["pos_relaxed"] == "atoms/pos_relaxed"


def test_rmd17_old_forces(tmp_path, dask_address):
    path = SAMPLES / "rmd17" / "rmd17_ethanol_test_01.npz"
    st = featurize(tmp_path, dask_address, "rmd17", path, "include_old_forces=true")
    with np.load(path) as z:
        old, n = z["old_forces"], z["nuclear_charges"].size
    assert st.array("atoms/old_forces").shape == (len(st) * n, 3)
    for i in (0, len(st) // 2, len(st) - 1):
        d = st[i]
        assert d["old_forces"].shape == (n, 3)
        np.testing.assert_array_equal(d["old_forces"], old[int(d["frame_index"])])


def test_ase_per_atom_vector_array(tmp_path, dask_address):
    import ase.io
    from ase.build import molecule

    rng = np.random.default_rng(9)
    frames = []
    for k in range(5):
        a = molecule("CH3CH2OH")
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        # (names ASE does not take for calculator results, as it does "dipole"/"charges")
        a.new_array("displacement", rng.normal(size=(len(a), 3)))
        a.new_array("weight", rng.normal(size=len(a)))
        frames.append(a)
    path = tmp_path / "vectors.extxyz"
    ase.io.write(path, frames, format="extxyz")
    st = featurize(tmp_path, dask_address, "ase", path)
    back = ase.io.read(path, index=":")
    assert st.array("atoms/displacement").shape == (5 * 9, 3)
    for i, a in enumerate(back):
        d = st[i]
        assert d["displacement"].shape == (9, 3) and d["weight"].shape == (9,)
        np.testing.assert_array_equal(d["displacement"], a.arrays["displacement"])
        np.testing.assert_array_equal(d["weight"], a.arrays["weight"])
        np.testing.assert_array_equal(d["positions"], a.positions)


def test_a_record_whose_vector_extra_has_another_shape_is_refused(tmp_path):
    """A later frame whose per-atom array does not have the first frame's trailing shape is a
    bad record (named), not a crash deep in the writer."""
    import ase.io
    from ase.build import molecule

    from gmp_pipeline.errors import SourceError
    from gmp_pipeline.readers import open_reader

    a, b = molecule("H2O"), molecule("H2O")
    a.new_array("v", np.zeros((3, 3)))
    b.new_array("v", np.zeros((3, 2)))
    ase.io.write(tmp_path / "x.extxyz", [a, b], format="extxyz")
    r = open_reader("ase", tmp_path / "x.extxyz")
    assert r.schema().atom_info["v"].shape == (3,)
    with pytest.raises(SourceError, match="record 1.*field 'v'"):
        list(r.read())
