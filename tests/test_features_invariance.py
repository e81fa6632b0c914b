"""Translation, rotation and permutation invariance; feature list conventions."""
import numpy as np
import pytest
from ase.build import bulk, fcc111, add_adsorbate, molecule

from feature_checks import assert_features_close, random_rotation
from gmp_pipeline import GMPFeaturizer


@pytest.fixture(scope="module")
def fz():
    return GMPFeaturizer(orders=[-1, 0, 1, 2, 3, 4, 6, 9], sigmas=[0.3, 0.7], psp="NC-SR")


def _systems():
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=1)
    crystal = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    crystal.rattle(0.05, seed=2)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 1.3, "hcp")
    slab.rattle(0.03, seed=3)
    return {"molecule": mol, "crystal": crystal, "slab": slab}


@pytest.mark.parametrize("name", ["molecule", "crystal", "slab"])
def test_translation_invariance(fz, name):
    atoms = _systems()[name]
    ref = fz.featurize(atoms, derivatives=True)
    moved = atoms.copy()
    moved.positions += [1.37, -2.11, 0.73]
    out = fz.featurize(moved, derivatives=True)
    assert_features_close(out.features, ref.features, rtol=1e-9, what="features after translation")
    assert_features_close(out.dfeatures, ref.dfeatures, rtol=1e-8, what="derivatives after translation")


@pytest.mark.parametrize("name", ["molecule", "crystal", "slab"])
def test_rotation_invariance_and_covariant_derivatives(fz, name):
    atoms = _systems()[name]
    R = random_rotation(seed=7)
    if atoms.pbc[2] and not atoms.pbc.all():
        pytest.skip("mixed periodicity")
    if name == "slab":  # rotate about z so the non-periodic direction stays z
        c, s = np.cos(0.7), np.sin(0.7)
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    ref = fz.featurize(atoms, derivatives=True)
    rot = atoms.copy()
    rot.positions = atoms.positions @ R.T
    rot.cell = atoms.cell[:] @ R.T
    out = fz.featurize(rot, derivatives=True)
    assert_features_close(out.features, ref.features, rtol=1e-9, what="features after rotation")
    # derivatives are vectors: dF/dr' = R dF/dr
    expect = np.einsum("ab,pbm->pam", R, ref.dfeatures)
    np.testing.assert_array_equal(out.pair_neighbor, ref.pair_neighbor)
    assert_features_close(out.dfeatures, expect, rtol=1e-8, what="derivatives after rotation")


@pytest.mark.parametrize("name", ["molecule", "crystal", "slab"])
def test_permutation_invariance(fz, name):
    atoms = _systems()[name]
    perm = np.random.default_rng(3).permutation(len(atoms))
    ref = fz.featurize(atoms, derivatives=True)
    out = fz.featurize(atoms[perm], derivatives=True)
    assert_features_close(out.features, ref.features[perm], rtol=1e-10, what="permuted features")
    D_ref = ref.dense_derivatives()[perm][:, :, perm]
    assert_features_close(out.dense_derivatives(), D_ref, rtol=1e-9, what="permuted derivatives")


def test_supercell_gives_the_same_features():
    # orders <= 4: in a cubic crystal higher orders are sums of ~1e3 cancelling image terms,
    # so their value is round-off that depends on the summation order
    fz = GMPFeaturizer(orders=[-1, 0, 1, 2, 3, 4], sigmas=[0.3, 0.7], psp="NC-SR")
    atoms = bulk("Cu", "fcc", a=3.61)
    a = fz.featurize(atoms).features
    b = fz.featurize(atoms * (2, 2, 1)).features
    # symmetry-zero features (odd orders in fcc) are round-off noise of ~1e-12 in both
    assert_features_close(b, np.repeat(a, 4, axis=0), rtol=1e-9, atol=1e-11 * np.abs(a).max(),
                          what="supercell")


def test_feature_list_order_and_duplicates():
    fz = GMPFeaturizer(orders=[2, -1, 0], sigmas=[0.5, 0.2])
    assert fz.feature_list == [(-1, 0.0), (0, 0.2), (0, 0.5), (2, 0.2), (2, 0.5)]
    dup = GMPFeaturizer(orders=[0, 0, 1], sigmas=[0.3, 0.3])
    assert dup.feature_list == [(0, 0.3)] * 4 + [(1, 0.3)] * 2
    atoms = molecule("H2O")
    r = dup.featurize(atoms, derivatives=True)
    assert r.features.shape == (3, 6)
    assert np.array_equal(r.features[:, 0], r.features[:, 3])
    assert np.array_equal(r.dfeatures[:, :, 1], r.dfeatures[:, :, 2])


def test_order_minus_one_alone_and_batch_entry_point():
    fz = GMPFeaturizer(orders=[-1], sigmas=[])
    mols = [molecule("H2O"), molecule("NH3")]
    rs = fz.featurize_many(mols, derivatives=True)
    assert [r.features.shape for r in rs] == [(3, 1), (4, 1)]
    assert all((r.features > 0).all() for r in rs)


def test_config_round_trip_and_pickle():
    import pickle

    fz = GMPFeaturizer(orders=[0, 1], sigmas=[0.4], psp="NC-SR", overlap_threshold=1e-12, square=True)
    again = GMPFeaturizer.from_config(fz.config())
    assert again.config() == fz.config()
    clone = pickle.loads(pickle.dumps(fz))
    atoms = molecule("H2O")
    assert np.array_equal(clone.featurize(atoms).features, fz.featurize(atoms).features)


def test_generated_fused_kernels_are_current():
    from gmp_pipeline import _codegen

    assert _codegen.TARGET.read_text() == _codegen.generate(), (
        "gmp_pipeline/_fused.py is stale: run `python -m gmp_pipeline._codegen`")
