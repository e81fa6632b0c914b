"""Derivatives of features that vanish by symmetry (sqrt mode): warned once, square mode clean."""
import warnings

import pytest
from ase.build import bulk

import gmp_pipeline.features as features
from gmp_pipeline import GMPFeaturizer


@pytest.fixture
def fresh_flag(monkeypatch):
    monkeypatch.setattr(features, "_warned_near_zero", False)


def test_warns_once_in_sqrt_mode_at_symmetric_site(fresh_flag):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)  # order 1 and 3 vanish at every site
    fz = GMPFeaturizer(orders=[0, 1, 3], sigmas=[0.5])
    with pytest.warns(features.NearZeroFeatureWarning, match="square=True"):
        fz.featurize(atoms, derivatives=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fz.featurize(atoms, derivatives=True)  # once per process
        fz.featurize(atoms)  # no derivatives: nothing to warn about


def test_no_warning_in_square_mode_or_without_zeros(fresh_flag):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GMPFeaturizer(orders=[0, 1, 3], sigmas=[0.5], square=True).featurize(
            bulk("NaCl", "rocksalt", a=5.64, cubic=True), derivatives=True)
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
        atoms.rattle(0.05, seed=1)
        GMPFeaturizer(orders=[0, 1, 3], sigmas=[0.5]).featurize(atoms, derivatives=True)
