"""Exact integer tables of the Maxwell-Cartesian solid harmonics H_abc (spec sections 4.1, 4.2).

Everything here is plain Python integer arithmetic, evaluated once per process and turned into
flat numpy tables for the numba kernels.

Monomials ``x^p y^q z^s`` are numbered globally: all monomials of degree 0, then degree 1, ...
up to :data:`MAX_DEGREE`; within a degree in the order produced by :func:`monomials_of_degree`.
"""
from __future__ import annotations

from functools import lru_cache
from math import factorial

import numpy as np

MAX_ORDER = 9
#: derivatives of order-9 features need moments of degree 10
MAX_DEGREE = MAX_ORDER + 1


def _double_factorial(k: int) -> int:
    out = 1
    while k > 1:
        out *= k
        k -= 2
    return out


def monomials_of_degree(n: int) -> list[tuple[int, int, int]]:
    return [(p, q, n - p - q) for p in range(n, -1, -1) for q in range(n - p, -1, -1)]


@lru_cache(maxsize=None)
def monomial_index() -> dict[tuple[int, int, int], int]:
    idx = {}
    for deg in range(MAX_DEGREE + 1):
        for m in monomials_of_degree(deg):
            idx[m] = len(idx)
    return idx


def monomial_table() -> np.ndarray:
    """(n_monomials, 3) int64 exponents, in global index order."""
    idx = monomial_index()
    out = np.zeros((len(idx), 3), dtype=np.int64)
    for m, i in idx.items():
        out[i] = m
    return out


def degree_offsets() -> np.ndarray:
    """Global index of the first monomial of each degree 0..MAX_DEGREE+1."""
    return np.array([d * (d + 1) * (d + 2) // 6 for d in range(MAX_DEGREE + 2)], dtype=np.int64)


@lru_cache(maxsize=None)
def solid_harmonic(a: int, b: int, c: int) -> dict[tuple[int, int, int], int]:
    """Monomial coefficients {(p, q, s): c_pqs} of H_abc (closed form of spec 4.1)."""
    n = a + b + c
    poly: dict[tuple[int, int, int], int] = {}

    def axis(e, i):
        return factorial(e) // (2 ** i * factorial(i) * factorial(e - 2 * i))

    for i in range(a // 2 + 1):
        for j in range(b // 2 + 1):
            for k in range(c // 2 + 1):
                m = i + j + k
                coef = (-1) ** m * _double_factorial(2 * n - 2 * m - 1) * axis(a, i) * axis(b, j) * axis(c, k)
                # (x^2 + y^2 + z^2)^m by the trinomial theorem
                for u in range(m + 1):
                    for v in range(m - u + 1):
                        w = m - u - v
                        tri = factorial(m) // (factorial(u) * factorial(v) * factorial(w))
                        key = (a - 2 * i + 2 * u, b - 2 * j + 2 * v, c - 2 * k + 2 * w)
                        poly[key] = poly.get(key, 0) + coef * tri
    return {k: v for k, v in poly.items() if v != 0}


def components(n: int) -> list[tuple[int, int, int]]:
    """All (a, b, c) with a + b + c = n."""
    return monomials_of_degree(n)


def multinomial(a: int, b: int, c: int) -> int:
    return factorial(a + b + c) // (factorial(a) * factorial(b) * factorial(c))


@lru_cache(maxsize=None)
def order_tables():
    """Flat tables of the solid harmonics of orders 0..MAX_ORDER used by the kernels.

    ``comp_start[n]``   first component row of order n (rows comp_start[n]:comp_start[n+1]);
    ``comp_weight[r]``  group coefficient w = n!/(a!b!c!) of component row r;
    ``hcoef[r, k]``     coefficient of the k-th degree-n monomial (local index, order of
                        :func:`monomials_of_degree`) in H_abc.
    """
    rows = []
    comp_start = [0]
    for n in range(MAX_ORDER + 1):
        for abc in components(n):
            rows.append((n, abc))
        comp_start.append(len(rows))
    ncol = (MAX_DEGREE + 1) * (MAX_DEGREE + 2) // 2  # largest number of monomials of one degree
    weight = np.zeros(len(rows))
    hcoef = np.zeros((len(rows), ncol))
    for r, (n, abc) in enumerate(rows):
        weight[r] = multinomial(*abc)
        loc_n = {m: i for i, m in enumerate(monomials_of_degree(n))}
        for pqs, cval in solid_harmonic(*abc).items():
            hcoef[r, loc_n[pqs]] = cval
    return {"comp_start": np.array(comp_start, dtype=np.int64), "comp_weight": weight,
            "hcoef": hcoef}


@lru_cache(maxsize=None)
def kernel_tables():
    """Index tables for the kernels (see ``_kernels.featurize_structure``).

    ``mono``       (n_mono, 3) exponents by global monomial index;
    ``mono_off``   first global index of each degree;
    ``raise_idx[a, k]`` global index of monomial k with exponent a raised by one (-1 past MAX_DEGREE).
    """
    mono = monomial_table()
    off = degree_offsets()
    idx = monomial_index()
    raise_idx = np.full((3, len(mono)), -1, dtype=np.int64)
    for k, e in enumerate(mono):
        for a in range(3):
            up = [int(v) for v in e]
            up[a] += 1
            raise_idx[a, k] = idx.get(tuple(up), -1)
    return mono, off, raise_idx
