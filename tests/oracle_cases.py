"""Randomised structures for the oracle suite (tests/gmp_oracle.py): heavy elements, triclinic
cells small enough for ~2000 images inside the search radius, every periodicity, orders -1..9,
sigmas from 0.05 A, both bundled pseudopotentials, both output modes."""
from __future__ import annotations

import numpy as np

HEAVY = ["Bi", "Pb", "Tl", "Hg", "Au", "Pt", "Ir", "W", "Ba", "Cs", "I", "Sb", "Sn", "Ag", "Mo"]
LIGHT = ["H", "O", "C", "N", "F", "Li", "Cu", "Fe"]
SIGMAS = [0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.0]
PBCS = [(True, True, True)] * 4 + [(True, True, False), (True, False, False), (False, False, False)]


def _cell(rng, lo, hi):
    """Triclinic cell: lengths in [lo, hi], angles 60-120 degrees (kept non-degenerate)."""
    while True:
        a, b, c = rng.uniform(lo, hi, 3)
        al, be, ga = np.radians(rng.uniform(60, 120, 3))
        cx = c * np.cos(be)
        cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
        cz2 = c * c - cx * cx - cy * cy
        if cz2 > (0.3 * c) ** 2:
            return np.array([[a, 0, 0], [b * np.cos(ga), b * np.sin(ga), 0], [cx, cy, np.sqrt(cz2)]])


def random_case(seed: int, max_order_floor: int = 5) -> dict:
    rng = np.random.default_rng(1000 + seed)
    pbc = PBCS[rng.integers(len(PBCS))]
    nper = sum(pbc)
    n_atoms = int(rng.integers(1, 4)) if nper == 3 else int(rng.integers(2, 5))
    cell = _cell(rng, 2.6, 4.2) if nper == 3 else _cell(rng, 2.8, 5.0)
    if nper < 3:  # a box along the non-periodic directions that holds the atoms
        cell = cell.copy()
        for k in range(3):
            if not pbc[k]:
                cell[k] = cell[k] / np.linalg.norm(cell[k]) * 12.0
    frac = rng.uniform(0, 1, (n_atoms, 3))
    for k in range(3):
        if not pbc[k]:
            frac[:, k] = 0.5 + rng.uniform(-1, 1, n_atoms) * (1.2 / 12.0)
    positions = frac @ cell
    # keep atoms apart (>= 1.1 A between all images) by nudging: redraw if too close
    els = [HEAVY[rng.integers(len(HEAVY))] if rng.uniform() < 0.7 else LIGHT[rng.integers(len(LIGHT))]
           for _ in range(n_atoms)]
    from ase.data import atomic_numbers

    numbers = np.array([atomic_numbers[e] for e in els])
    top = int(rng.integers(max_order_floor, 10))
    orders = sorted(set([top] + [int(x) for x in rng.integers(-1, 10, 2)]))
    sig = sorted(set(float(s) for s in rng.choice(SIGMAS[:5], 1)) | set(float(s) for s in rng.choice(SIGMAS, 1)))
    psp = "NC-SR" if rng.uniform() < 0.6 else "QE-kjpaw"
    square = bool(rng.uniform() < 0.25)
    threshold = 1e-16 if rng.uniform() < 0.8 else 1e-8
    desc = (f"{psp} {''.join(els)} pbc={''.join('T' if p else 'F' for p in pbc)} "
            f"orders={orders} sigmas={sig} thr={threshold:g}{' square' if square else ''}")
    return {"numbers": numbers, "positions": positions, "cell": cell, "pbc": np.array(pbc),
            "orders": orders, "sigmas": sig, "psp": psp, "square": square, "threshold": threshold,
            "desc": desc}
