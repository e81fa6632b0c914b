"""Invalid input gets a clear ValueError (a GMPError) naming the argument and value."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from gmp_pipeline import GMPFeaturizer, InputError, PseudopotentialError, Structure


@pytest.mark.parametrize("orders, match", [
    ([10], "orders: 10"), ([-2], "orders: -2"), ([1.5], "orders: 1.5"), ([], "orders must not be empty"),
    ("0,1", "orders must be a list"), ([True], "orders: True"),
])
def test_bad_orders(orders, match):
    with pytest.raises(ValueError, match=match):
        GMPFeaturizer(orders=orders, sigmas=[0.5])


@pytest.mark.parametrize("sigmas, match", [
    ([0.0], "sigmas: 0.0"), ([-0.5], "sigmas: -0.5"), ([float("nan")], "sigmas: nan"),
    ([float("inf")], "sigmas: inf"), (["wide"], "sigmas must be a list of numbers"),
])
def test_bad_sigmas(sigmas, match):
    with pytest.raises(ValueError, match=match):
        GMPFeaturizer(orders=[0], sigmas=sigmas)


@pytest.mark.parametrize("thr", [0.0, -1e-10, 1.5, float("nan")])
def test_bad_threshold(thr):
    with pytest.raises(ValueError, match="overlap_threshold"):
        GMPFeaturizer(orders=[0], sigmas=[0.5], overlap_threshold=thr)


def test_element_missing_from_psp():
    fz = GMPFeaturizer(orders=[0], sigmas=[0.5], psp="NC-SR")  # NC-SR stops at Bi
    atoms = Atoms("UO2", positions=[[0, 0, 0], [1.8, 0, 0], [-1.8, 0, 0]])
    with pytest.raises(InputError, match=r"element U \(Z=92\) has no entry in psp file .*NC-SR"):
        fz.featurize(atoms)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions(bad):
    fz = GMPFeaturizer(orders=[0], sigmas=[0.5])
    atoms = molecule("H2O")
    atoms.positions[1, 2] = bad
    with pytest.raises(ValueError, match=r"positions: atom 1 has a non-finite position"):
        fz.featurize(atoms)


@pytest.mark.parametrize("cell, pbc", [
    (np.zeros((3, 3)), [True, False, False]),
    ([[3, 0, 0], [6, 0, 0], [0, 0, 3]], [True, True, False]),
    ([[3, 0, 0], [0, 3, 0], [3, 3, 0]], [True, True, True]),
])
def test_degenerate_cell_along_periodic_direction(cell, pbc):
    fz = GMPFeaturizer(orders=[0], sigmas=[0.5])
    s = Structure(numbers=[1, 1], positions=[[0, 0, 0], [0.7, 0, 0]], cell=cell, pbc=pbc)
    with pytest.raises(ValueError, match="cell: degenerate along periodic direction"):
        fz.featurize(s)


def test_degenerate_cell_along_non_periodic_direction_is_fine():
    fz = GMPFeaturizer(orders=[0], sigmas=[0.5])
    s = Structure(numbers=[1, 1], positions=[[0, 0, 0], [0.7, 0, 5.0]],
                  cell=[[2.5, 0, 0], [0, 0, 0], [0, 0, 0]], pbc=[True, False, False])
    r = fz.featurize(s, derivatives=True)
    assert np.isfinite(r.features).all()


def test_bad_centers_and_empty_structure():
    fz = GMPFeaturizer(orders=[0], sigmas=[0.5])
    with pytest.raises(ValueError, match="centers must be atom indices"):
        fz.featurize(molecule("H2O"), centers=[5])
    with pytest.raises(ValueError, match="need at least one atom"):
        fz.featurize(Atoms())
    with pytest.raises(ValueError, match="atoms must be an ase.Atoms"):
        fz.featurize("H2O")


def test_dense_derivatives_needs_derivatives():
    fz = GMPFeaturizer(orders=[0], sigmas=[0.5])
    with pytest.raises(ValueError, match="derivatives=False"):
        fz.featurize(molecule("H2O")).dense_derivatives()


# -- .gpsp files -------------------------------------------------------------------------------

GOOD = """# a comment
! 2 elements
****
H 1 2
0.5 1.0
-0.1 3.0
****
O 8 1
1.0 0.5
"""


def test_custom_psp_by_path(tmp_path):
    p = tmp_path / "mine.gpsp"
    p.write_text(GOOD)
    fz = GMPFeaturizer(orders=[-1, 0], sigmas=[0.4], psp=str(p))
    assert fz.psp.name == "mine"
    assert fz.config()["psp"] == str(p)
    np.testing.assert_array_equal(fz.psp.gaussians[1], [[0.5, 1.0], [-0.1, 3.0]])
    r = fz.featurize(molecule("H2O"))
    # order -1 of H at the centre, by hand: sum_j sum_g B exp(-beta d^2)
    atoms = molecule("H2O")
    d2 = ((atoms.positions - atoms.positions[1]) ** 2).sum(1)
    mu = 1.0 * np.exp(-0.5 * d2[0]) + sum(0.5 * np.exp(-1.0 * d) - 0.1 * np.exp(-3.0 * d) for d in d2[1:])
    assert r.features[1, 0] == pytest.approx(abs(mu), rel=1e-14)


@pytest.mark.parametrize("text, match", [
    ("****\nH 1 1\n0.5\n", r"line 3: expected two numbers"),
    ("****\nH 1 1\n0.5 abc\n", r"line 3: not a number"),
    ("****\nQq 1 1\n0.5 1.0\n", r"line 2: unknown element symbol 'Qq'"),
    ("0.5 1.0\n", r"line 1: data line"),
    ("****\nH 1 1\n0.5 -1.0\n", r"line 3: need finite B and beta > 0"),
    ("****\nH 1 1\n0.5 1.0\n****\nH 1 1\n0.5 1.0\n", r"line 5: element H defined twice"),
    ("# nothing\n", r"no element records"),
    ("****\n", r"ends after an element separator"),
])
def test_malformed_psp(tmp_path, text, match):
    p = tmp_path / "bad.gpsp"
    p.write_text(text)
    with pytest.raises(PseudopotentialError, match=match) as info:
        GMPFeaturizer(orders=[0], sigmas=[0.5], psp=str(p))
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unreadable_psp(tmp_path):
    with pytest.raises(PseudopotentialError, match="neither a bundled pseudopotential"):
        GMPFeaturizer(orders=[0], sigmas=[0.5], psp=str(tmp_path / "missing.gpsp"))
    p = tmp_path / "binary.gpsp"
    p.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(PseudopotentialError, match="not UTF-8"):
        GMPFeaturizer(orders=[0], sigmas=[0.5], psp=str(p))


def test_bundled_psps_match_published_checksums():
    a = GMPFeaturizer(orders=[0], sigmas=[0.5], psp="QE-kjpaw")
    b = GMPFeaturizer(orders=[0], sigmas=[0.5], psp="NC-SR.gpsp")
    assert a.psp_sha256 == "911bf3fc47fae80b7421dce0bddcca25a74bd5f0fed9df7f84c527f8531632e4"
    assert b.psp_sha256 == "e063f582777001f47b2e1ee3353e509b86fe9a4054f240fb171d00b3fcf5694e"
    assert len(a.psp.gaussians) == 95 and len(b.psp.gaussians) == 84
