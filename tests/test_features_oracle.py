"""Features and derivatives against a long-double oracle of spec sections 5-8 (tests/gmp_oracle.py)
on randomised structures the public reference sets do not reach: heavy elements, triclinic cells
with up to ~2000 images inside the search radius, orders -1..9, sigmas from 0.05 A, NC-SR and
QE-kjpaw, sqrt and square modes, partial and total derivatives.

The rule is compare.py's, with the oracle as the reference and the distance of a straightforward
float64 evaluation of the spec formulas to the oracle as the error estimate (the way the public
sets estimate the reference's own rounding); every case must stay within half of it.
"""
import numpy as np
import pytest

import gmp_oracle as O
from oracle_cases import random_case
from gmp_pipeline import GMPFeaturizer, Structure

MARGIN = 0.5
FAST = list(range(0, 16))
SLOW = list(range(16, 48))


def _run(case):
    fz = GMPFeaturizer(orders=case["orders"], sigmas=case["sigmas"], psp=case["psp"],
                       overlap_threshold=case["threshold"], square=case["square"])
    args = (case["numbers"], case["positions"], case["cell"], case["pbc"], case["orders"],
            case["sigmas"], fz.psp.gaussians, case["threshold"], case["square"])
    Fo, Do = O.evaluate(*args)
    F64, D64 = O.evaluate(*args, dtype=np.float64)
    st = Structure(numbers=case["numbers"], positions=case["positions"], cell=case["cell"], pbc=case["pbc"])
    part = fz.featurize(st, derivatives=True, total=False)
    tot = fz.featurize(st, derivatives=True, total=True)
    feat = fz.featurize(st, derivatives=False)
    rp = O.compare(part.features, part.dense_derivatives(), Fo, Do, F64, D64, case["square"])
    rt = O.compare(tot.features, tot.dense_derivatives(), Fo, O.total_from_partial(Do), F64,
                   O.total_from_partial(D64), case["square"])
    rf = O.compare(feat.features, None, Fo, None, F64, None, case["square"])
    return fz, rp, rt, rf


def _check(seed):
    case = random_case(seed)
    fz, rp, rt, rf = _run(case)
    msg = (f"seed {seed} ({case['desc']}): features {rf[0]:.3f}, partial {rp[1]:.3f} at {rp[2]}, "
           f"total {rt[1]:.3f} at {rt[2]} (limit {MARGIN})")
    assert max(rf[0], rp[0], rp[1], rt[1]) <= MARGIN, msg


@pytest.mark.parametrize("seed", FAST)
def test_oracle_random_structures(seed):
    _check(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW)
def test_oracle_random_structures_more(seed):
    _check(seed)


@pytest.mark.slow
def test_oracle_many_images_heavy_high_order():
    """The issue's corner: a small triclinic Bi/Pb cell (~2000 images), orders 7-9, sigma <= 0.2,
    NC-SR; the centre's own block (i == j) sums every image of the centre atom."""
    rng = np.random.default_rng(5)
    cell = np.array([[3.1, 0.0, 0.0], [0.9, 2.9, 0.0], [0.6, -0.7, 3.3]])
    frac = np.array([[0.1, 0.2, 0.15], [0.55, 0.6, 0.5]]) + rng.uniform(-0.03, 0.03, (2, 3))
    case = {"numbers": np.array([83, 82]), "positions": frac @ cell, "cell": cell,
            "pbc": np.array([True, True, True]), "orders": [7, 8, 9], "sigmas": [0.05, 0.2],
            "psp": "NC-SR", "square": False, "threshold": 1e-16, "desc": "BiPb triclinic"}
    fz, rp, rt, rf = _run(case)
    assert max(rf[0], rp[0], rp[1], rt[1]) <= MARGIN, (rf, rp, rt)


def test_oracle_agrees_with_mpmath():
    """The long-double oracle itself, against 40-digit mpmath on a tiny input (order 9, narrow
    probe, where float64 P_k moments cancel)."""
    pytest.importorskip("mpmath")
    fz = GMPFeaturizer(orders=[-1, 4, 9], sigmas=[0.05, 0.3], psp="NC-SR")
    pos = np.array([[0.0, 0.0, 0.0], [1.3, 0.4, -0.7]])
    args = (np.array([83, 8]), pos, np.zeros((3, 3)), np.array([False] * 3), [-1, 4, 9], [0.05, 0.3],
            fz.psp.gaussians, 1e-16, False)
    Fo, Do = O.evaluate(*args)
    Fm, Dm = O.evaluate(*args, dtype=object, form="spec")  # 40 digits absorb the cancellation
    Fm = Fm.astype(np.longdouble)
    Dm = Dm.astype(np.longdouble)
    assert np.all(np.abs(Fo - Fm) <= 1e-15 * np.abs(Fm) + 1e-30)
    scale = np.abs(Dm).max(axis=(2, 3), keepdims=True)
    assert np.all(np.abs(Do - Dm) <= 1e-15 * scale + 1e-30)


def test_gaussian_moments_of_solid_harmonics_are_exact_values_at_the_mean():
    """Spec 5 in exact rational arithmetic: sum c_pqs P_p(x) P_q(y) P_s(z) = H_abc(lambda d) for
    every component of orders 0..9 (the variance terms of the P_k cancel, because H_abc is
    harmonic).  Both the oracle and the kernels rely on it."""
    from fractions import Fraction as Fr

    from gmp_pipeline._harmonics import monomials_of_degree, solid_harmonic

    rng = np.random.default_rng(3)
    for n in range(10):
        for abc in monomials_of_degree(n):
            H = solid_harmonic(*abc)
            for _ in range(2):
                u = [Fr(int(v), 97) for v in rng.integers(-300, 300, 3)]  # lambda d
                h = Fr(int(rng.integers(1, 500)), 101)  # 1/(2 gamma)
                P = []
                for x in u:
                    p = [Fr(1), x]
                    for k in range(2, n + 1):
                        p.append(x * p[k - 1] + (k - 1) * h * p[k - 2])
                    P.append(p)
                Q = sum(c * P[0][a] * P[1][b] * P[2][s] for (a, b, s), c in H.items())
                direct = sum(c * u[0] ** a * u[1] ** b * u[2] ** s for (a, b, s), c in H.items())
                assert Q == direct, (abc, u, h)
