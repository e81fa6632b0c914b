"""The public featurizer: :class:`GMPFeaturizer` and its result :class:`GMPResult`.

Implements ``spec/gmp-features.md``: features of orders -1..9 with any positive sigmas, the
reference's per-Gaussian cutoff rule (section 7, quirks included) and the *total* derivative of
every feature with respect to every atom position (section 8.2), stored block-sparse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from . import _harmonics
from .errors import InputError
from .psp import element_symbol, load_psp
from .structure import Structure

#: order factor f(n) of the cutoff threshold (spec 7.1)
ORDER_FACTOR = {-1: 1.0, 0: 1.0, 1: 1.0, 2: 1.0, 3: 1e-1, 4: 1e-2, 5: 1e-4, 6: 1e-5, 7: 1e-7,
                8: 1e-9, 9: 1e-11}
VALID_ORDERS = tuple(range(-1, 10))
#: cells of the per-element distance grid that locates a neighbour's cutoff bin
GRID_CELLS = 2048
#: sqrt mode: a feature at most this fraction of its column's largest value (or below
#: NEAR_ZERO_ABS) is "near zero", where dF = dS / (2F) is decided by rounding (docs/features.md)
NEAR_ZERO_REL = 1e-8
NEAR_ZERO_ABS = 1e-12


class NearZeroFeatureWarning(RuntimeWarning):
    """Derivatives were asked for in sqrt mode and some feature is ~0 (docs/features.md)."""


_warned_near_zero = False


def _warn_near_zero(feats, feature_list) -> None:
    """Warn once per process when a sqrt-mode feature is ~0, so its derivative is noise."""
    global _warned_near_zero
    if _warned_near_zero or feats.size == 0:
        return
    col = np.abs(feats).max(axis=0)
    near = (feats <= NEAR_ZERO_REL * col) | (feats <= NEAR_ZERO_ABS)
    if not near.any():
        return
    import logging
    import warnings

    c, m = (int(v) for v in np.argwhere(near)[0])
    n, sigma = feature_list[m]
    msg = (f"feature (order {n}, sigma {sigma}) is ~0 ({feats[c, m]:.3g}) at centre {c}"
           f"{f' and {int(near.sum()) - 1} other entries' if near.sum() > 1 else ''}: there the "
           "derivative of sqrt(S) is undefined and what is returned is decided by rounding "
           "(a multipole that vanishes by symmetry); use square=True for smooth derivatives. "
           "Warned once per process; see docs/features.md.")
    _warned_near_zero = True
    logging.getLogger("gmp_pipeline").warning(msg)
    warnings.warn(msg, NearZeroFeatureWarning, stacklevel=3)


@dataclass
class GMPResult:
    """Features of one structure and, optionally, their total position derivatives.

    ``features[c, m]`` is feature ``m`` of centre ``centers[c]`` (by default every atom, so
    ``c`` is the atom index).  Derivatives are block-sparse: pair ``p`` holds
    ``dfeatures[p, k, m] = dF[pair_center[p], m] / d r[pair_neighbor[p], k]``; the pairs of a
    centre are contiguous, sorted by neighbour index.
    """

    features: np.ndarray
    centers: np.ndarray
    n_atoms: int
    pair_center: np.ndarray | None = None
    pair_neighbor: np.ndarray | None = None
    dfeatures: np.ndarray | None = None

    @property
    def has_derivatives(self) -> bool:
        return self.dfeatures is not None

    def dense_derivatives(self) -> np.ndarray:
        """Dense (n_centers, M, N, 3) total derivative (for tests and small systems)."""
        if self.dfeatures is None:
            raise InputError("this result was computed with derivatives=False")
        nc, M = self.features.shape
        row = np.empty(self.n_atoms, dtype=np.int64)
        row[:] = -1
        row[self.centers] = np.arange(nc)
        out = np.zeros((nc, M, self.n_atoms, 3))
        out[row[self.pair_center], :, self.pair_neighbor, :] = self.dfeatures.transpose(0, 2, 1)
        return out


def _as_sorted_floats(name, values) -> list[float]:
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a list of numbers, got {values!r}") from None
    return vals


class GMPFeaturizer:
    """GMP features and total position derivatives.

    Parameters
    ----------
    orders : orders of the multipole probes, each in -1..9 (-1 is the density at the centre).
    sigmas : Gaussian widths in Angstrom, each > 0.
    psp : ``"QE-kjpaw"`` (default), ``"NC-SR"``, or a path to a ``.gpsp`` file.
    overlap_threshold : cutoff threshold of the per-Gaussian cutoff rule (spec 7.1), > 0.
    square : if True the features are ``S`` (sum of squared multipoles) instead of ``sqrt(S)``.

    Column order follows the reference: by order, then sigma; order -1 once with sigma 0.0.
    Duplicate orders or sigmas give duplicate columns, as in the reference.
    """

    def __init__(self, orders: Sequence[int] | None = None, sigmas: Sequence[float] | None = None,
                 psp=None, overlap_threshold: float | None = None, square: bool | None = None):
        # defaults (None): the shipped feature set, written once in data/features-default.yaml
        from .config import feature_defaults

        d = feature_defaults()
        orders = d["orders"] if orders is None else orders
        sigmas = d["sigmas"] if sigmas is None else sigmas
        psp = d["psp"] if psp is None else psp
        overlap_threshold = d["overlap_threshold"] if overlap_threshold is None else overlap_threshold
        square = d["square"] if square is None else square
        if isinstance(orders, (int, np.integer)) or isinstance(orders, (str, bytes)):
            raise InputError(f"orders must be a list of integers, got {orders!r}")
        try:
            orders = list(orders)
        except TypeError:
            raise InputError(f"orders must be a list of integers, got {orders!r}") from None
        if not orders:
            raise InputError("orders must not be empty")
        for n in orders:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in VALID_ORDERS:
                raise InputError(f"orders: {n!r} is not a supported order (integers -1..9)")
        orders = [int(n) for n in orders]
        if isinstance(sigmas, (int, float, np.number)):
            sigmas = [sigmas]
        sig = _as_sorted_floats("sigmas", sigmas)
        if any(n >= 0 for n in orders) and not sig:
            raise InputError("sigmas must not be empty when orders >= 0 are requested")
        for s in sig:
            if not math.isfinite(s) or s <= 0.0:
                raise InputError(f"sigmas: {s!r} is not a positive finite width (Angstrom)")
        try:
            thr = float(overlap_threshold)
        except (TypeError, ValueError):
            raise InputError(f"overlap_threshold must be a number, got {overlap_threshold!r}") from None
        if not math.isfinite(thr) or not (0.0 < thr < 1.0):
            raise InputError(f"overlap_threshold must be in (0, 1), got {overlap_threshold!r}")
        if not isinstance(square, (bool, np.bool_)):
            raise InputError(f"square must be True or False, got {square!r}")

        self.orders = list(orders)
        self.sigmas = list(sig)
        self.overlap_threshold = thr
        self.square = bool(square)
        self.psp = load_psp(psp)

        fl: list[tuple[int, float]] = []
        for n in sorted(orders):
            if n == -1:
                fl.append((-1, 0.0))
            else:
                for s in sorted(sig):
                    fl.append((n, s))
        self.feature_list = fl
        self._prepare_tables()

    # ------------------------------------------------------------------ configuration
    @property
    def n_features(self) -> int:
        return len(self.feature_list)

    @property
    def psp_name(self) -> str:
        return self.psp.name

    @property
    def psp_sha256(self) -> str:
        return self.psp.sha256

    def config(self) -> dict:
        """JSON-serialisable settings; ``GMPFeaturizer.from_config`` rebuilds the featurizer."""
        from .psp import BUNDLED

        return {"orders": list(self.orders), "sigmas": list(self.sigmas),
                "psp": self.psp.name if self.psp.name in BUNDLED and self._bundled else self.psp.path,
                "psp_sha256": self.psp.sha256, "overlap_threshold": self.overlap_threshold,
                "square": self.square}

    @property
    def _bundled(self) -> bool:
        from .psp import bundled_path

        return str(bundled_path(self.psp.name)) == self.psp.path

    @classmethod
    def from_config(cls, cfg: dict) -> "GMPFeaturizer":
        known = {"orders", "sigmas", "psp", "psp_sha256", "overlap_threshold", "square"}
        extra = set(cfg) - known
        if extra:
            raise InputError(f"feature config has unknown keys {sorted(extra)}; known: {sorted(known)}")
        fz = cls(**{k: cfg[k] for k in ("orders", "sigmas", "psp", "overlap_threshold", "square")
                    if k in cfg})
        want = cfg.get("psp_sha256")
        if want and want != fz.psp_sha256:
            raise InputError(f"psp {cfg.get('psp')!r} has sha256 {fz.psp_sha256}, "
                             f"but the config asks for {want}")
        return fz

    def __repr__(self) -> str:
        return (f"GMPFeaturizer(orders={self.orders}, sigmas={self.sigmas}, psp={self.psp.name!r}, "
                f"overlap_threshold={self.overlap_threshold}, square={self.square})")

    def __getstate__(self):
        return {"cfg": self.config()}

    def __setstate__(self, state):
        other = GMPFeaturizer.from_config(state["cfg"])
        self.__dict__.update(other.__dict__)

    # ------------------------------------------------------------------ tables
    def _prepare_tables(self):
        # unique (order, sigma) computed once; duplicate columns are copies
        uorders = sorted({n for n in self.orders if n >= 0})
        usig = sorted(set(self.sigmas)) if uorders else []
        self._uorders = np.array(uorders, dtype=np.int64)
        self._usig = np.array(usig, dtype=np.float64)
        self._has_m1 = -1 in self.orders
        # cutoff classes: distinct order factors, ascending radius (= descending factor)
        facs = sorted({ORDER_FACTOR[n] for n in uorders}, reverse=True)
        self._class_factors = facs
        self._ocls = np.array([facs.index(ORDER_FACTOR[n]) for n in uorders], dtype=np.int64)
        ucols: list[tuple[int, float]] = []
        if self._has_m1:
            ucols.append((-1, 0.0))
        col = np.full((len(uorders), max(len(usig), 1)), -1, dtype=np.int64)
        for o, n in enumerate(uorders):
            for u, s in enumerate(usig):
                col[o, u] = len(ucols)
                ucols.append((n, s))
        self._col = col
        self._col_m1 = 0 if self._has_m1 else -1
        self._ucols = ucols
        self._colmap = np.array([ucols.index(p) for p in self.feature_list], dtype=np.int64)
        self._colmap_identity = (len(self._colmap) == len(ucols)
                                 and bool(np.array_equal(self._colmap, np.arange(len(ucols)))))
        self._kmax = max(uorders, default=0)
        self._species_cache: dict[tuple[int, ...], object] = {}
        self._element_cache: dict[int, dict] = {}
        self._lattice_cache: dict[tuple[bytes, bytes], tuple] = {}

    def _cutoff(self, n: int, sigma: float, B: float, beta: float) -> float:
        """Per-Gaussian cutoff radius R_{n,sigma,e,g} exactly as the reference (spec 7.1)."""
        t = self.overlap_threshold * ORDER_FACTOR[n]
        if n == -1:
            C1 = B
            C2 = -beta
        else:
            A = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
            alpha = 1.0 / (2.0 * sigma * sigma)
            tt = math.sqrt(math.pi / (alpha + beta))
            C1 = A * B * tt * tt * tt
            C2 = -alpha * beta / (alpha + beta)
        return math.sqrt((math.log(t) - abs(C1)) / C2)

    def cutoff_radius(self, order: int, sigma: float, element) -> float:
        """Element cutoff radius R_{n,sigma,e} in Angstrom (max over the element's Gaussians)."""
        z = self._z_of(element)
        g = self.psp.gaussians[z]
        return max((self._cutoff(order, sigma, B, be) for B, be in g), default=0.0)

    def search_radius(self, numbers) -> float:
        """R_search for a structure containing these atomic numbers (spec 7.1)."""
        return self._species_tables(tuple(sorted(set(int(z) for z in numbers)))).rsearch

    def _z_of(self, element) -> int:
        if isinstance(element, str):
            from ase.data import atomic_numbers

            if element not in atomic_numbers:
                raise InputError(f"element {element!r} is not a chemical symbol")
            z = atomic_numbers[element]
        else:
            z = int(element)
        if not self.psp.has(z):
            raise InputError(f"element {element_symbol(z)} (Z={z}) has no entry in psp file {self.psp.path}")
        return z

    def _element_tables(self, z: int) -> dict:
        """Per-element constants and cutoffs (cached): see :meth:`_species_tables`."""
        hit = self._element_cache.get(z)
        if hit is not None:
            return hit
        g = self.psp.gaussians[z]
        K = len(g)
        U = len(self._usig)
        C = len(self._class_factors)
        c1 = np.zeros((U, K))
        c2 = np.zeros((U, K))
        lam = np.zeros((U, K))
        r2 = np.zeros((U, C, K))
        r2m1 = np.zeros(K)
        rep_order = {}
        for n in self._uorders:
            rep_order.setdefault(ORDER_FACTOR[int(n)], int(n))
        rmax = 0.0
        for u, sigma in enumerate(self._usig):
            a = 1.0 / (2.0 * sigma * sigma)
            Anorm = (1.0 / (sigma * math.sqrt(2.0 * math.pi))) ** 3
            for k, (B, be) in enumerate(g):
                gam = a + be
                tt = math.sqrt(math.pi / gam)
                c1[u, k] = Anorm * B * tt * tt * tt
                c2[u, k] = -a * be / gam
                lam[u, k] = be / gam
                for c, f in enumerate(self._class_factors):
                    R = self._cutoff(rep_order[f], float(sigma), float(B), float(be))
                    r2[u, c, k] = R * R
                    rmax = max(rmax, R)
        if self._has_m1:
            for k, (B, be) in enumerate(g):
                R = self._cutoff(-1, 0.0, float(B), float(be))
                r2m1[k] = R * R
                rmax = max(rmax, R)
        # every squared cutoff of the element, sorted, and where each (sigma, class, g) sits in it
        vals = set(r2.ravel().tolist()) if U and C else set()
        if self._has_m1:
            vals |= set(r2m1.tolist())
        thr = np.array(sorted(vals), dtype=np.float64)
        pos = {v: b for b, v in enumerate(thr.tolist())}
        ridx = np.vectorize(pos.__getitem__, otypes=[np.int64])(r2) if r2.size else r2.astype(np.int64)
        ridxm1 = (np.array([pos[v] for v in r2m1.tolist()], dtype=np.int64) if self._has_m1
                  else np.zeros(K, dtype=np.int64))
        # lookup grid for the kernel's binning: gtab[k] <= number of thresholds below any D in
        # [k, k+1) / gscale (half a cell of margin against rounding)
        gscale = GRID_CELLS / thr[-1] if len(thr) and thr[-1] > 0 else 0.0
        edges = (np.arange(GRID_CELLS + 1) - 0.5) / gscale if gscale else np.zeros(GRID_CELLS + 1)
        gtab = np.searchsorted(thr, edges, side="left").astype(np.int64)
        out = {"g": g, "c1": c1, "c2": c2, "lam": lam, "thr": thr, "ridx": ridx,
               "ridxm1": ridxm1, "rmax": rmax, "gscale": gscale, "gtab": gtab}
        self._element_cache[z] = out
        return out

    def _species_tables(self, species: tuple[int, ...]):
        """The kernel's tables (:class:`~gmp_pipeline._kernels.KernelTables`) for the elements of
        one structure (species index s = position in ``species``), padded to the largest
        Gaussian count G and threshold count.  The one place they are built."""
        from ._kernels import KernelTables

        hit = self._species_cache.get(species)
        if hit is not None:
            return hit
        els = [self._element_tables(z) for z in species]
        S = len(species)
        G = max([len(e["g"]) for e in els] + [1])
        U = len(self._usig)
        C = len(self._class_factors)
        ng = np.array([len(e["g"]) for e in els], dtype=np.int64)
        Bs = np.zeros((S, G))
        betas = np.ones((S, G))
        c1 = np.zeros((max(U, 1), S, G))
        c2 = np.zeros((max(U, 1), S, G))
        lam = np.zeros((max(U, 1), S, G))
        ridx = np.zeros((max(U, 1), max(C, 1), S, G), dtype=np.int64)
        ridxm1 = np.zeros((S, G), dtype=np.int64)
        L = max(len(e["thr"]) for e in els) + 1  # at least one +inf ends every row
        thr = np.full((S, L), np.inf)
        nthr = np.zeros(S, dtype=np.int64)
        bo = np.zeros(S + 1, dtype=np.int64)
        gscale = np.array([e["gscale"] for e in els], dtype=np.float64)
        gtab = np.stack([e["gtab"] for e in els])
        for s, e in enumerate(els):
            K = ng[s]
            Bs[s, :K] = e["g"][:, 0]
            betas[s, :K] = e["g"][:, 1]
            c1[:U, s, :K] = e["c1"]
            c2[:U, s, :K] = e["c2"]
            lam[:U, s, :K] = e["lam"]
            ridx[:U, :C, s, :K] = e["ridx"]
            ridxm1[s, :K] = e["ridxm1"]
            thr[s, :len(e["thr"])] = e["thr"]
            nthr[s] = len(e["thr"])
            bo[s + 1] = bo[s] + len(e["thr"])
        # per sigma and species, the Gaussians by decreasing largest cutoff (the kernel takes
        # them two at a time, longest run first)
        gsort = np.zeros((max(U, 1), S, G), dtype=np.int64)
        for u in range(U):
            for s in range(S):
                K = ng[s]
                top = ridx[u, max(C, 1) - 1, s, :K]
                gsort[u, s, :K] = sorted(range(K), key=lambda g: (-int(top[g]), g))
        alpha = np.array([1.0 / (2.0 * s * s) for s in self._usig], dtype=np.float64)
        rsearch = max(e["rmax"] for e in els)
        t = _harmonics.order_tables()
        mono, mono_off, raise_idx = _harmonics.kernel_tables()
        out = KernelTables(
            ng=ng, Bs=Bs, betas=betas, c1=c1, c2=c2, lam=lam, alpha=alpha, thr=thr, nthr=nthr, bo=bo,
            gscale=gscale, gtab=gtab, ridx=ridx, ridxm1=ridxm1, gsort=gsort, ncls=C,
            rsearch=float(rsearch), ords=self._uorders, ocls=self._ocls, col=self._col,
            col_m1=int(self._col_m1), ncol=len(self._ucols), kmax=int(self._kmax), mono=mono,
            mono_off=mono_off, raise_idx=raise_idx, comp_start=t["comp_start"],
            comp_weight=t["comp_weight"], hcoef=t["hcoef"])
        if len(self._species_cache) > 4096:
            self._species_cache.clear()
        self._species_cache[species] = out
        return out

    # ------------------------------------------------------------------ input checks
    def _coerce(self, atoms):
        if isinstance(atoms, Structure):
            return atoms.numbers, atoms.positions, atoms.cell, atoms.pbc
        try:
            numbers = np.asarray(atoms.numbers)
            positions = np.asarray(atoms.positions, dtype=np.float64)
            cell = np.asarray(atoms.cell[:], dtype=np.float64)
            pbc = np.asarray(atoms.pbc, dtype=bool)
        except AttributeError:
            raise InputError(f"atoms must be an ase.Atoms or gmp_pipeline.Structure, got {type(atoms).__name__}") from None
        return numbers, positions, cell, pbc

    def _check(self, numbers, positions, cell, pbc):
        numbers = np.asarray(numbers)
        if numbers.ndim != 1 or numbers.shape[0] == 0:
            raise InputError(f"atoms: need at least one atom, got numbers of shape {numbers.shape}")
        positions = np.ascontiguousarray(positions, dtype=np.float64)
        if not positions.flags.writeable:  # (read-only input, e.g. a memory map: one kernel
            positions = positions.copy()   # signature for all inputs, so one compile)
        if positions.shape != (numbers.shape[0], 3):
            raise InputError(f"positions: shape {positions.shape} does not match {numbers.shape[0]} atoms")
        if not np.isfinite(positions).all():
            a = int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])
            raise InputError(f"positions: atom {a} has a non-finite position {positions[a].tolist()}")
        cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        pbc = np.asarray(pbc, dtype=bool).reshape(3)
        if not np.isfinite(cell).all():
            raise InputError(f"cell: non-finite entries {cell.tolist()}")
        zs = []
        for z in sorted(set(numbers.tolist())):  # (faster than np.unique on small arrays)
            z = int(z)
            if not self.psp.has(z) or z == 0:
                raise InputError(f"element {element_symbol(z)} (Z={z}) has no entry in psp file {self.psp.path}")
            zs.append(z)
        return numbers.astype(np.int64), positions, cell, pbc, tuple(zs)

    @staticmethod
    def _lattice(cell, pbc):
        """Periodic lattice rows, Cartesian->lattice-coordinate map and 1/interplanar spacings."""
        lat = np.zeros((3, 3))
        inv = np.zeros((3, 3))
        hinv = np.zeros(3)
        per = np.flatnonzero(pbc)
        if per.size == 0:
            return lat, inv, hinv, np.zeros(3, dtype=np.bool_)
        if per.size == 3:  # the common case in plain floats (numpy's 3x3 linalg is call overhead)
            a0, a1, a2 = cell.tolist()
            c0 = [a1[1] * a2[2] - a1[2] * a2[1], a1[2] * a2[0] - a1[0] * a2[2], a1[0] * a2[1] - a1[1] * a2[0]]
            c1 = [a2[1] * a0[2] - a2[2] * a0[1], a2[2] * a0[0] - a2[0] * a0[2], a2[0] * a0[1] - a2[1] * a0[0]]
            c2 = [a0[1] * a1[2] - a0[2] * a1[1], a0[2] * a1[0] - a0[0] * a1[2], a0[0] * a1[1] - a0[1] * a1[0]]
            det = a0[0] * c0[0] + a0[1] * c0[1] + a0[2] * c0[2]
            norms = [math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]) for v in (a0, a1, a2)]
            if min(norms) >= 1e-8 and abs(det) > 1e-8 * norms[0] * norms[1] * norms[2]:
                # inverse of the cell (rows a_k): columns c_k / det; h_k = |det| / |c_k|
                inv = np.array([c0, c1, c2]).T / det
                hinv = np.array([math.sqrt(c[0] * c[0] + c[1] * c[1] + c[2] * c[2]) / abs(det)
                                 for c in (c0, c1, c2)])
                return cell.copy(), inv, hinv, np.ones(3, dtype=np.bool_)
        A = cell[per]  # (p, 3) periodic lattice vectors
        norms = np.linalg.norm(A, axis=1)
        gram = A @ A.T
        vol = math.sqrt(max(float(np.linalg.det(gram)), 0.0))
        if np.any(norms < 1e-8) or vol <= 1e-8 * float(np.prod(norms)):
            raise InputError(
                f"cell: degenerate along periodic direction(s) {per.tolist()} "
                f"(cell={cell.tolist()}, pbc={pbc.tolist()}); a periodic direction needs a "
                "non-zero lattice vector independent of the other periodic ones")
        inv_gram = np.linalg.inv(gram)
        lat[per] = A
        inv[:, per] = A.T @ inv_gram
        hinv[per] = np.sqrt(np.diag(inv_gram))
        return lat, inv, hinv, np.asarray(pbc, dtype=np.bool_).copy()

    # ------------------------------------------------------------------ featurization
    def featurize(self, atoms, derivatives: bool = False, centers=None,
                  total: bool = True, _stop: int = 0) -> GMPResult:
        """Features (and position derivatives) of one structure.

        ``atoms``: an ``ase.Atoms`` or :class:`~gmp_pipeline.structure.Structure`.
        ``centers``: optional atom indices to featurize (default: every atom).
        ``total``: True (default) gives the total derivative, each probe centre moving with its
        atom (spec 8.2; what forces need); False gives the reference implementation's partial
        derivatives with the probe centres held fixed (spec 8.1), for validation.
        """
        from . import _kernels as K

        numbers, positions, cell, pbc, species = self._check(*self._coerce(atoms))
        N = numbers.shape[0]
        if centers is None:
            cidx = np.arange(N, dtype=np.int64)
        else:
            cidx = np.asarray(centers)
            if cidx.ndim != 1 or not np.issubdtype(cidx.dtype, np.integer) or (
                    cidx.size and (cidx.min() < -N or cidx.max() >= N)):
                raise InputError(f"centers must be atom indices in 0..{N - 1}, got {centers!r}")
            cidx = np.ascontiguousarray(cidx % N, dtype=np.int64) if cidx.size else cidx.astype(np.int64)
        tabs = self._species_tables(species)
        spc = np.searchsorted(np.array(species, dtype=np.int64), numbers)  # (species sorted)
        key = (cell.tobytes(), pbc.tobytes())
        lattice = self._lattice_cache.get(key)
        if lattice is None:  # (consecutive frames of a trajectory share their cell)
            lattice = self._lattice(cell, pbc)
            if len(self._lattice_cache) > 64:
                self._lattice_cache.clear()
            self._lattice_cache[key] = lattice
        lat, inv, hinv, per = lattice
        feats, dF, pair_j, pair_count = K.run(positions, spc, lat, inv, hinv, per, cidx, tabs,
                                              self.square, bool(derivatives), bool(total), int(_stop))
        cm = self._colmap
        identity = self._colmap_identity
        res = GMPResult(features=feats if identity else feats[:, cm], centers=cidx, n_atoms=N)
        if derivatives and not self.square and not _stop:
            _warn_near_zero(res.features, self.feature_list)
        if derivatives:
            res.pair_center = np.repeat(cidx, pair_count)
            res.pair_neighbor = pair_j
            res.dfeatures = dF if identity else np.ascontiguousarray(dF[:, :, cm])
        return res

    def featurize_many(self, structures: Iterable, derivatives: bool = False) -> list[GMPResult]:
        """Featurize several structures (ase.Atoms or Structure) in one call."""
        return [self.featurize(s, derivatives=derivatives) for s in structures]

    def warmup(self) -> None:
        """Compile (or load from numba's cache) the kernels, e.g. on each Dask worker."""
        import ase

        z = next(iter(z for z in self.psp.elements() if z > 0))
        atoms = ase.Atoms(numbers=[z, z], positions=[[0, 0, 0], [0.7, 0.2, 0.1]], cell=[3, 3, 3],
                          pbc=[True, False, False])
        self.featurize(atoms, derivatives=True)
