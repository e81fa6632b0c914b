"""A high-precision oracle for GMP features and partial/total derivatives (spec sections 5-8).

Written from the spec alone and independent of the kernels: a brute-force enumeration of the
periodic images, the cutoff tests of spec 7.2 taken in float64 exactly as the spec states them,
and then every term evaluated as spec 5 writes it (``C1 exp(C2 |d|^2) Q_abc(d)`` with the 1-D
moments ``P_k`` and their variance terms), in a chosen arithmetic:

* ``np.longdouble`` (x87 80-bit, 64-bit mantissa): the oracle, with Q_abc(d) evaluated as the
  equal polynomial H_abc(lambda d) (see :func:`evaluate`).  Its own rounding is about 2^11 times
  below float64's, so it stands for the exact value in the compare.py rule.
* ``np.float64``: the *straightforward double-precision evaluation* of the same formulas.  Its
  distance to the oracle plays the role of the reference's ``features_err_est`` and
  ``dfeat_err_est_max`` (reference README: "|F_ref - F_longdouble|"), so the rule "within the
  rounding of the reference formula" can be applied to structures the public sets do not reach.
* ``object`` (mpmath ``mpf``, 40 digits): for checking the long-double oracle on tiny inputs.

Returns the features (N, M) and the partial derivatives (N, M, N, 3) with the reference's
convention (probe centres held fixed, spec 8.1); :func:`total_from_partial` gives spec 8.2.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from gmp_pipeline._harmonics import monomials_of_degree, multinomial, solid_harmonic

ORDER_FACTOR = {-1: 1.0, 0: 1.0, 1: 1.0, 2: 1.0, 3: 1e-1, 4: 1e-2, 5: 1e-4, 6: 1e-5, 7: 1e-7,
                8: 1e-9, 9: 1e-11}


def cutoff(n, sigma, B, beta, threshold):
    """Spec 7.1, in Python float64 as the spec prescribes (quirks included)."""
    t = threshold * ORDER_FACTOR[n]
    if n == -1:
        C1, C2 = B, -beta
    else:
        A = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
        alpha = 1.0 / (2.0 * sigma * sigma)
        C1 = A * B * (math.pi / (alpha + beta)) ** 1.5
        C2 = -alpha * beta / (alpha + beta)
    return math.sqrt((math.log(t) - abs(C1)) / C2)


def feature_list(orders, sigmas):
    out = []
    for n in sorted(orders):
        if n == -1:
            out.append((-1, 0.0))
        else:
            out += [(n, s) for s in sorted(sigmas)]
    return out


class _Arith:
    """exp/sqrt/constants for one arithmetic."""

    def __init__(self, dtype):
        self.dtype = dtype
        if dtype is object:
            import mpmath

            mpmath.mp.dps = 40
            self.mp = mpmath
            self.exp = np.vectorize(mpmath.exp, otypes=[object])
            _sq = np.vectorize(mpmath.sqrt, otypes=[object])
            self.sqrt = lambda x: _sq(x)[()]
            self.pi = mpmath.mp.pi
            self.one = mpmath.mpf(1)
        else:
            self.exp = np.exp
            self.sqrt = np.sqrt
            self.pi = dtype("3.14159265358979323846264338327950288") if dtype is np.longdouble else dtype(math.pi)
            self.one = dtype(1)

    def arr(self, x):
        x = np.asarray(x, dtype=np.float64)
        if self.dtype is object:
            return np.vectorize(self.mp.mpf, otypes=[object])(x)
        return x.astype(self.dtype)

    def scalar(self, x):
        return self.mp.mpf(float(x)) if self.dtype is object else self.dtype(float(x))


@lru_cache(maxsize=None)
def _component_tables(n):
    """Per component (a,b,c) of order n: weight, its monomials and coefficients, and for the
    gradient along each axis the lowered monomials with coefficient c * p."""
    comps = []
    for abc in monomials_of_degree(n):
        h = solid_harmonic(*abc)
        monos = [(pqs, c) for pqs, c in sorted(h.items())]
        comps.append((multinomial(*abc), monos))
    return comps


def _images(positions, cell, pbc, q, rs):
    """(j, T, d) of every image with |d|^2 < rs^2, d = (T + r_j) - q in float64 (spec 7.2/7.3),
    by brute force over t_k in [-ceil(R/h_k) - 1 - w, ceil(R/h_k) + 1 + w] (w widens the box for
    atoms outside the cell)."""
    per = [k for k in range(3) if pbc[k]]
    ranges = [range(0, 1)] * 3
    if per:
        A = cell[per]
        inv_gram = np.linalg.inv(A @ A.T)
        frac = (positions - q) @ A.T @ inv_gram  # lattice coordinates along periodic vectors
        for a, k in enumerate(per):
            hk = 1.0 / math.sqrt(inv_gram[a, a])
            m = int(math.ceil(rs / hk)) + 1 + int(math.ceil(np.abs(frac[:, a]).max()))
            ranges[k] = range(-m, m + 1)
    t = np.array([(a, b, c) for a in ranges[0] for b in ranges[1] for c in ranges[2]], dtype=np.float64)
    T = t @ cell  # lattice translations, float64 as the kernels and the reference form them
    js, Ts, ds = [], [], []
    for j in range(positions.shape[0]):
        d = (T + positions[j]) - q
        D = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]
        keep = D < rs * rs
        js.append(np.full(int(keep.sum()), j))
        Ts.append(T[keep])
        ds.append(d[keep])
    return np.concatenate(js), np.concatenate(Ts), np.concatenate(ds)


def evaluate(numbers, positions, cell, pbc, orders, sigmas, gaussians, threshold=1e-16,
             square=False, dtype=np.longdouble, occupancies=None, form=None):
    """Features (N, M) and partial derivatives (N, M, N, 3) in the given arithmetic (returned
    as that dtype).  ``gaussians[Z]`` = (K, 2) array of (B, beta).

    ``form="spec"`` evaluates Q_abc(d) with the spec's Gaussian moments P_k (variance terms
    included), ``form="harmonic"`` as H_abc(lambda d), which is the same polynomial (H_abc is
    harmonic, and a Gaussian average of a harmonic polynomial is its value at the mean;
    tests/test_features_oracle.py proves it in exact rational arithmetic for every component up to
    order 9).  The spec form cancels heavily for narrow probes (1/(2 gamma) >> (lambda d)^2): even
    in long double it keeps only ~1e-13 of order-9 features at sigma = 0.05.  Default: "spec"
    in float64 (the straightforward evaluation), "harmonic" otherwise (the oracle)."""
    if form is None:
        form = "spec" if dtype is np.float64 else "harmonic"
    ar = _Arith(dtype)
    numbers = np.asarray(numbers)
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    N = len(numbers)
    occ = np.ones(N) if occupancies is None else np.asarray(occupancies, dtype=np.float64)
    flist = feature_list(orders, sigmas)
    M = len(flist)
    species = sorted(set(int(z) for z in numbers))
    # cutoff radii (float64): per (n, sigma) feature, element and Gaussian
    R = {}
    for (n, s) in set(flist):
        for z in species:
            R[(n, s, z)] = [cutoff(n, s, float(B), float(b), threshold) for B, b in gaussians[z]]
    rs = max(max(v) for v in R.values())
    F = np.zeros((N, M), dtype=dtype)
    D = np.zeros((N, M, N, 3), dtype=dtype)
    if dtype is object:
        F[:] = ar.scalar(0)
        D[:] = ar.scalar(0)
    for i in range(N):
        q = positions[i]
        jj, TT, dd = _images(positions, cell, pbc, q, rs)
        Dsq = dd[:, 0] * dd[:, 0] + dd[:, 1] * dd[:, 1] + dd[:, 2] * dd[:, 2]  # float64 tests
        # the displacement in the chosen arithmetic from the float64 inputs (T as float64)
        dhp = dd if dtype is np.float64 else (ar.arr(TT) + ar.arr(positions[jj])) - ar.arr(q)
        for m, (n, s) in enumerate(flist):
            # contributing terms (spec 7.2): one row per (image, Gaussian)
            tj, tB, tbeta, td = [], [], [], []
            for z in species:
                sel = numbers[jj] == z
                Rz = R[(n, s, z)]
                Rel = max(Rz)
                for g, (B, b) in enumerate(gaussians[z]):
                    if B == 0.0:
                        continue
                    ok = sel & (Dsq < rs * rs) & ~(Dsq > Rel * Rel) & ~(Dsq > Rz[g] * Rz[g])
                    idx = np.flatnonzero(ok)
                    tj.append(jj[idx])
                    tB.append(np.full(len(idx), B))
                    tbeta.append(np.full(len(idx), b))
                    td.append(idx)
            tj = np.concatenate(tj)
            idx = np.concatenate(td)
            B = ar.arr(np.concatenate(tB)) * ar.arr(occ[tj])
            beta = ar.arr(np.concatenate(tbeta))
            d = dhp[idx]
            dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
            D2 = dx * dx + dy * dy + dz * dz
            if n == -1:
                E = B * ar.exp(-beta * D2)
                mu = E.sum()
                S = mu * mu
                Fv = S if square else ar.sqrt(S)
                zero = (not square) and float(Fv) < 1e-15
                F[i, m] = 0 if zero else Fv
                if zero:
                    continue
                g = (-2 * beta * E)[:, None] * d  # d term / d r_j
                dS = (2 * mu) * g
                dF = dS if square else dS / (2 * Fv)
                for k in range(3):
                    D[i, m, :, k] = _bincount(tj, dF[:, k], N, dtype, ar)
                continue
            sig = ar.scalar(s)
            alpha = ar.one / (2 * sig * sig)
            A = (ar.one / (sig * ar.sqrt(2 * ar.pi))) ** 3
            gam = alpha + beta
            lam = beta / gam
            C1 = A * B * (ar.pi / gam) * ar.sqrt(ar.pi / gam)
            C2 = -alpha * beta / gam
            E = C1 * ar.exp(C2 * D2)
            hv = ar.one / (2 * gam) if form == "spec" else 0 * gam
            P = [_moments(lam * u, hv, n) for u in (dx, dy, dz)]  # P[axis][k] arrays
            S = 0
            mus, Qs, gQs = [], [], []
            for w, monos in _component_tables(n):
                Q = 0
                gq = [0, 0, 0]
                for (p, qq, r), c in monos:
                    Q = Q + c * (P[0][p] * P[1][qq] * P[2][r])
                    if p:
                        gq[0] = gq[0] + (c * p) * (P[0][p - 1] * P[1][qq] * P[2][r])
                    if qq:
                        gq[1] = gq[1] + (c * qq) * (P[0][p] * P[1][qq - 1] * P[2][r])
                    if r:
                        gq[2] = gq[2] + (c * r) * (P[0][p] * P[1][qq] * P[2][r - 1])
                mu = (E * Q).sum()
                S = S + w * mu * mu
                mus.append((w, mu))
                Qs.append(Q)
                gQs.append([lam * x for x in gq])  # dP_k/du = k lam P_{k-1}
            Fv = S if square else ar.sqrt(S)
            zero = (not square) and float(Fv) < 1e-15
            F[i, m] = 0 if zero else Fv
            if zero:
                continue
            dS = [0, 0, 0]
            for (w, mu), Q, gq in zip(mus, Qs, gQs):
                for k, u in enumerate((dx, dy, dz)):
                    term = E * (2 * C2 * u * Q + gq[k])
                    dS[k] = dS[k] + (2 * w * mu) * term
            for k in range(3):
                v = dS[k] if square else dS[k] / (2 * Fv)
                D[i, m, :, k] = _bincount(tj, v, N, dtype, ar)
    return F, D


def _moments(mean, hv, n):
    """P_0..P_n of a 1-D normal with this mean and variance hv (spec 5 recurrence)."""
    P = [mean * 0 + 1, mean]
    for k in range(2, n + 1):
        P.append(mean * P[k - 1] + (k - 1) * hv * P[k - 2])
    return P[:n + 1] if n >= 1 else P[:1]


def _bincount(idx, vals, N, dtype, ar):
    out = np.zeros(N, dtype=dtype)
    if dtype is object:
        out[:] = ar.scalar(0)
    if dtype is np.float64:
        return np.bincount(idx, weights=vals, minlength=N)
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    vals = np.asarray(vals)[order]
    bounds = np.searchsorted(idx, np.arange(N + 1))
    for j in range(N):
        if bounds[j + 1] > bounds[j]:
            out[j] = vals[bounds[j]:bounds[j + 1]].sum()
    return out


def total_from_partial(D):
    """Spec 8.2: dF[i]/dr[j] = D[i, j] - delta_ij sum_l D[i, l]."""
    D = D.copy()
    own = D.sum(axis=2)
    for i in range(D.shape[0]):
        D[i, :, i, :] -= own[i]
    return D


def compare(F, D, Fo, Do, F64, D64, square=False):
    """The compare.py rule with the oracle (Fo, Do) as the reference and the straightforward
    float64 evaluation's distance to it as the error estimate.  Returns (feature worst ratio,
    derivative worst ratio, index of the worst derivative entry)."""
    Fo = np.asarray(Fo, dtype=np.longdouble)
    eF = np.abs(np.asarray(F64, dtype=np.longdouble) - Fo).astype(np.float64)
    Fo64 = Fo.astype(np.float64)
    colF = np.abs(Fo64).max(axis=0, keepdims=True)
    tolF = 1e-9 * np.abs(Fo64) + 10.0 * eF + 1e-12 * colF + 1e-14
    errF = np.abs(np.asarray(F, dtype=np.longdouble) - Fo).astype(np.float64)
    rF = float((errF / tolF).max())
    if D is None:
        return rF, None, None
    Do = np.asarray(Do, dtype=np.longdouble)
    eD = np.abs(np.asarray(D64, dtype=np.longdouble) - Do).astype(np.float64).max(axis=(2, 3), keepdims=True)
    Do64 = Do.astype(np.float64)
    if square:
        rel = np.ones(Fo64.shape, dtype=bool)
    else:
        rel = ~((Fo64 <= 1e-8 * colF) | (Fo64 <= 1e-12))
    rel = rel[:, :, None, None]
    rowD = np.abs(Do64).max(axis=(2, 3), keepdims=True)
    tolD = 1e-8 * np.abs(Do64) + 10.0 * eD + 1e-9 * rowD + 1e-12 * colF[:, :, None, None] + 1e-14
    errD = np.abs(np.asarray(D, dtype=np.longdouble) - Do).astype(np.float64)
    ratio = np.where(rel, errD / tolD, 0.0)
    worst = tuple(int(x) for x in np.unravel_index(ratio.argmax(), ratio.shape))
    return rF, float(ratio.max()), worst
