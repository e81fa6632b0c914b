"""Shared assertion helpers for GMP features: reference comparison, finite differences,
invariances.  Import with ``from feature_checks import ...``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).parent / "data" / "reference"


# -- the reference sets ------------------------------------------------------------------------

class ReferenceSet:
    """One ``gmp_ref_*.npz`` file (layout: tests/data/reference/README.md)."""

    def __init__(self, name: str):
        self.name = name
        self.z = np.load(REFERENCE / f"gmp_ref_{name}.npz", allow_pickle=False)
        self.offsets = self.z["atom_offsets"]
        self.n_structures = int(self.z["n_structures"])

    def featurizer_kwargs(self) -> dict:
        z = self.z
        orders = sorted({int(o) for o in z["feature_orders"]})
        sigmas = sorted({float(s) for o, s in zip(z["feature_orders"], z["feature_sigmas"]) if o >= 0})
        return {"orders": orders, "sigmas": sigmas, "psp": str(z["psp"]).removesuffix(".gpsp"),
                "overlap_threshold": float(z["overlap_threshold"]), "square": bool(z["square"])}

    def rows(self, s):
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def structure(self, s):
        from gmp_pipeline import Structure

        r = self.rows(s)
        return Structure(numbers=self.z["numbers"][r], positions=self.z["positions"][r],
                         cell=self.z["cells"][s], pbc=self.z["pbc"][s])

    def total_derivative(self, s) -> np.ndarray:
        """The reference's partial derivatives (probe centres fixed) turned into total
        derivatives (spec 8.2): dF[i]/dr[j] = D[i, j] - delta_ij sum_l D[i, l]."""
        D = self.z[f"dfeat_{s}"].copy()
        own = D.sum(axis=2)
        for i in range(D.shape[0]):
            D[i, :, i, :] -= own[i]
        return D


def assert_matches_reference(ref: ReferenceSet, s: int, F, D=None):
    """The acceptance rule of the reference README, applied to features and total derivatives.

    Features:    |F - F_ref| <= 1e-9 |F_ref| + 10 err_est + 1e-12 max_i |F_ref[:, m]| + 1e-14.
    Derivatives: the same rule as the README on the reference converted to total derivatives;
    a centre's own block is a sum of N partial blocks, so its error estimate is N times larger.
    Unreliable entries (features ~0 in sqrt mode, flagged by the reference) are skipped.
    """
    z = ref.z
    r = ref.rows(s)
    Fr = z["features"][r]
    F = np.asarray(F)
    assert F.shape == Fr.shape, (F.shape, Fr.shape)
    colF = np.abs(Fr).max(axis=0)
    tolF = 1e-9 * np.abs(Fr) + 10 * z["features_err_est"][r] + 1e-12 * colF + 1e-14
    errF = np.abs(F - Fr)
    worst = np.unravel_index(np.argmax(errF / tolF), errF.shape)
    assert (errF <= tolF).all(), (
        f"{ref.name} structure {s}: feature {worst} = {F[worst]!r}, reference {Fr[worst]!r}")
    if D is None:
        return
    Dt = ref.total_derivative(s)
    N = Dt.shape[0]
    D = np.asarray(D)
    assert D.shape == Dt.shape, (D.shape, Dt.shape)
    eD = z["dfeat_err_est_max"][r][:, :, None, None] * np.where(np.eye(N, dtype=bool)[:, None, :, None], N, 1)
    rel = z["dfeat_reliable"][r][:, :, None, None]
    rowD = np.abs(z[f"dfeat_{s}"]).max(axis=(2, 3), keepdims=True)
    tolD = 1e-8 * np.abs(Dt) + 10 * eD + 1e-9 * rowD + 1e-12 * colF[None, :, None, None] + 1e-14
    errD = np.where(rel, np.abs(D - Dt), 0.0)
    worst = np.unravel_index(np.argmax(errD / tolD), errD.shape)
    assert (errD <= tolD).all(), (
        f"{ref.name} structure {s}: derivative {worst} = {D[worst]!r}, reference {Dt[worst]!r}")


# -- finite differences and invariances ------------------------------------------------------------

def finite_difference_derivative(fz, atoms, h=1e-4, atoms_to_move=None):
    """Central differences dF[i, m] / d r[j, k] (dense (N, M, N, 3)), probe centres moving
    with their atoms (the total derivative).  Fourth-order stencil."""
    atoms = atoms.copy()
    N = len(atoms)
    M = fz.n_features
    js = range(N) if atoms_to_move is None else atoms_to_move
    out = np.zeros((N, M, N, 3))
    pos0 = atoms.positions.copy()
    for j in js:
        for k in range(3):
            vals = []
            for step in (-2, -1, 1, 2):
                p = pos0.copy()
                p[j, k] += step * h
                atoms.positions = p
                vals.append(fz.featurize(atoms).features)
            out[:, :, j, k] = (vals[0] - 8 * vals[1] + 8 * vals[2] - vals[3]) / (12 * h)
    atoms.positions = pos0
    return out


def assert_derivatives_match_fd(fz, atoms, h=2e-4, rtol=1e-6, atol_frac=1e-7, atoms_to_move=None):
    """Analytic total derivatives equal finite differences of the features.

    Tolerance per (i, m) row: rtol * |D| + atol_frac * max |D[i, m]| + a floor from the
    feature scale; rows whose feature is ~0 in sqrt mode are skipped (ill-conditioned)."""
    r = fz.featurize(atoms, derivatives=True)
    D = r.dense_derivatives()
    FD = finite_difference_derivative(fz, atoms, h=h, atoms_to_move=atoms_to_move)
    js = np.arange(len(atoms)) if atoms_to_move is None else np.asarray(atoms_to_move)
    D = D[:, :, js]
    FD = FD[:, :, js]
    F = r.features
    scale = np.abs(D).max(axis=(2, 3), keepdims=True)
    colF = np.abs(F).max(axis=0)[None, :, None, None]
    tol = rtol * np.abs(D) + atol_frac * scale + 1e-8 * colF + 1e-12
    ok = (np.abs(D - FD) <= tol)
    if not fz.square:
        ok |= (F < 1e-6 * np.abs(F).max(axis=0))[:, :, None, None]
    bad = np.argwhere(~ok)
    assert bad.size == 0, (
        f"{len(bad)} derivative entries differ from finite differences, first {tuple(bad[0])}: "
        f"analytic {D[tuple(bad[0])]!r} vs FD {FD[tuple(bad[0])]!r}")
    return r


def assert_sum_rule(result, atol=1e-12):
    """Translation invariance of the total derivative: sum_j dF[i, m]/dr[j] = 0."""
    D = result.dense_derivatives()
    s = np.abs(D.sum(axis=2)).max()
    scale = max(np.abs(D).max(), 1e-300)
    assert s <= atol + 1e-12 * scale, f"sum over j of dF/dr_j is {s} (scale {scale})"


def random_rotation(seed=0):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def assert_features_close(a, b, rtol=1e-10, atol=1e-14, what=""):
    """|a - b| <= rtol |b| + rtol max|b[:, column]| + atol, entry by entry."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    tol = rtol * np.abs(b) + rtol * np.abs(b).max(axis=0, keepdims=True) + atol
    bad = np.argwhere(np.abs(a - b) > tol)
    assert bad.size == 0, f"{what}: {len(bad)} entries differ, first {tuple(bad[0])}: {a[tuple(bad[0])]!r} vs {b[tuple(bad[0])]!r}"
