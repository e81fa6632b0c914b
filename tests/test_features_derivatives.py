"""Total derivatives against finite differences, and the translational sum rule."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, add_adsorbate, molecule

from feature_checks import assert_derivatives_match_fd, assert_sum_rule
from gmp_pipeline import GMPFeaturizer


def _rattled(atoms, seed=0, stdev=0.05):
    atoms = atoms.copy()
    atoms.rattle(stdev=stdev, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def fz():
    return GMPFeaturizer(orders=[-1, 0, 1, 2, 3, 4], sigmas=[0.2, 0.5, 1.0], psp="QE-kjpaw",
                         overlap_threshold=1e-16)


def test_fd_molecule_without_cell(fz):
    atoms = _rattled(molecule("CH3CH2OH"), seed=1)
    assert atoms.cell.rank == 0 and not atoms.pbc.any()
    r = assert_derivatives_match_fd(fz, atoms)
    assert_sum_rule(r)


def test_fd_periodic_cell_smaller_than_search_radius(fz):
    # 2-atom LiH-like cell: the search radius (~13 A) is many times the 2.9 A cell
    atoms = _rattled(bulk("LiH", "rocksalt", a=4.1), seed=2, stdev=0.03)
    assert fz.search_radius(atoms.numbers) > 3 * max(atoms.cell.lengths())
    r = assert_derivatives_match_fd(fz, atoms)
    assert_sum_rule(r)


def test_fd_one_atom_cell(fz):
    atoms = bulk("Cu", "fcc", a=3.61)  # every neighbour is an image of the atom itself
    r = fz.featurize(atoms, derivatives=True)
    assert r.dfeatures.shape == (1, 3, fz.n_features)
    assert np.abs(r.dfeatures).max() < 1e-12  # translation moves all images together


def test_fd_slab_mixed_periodicity(fz):
    slab = fcc111("Pt", size=(2, 2, 2), vacuum=6.0)
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab = _rattled(slab, seed=3, stdev=0.04)
    assert list(slab.pbc) == [True, True, False]
    r = assert_derivatives_match_fd(fz, slab, atoms_to_move=[0, 4, 8])
    assert_sum_rule(r)


def test_fd_positions_outside_the_cell(fz):
    atoms = _rattled(bulk("NaCl", "rocksalt", a=5.64, cubic=True), seed=4, stdev=0.05)
    atoms.positions[1] += atoms.cell[0] * 2.3 - atoms.cell[2] * 1.7  # far outside, unwrapped
    atoms.positions[3] -= atoms.cell[1] * 0.6
    assert_derivatives_match_fd(fz, atoms, atoms_to_move=[0, 1, 3])
    wrapped = atoms.copy()
    wrapped.wrap()
    a = fz.featurize(atoms).features
    b = fz.featurize(wrapped).features
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("square", [False, True])
def test_fd_high_orders(square):
    fz = GMPFeaturizer(orders=[5, 6, 7, 8, 9], sigmas=[0.3, 0.6], square=square)
    atoms = _rattled(molecule("H2O"), seed=5)
    r = assert_derivatives_match_fd(fz, atoms, h=2e-4, rtol=1e-5, atol_frac=1e-6)
    assert_sum_rule(r)


def test_fd_square_mode_periodic():
    fz = GMPFeaturizer(orders=[-1, 0, 1, 2], sigmas=[0.4], square=True, overlap_threshold=1e-12)
    atoms = _rattled(bulk("Si", "diamond", a=5.43), seed=6, stdev=0.05)
    r = assert_derivatives_match_fd(fz, atoms)
    assert_sum_rule(r)


def test_centre_subset_equals_rows_of_full_result(fz):
    atoms = _rattled(molecule("CH3CH2OH"), seed=7)
    full = fz.featurize(atoms, derivatives=True)
    sub = fz.featurize(atoms, derivatives=True, centers=[2, 5])
    np.testing.assert_array_equal(sub.centers, [2, 5])
    np.testing.assert_allclose(sub.features, full.features[[2, 5]], rtol=1e-13, atol=0)
    np.testing.assert_allclose(sub.dense_derivatives(), full.dense_derivatives()[[2, 5]],
                               rtol=1e-12, atol=1e-16)


def test_pairs_are_block_sparse_and_sorted(fz):
    # two molecules 40 A apart: no pair between them
    a = molecule("H2O")
    b = molecule("NH3")
    b.positions += [40.0, 0, 0]
    atoms = a + b
    r = fz.featurize(atoms, derivatives=True)
    far = (r.pair_center < 3) != (r.pair_neighbor < 3)
    assert not far.any()
    assert len(r.pair_center) == 3 * 3 + 4 * 4
    key = r.pair_center * len(atoms) + r.pair_neighbor
    assert (np.diff(key) > 0).all()
