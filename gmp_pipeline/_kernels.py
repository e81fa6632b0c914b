"""Private numba kernels: neighbour search, GMP features and total position derivatives.

Nothing here validates input; :mod:`gmp_pipeline.features` does that and prepares the tables.

Work for one centre atom i (spec sections 5-8):

1. Every periodic image (j, T) with ``|d|^2 < R_search^2``, ``d = (T + r_j) - q_i``
   (:func:`_neighbors`), counting-sorted into *cutoff bins* (:func:`_bin_neighbors`): for each
   species the sorted list of all its squared cutoff radii splits distance into bins, so the
   images within any one cutoff are a prefix of that species' entries.
2. For each sigma, every (image, Gaussian) *term* within the Gaussian's largest cutoff goes to a
   term buffer, one run per (species, Gaussian), tagged with its cutoff class: the smallest
   class (orders with equal order factor share one) whose radius admits it
   (:func:`_fill_terms`).  Order n counts exactly the terms whose class is <= its own.
3. Per term the prefactor ``E = C1 exp(C2 D)`` (vectorizable exp, :func:`_vexp`) and
   ``u = lambda d``.  Spec 5 writes the overlap with ``H_abc`` through the 1-D Gaussian moments
   ``P_k``; since ``H_abc`` is harmonic, that overlap is exactly ``E H_abc(u)`` (see
   :mod:`._codegen`), so the moments of a probe monomial are ``E u_x^p u_y^q u_z^s``.  One generated loop (:mod:`._fused`) sums the raw moments of all
   orders in registers; contracted with the solid-harmonic tables they give ``mu_abc``, then
   ``S`` and ``F``.
4. Derivatives (spec 8.1 per term): ``d/dd [E Q] = 2 C2 d E Q + lambda E grad_u Q``.  Contracting
   with ``w mu`` first gives one polynomial ``U = sum_abc w mu_abc Q_abc`` per (centre, order,
   sigma), so each term needs ``U`` and its three partial derivatives only.  They are evaluated
   per *image* (one periodic image of a neighbour), not per term: with ``u = lambda d``,
   ``E u^m = (E lambda^n) d^m`` for a degree-n monomial m, so the terms of the image's Gaussians
   combine into weights ``W[n] = sum E lambda^n`` (and ``lambda^(n+1)``) and the gradient is a
   polynomial in d (about 2.3 terms per image on the bench set).  Images are scattered into
   their (i, j) block; the centre's own block then loses the sum of all blocks (spec 8.2, the
   total derivative with the probe centre moving with atom i).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# first: every kernel of this package caches in the machine-wide directory of _numba_cache
from ._numba_cache import compile_lock  # noqa: I001
from ._fused import FEATALL, GRAD, WIMG

_CACHE = True
#: options of the helpers that only jitted code calls: no Python-callable (cpython) wrapper and no
#: C-callable (cfunc) wrapper, which would be generated, optimised and compiled to machine code
#: for every helper on a cold compile and never used (the driver calls the function itself)
_INNER = dict(cache=_CACHE, no_cpython_wrapper=True, no_cfunc_wrapper=True)
#: fast-math without reassociation, for code whose rounding steps must stay as written
_EXACT = {"nnan", "ninf", "nsz", "arcp", "contract"}
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00


@njit(**_INNER)
def _neighbors(q, pos, lat, inv, hinv, per, rs, rs2, nb_j, nb_x, nb_y, nb_z, nb_D):
    """Images of all atoms within sqrt(rs2) of q.  Returns the count, or -needed on overflow.

    ``lat`` rows are the periodic lattice vectors (zero rows for non-periodic directions),
    ``inv`` maps a Cartesian vector to its coordinates along them, ``hinv[k]`` = 1/h_k with h_k
    the interplanar spacing.  For atom j the translations with |f_k + t_k| <= R/h_k along every
    periodic direction are enumerated: a box per atom that contains the search sphere.
    """
    n = pos.shape[0]
    cap = nb_j.shape[0]
    cnt = 0
    lo = _zeros(3, np.int64)
    hi = _zeros(3, np.int64)
    for j in range(n):
        ex = pos[j, 0] - q[0]
        ey = pos[j, 1] - q[1]
        ez = pos[j, 2] - q[2]
        for k in range(3):
            if per[k]:
                f = ex * inv[0, k] + ey * inv[1, k] + ez * inv[2, k]
                w = rs * hinv[k] * (1.0 + 1e-12) + 1e-12
                lo[k] = math.ceil(-w - f)
                hi[k] = math.floor(w - f)
            else:
                lo[k] = 0
                hi[k] = 0
        for t1 in range(lo[0], hi[0] + 1):
            for t2 in range(lo[1], hi[1] + 1):
                bx = t1 * lat[0, 0] + t2 * lat[1, 0]
                by = t1 * lat[0, 1] + t2 * lat[1, 1]
                bz = t1 * lat[0, 2] + t2 * lat[1, 2]
                for t3 in range(lo[2], hi[2] + 1):
                    tx = bx + t3 * lat[2, 0]
                    ty = by + t3 * lat[2, 1]
                    tz = bz + t3 * lat[2, 2]
                    dx = (tx + pos[j, 0]) - q[0]
                    dy = (ty + pos[j, 1]) - q[1]
                    dz = (tz + pos[j, 2]) - q[2]
                    D = dx * dx + dy * dy + dz * dz
                    if D < rs2:
                        if cnt < cap:
                            w = np.uint64(cnt)  # (unsigned: no wraparound code)
                            nb_j[w] = j
                            nb_x[w] = dx
                            nb_y[w] = dy
                            nb_z[w] = dz
                            nb_D[w] = D
                        cnt += 1
    if cnt > cap:
        return -cnt
    return cnt


@njit(**_INNER)
def _bin_neighbors(cnt, nb_j, nb_x, nb_y, nb_z, nb_D, nb_bin, spc, thr, nthr, bo, gscale, gtab,
                   s_j, s_x, s_y, s_z, s_D, bstart, counts):
    """Counting sort of the neighbour list into cutoff bins.

    Species s owns bins bo[s] .. bo[s+1]-1; its bin b holds the neighbours with
    thr[s, b-1] < D <= thr[s, b] (thr[s] ascending: every squared cutoff used for species s,
    padded with +inf).
    The neighbours of species s within thr[s, b] are the entries bstart[bo[s]]:bstart[bo[s]+b+1].
    Neighbours beyond every cutoff of their species are dropped.  Returns the number kept.

    The bin is found from a uniform grid in D: gtab[s, k] is a lower bound of the number of
    thresholds below any D in grid cell k = int(D * gscale[s]); a short scan finishes it.
    """
    nb = bstart.shape[0] - 1
    ncell = gtab.shape[1] - 1
    for b in range(nb + 1):
        counts[b] = 0
    one = np.uint64(1)
    for t in range(cnt):  # (unsigned indices: numba's negative-index wraparound is skipped)
        s = np.uint64(spc[np.uint64(nb_j[t])])
        D = nb_D[t]
        kc = np.int64(D * gscale[s])  # (D >= 0: truncation is the floor)
        if kc > ncell:
            kc = ncell
        k = np.uint64(kc)
        b = np.uint64(gtab[s, k])
        while thr[s, b] < D:  # rows end with +inf
            b += one
        if b >= np.uint64(nthr[s]):
            nb_bin[t] = -1
        else:
            bb = np.uint64(bo[s]) + b
            nb_bin[t] = bb
            counts[bb + one] += 1
    for b in range(nb):
        counts[b + 1] += counts[b]
    for b in range(nb + 1):
        bstart[b] = counts[b]
    for t in range(cnt):
        if nb_bin[t] < 0:
            continue
        bb = np.uint64(nb_bin[t])
        p = np.uint64(counts[bb])
        counts[bb] += 1
        s_j[p] = nb_j[t]
        s_x[p] = nb_x[t]
        s_y[p] = nb_y[t]
        s_z[p] = nb_z[t]
        s_D[p] = nb_D[t]
    return bstart[nb]


@njit(**_INNER, inline="always")
def _sort_ints(a, k):
    """Sort a[:k] in place (Shell sort, gaps 3h+1: a few lines that compile in no time, unlike
    np.sort).  Inlined into the caller by numba (integers only, so the caller's fastmath
    flags do not matter): no compile of its own."""
    h = 1
    while h < k // 3:
        h = 3 * h + 1
    while h >= 1:
        for i in range(h, k):
            v = a[i]
            j = i
            while j >= h and a[j - h] > v:
                a[j] = a[j - h]
                j -= h
            a[j] = v
        h //= 3


@intrinsic
def _bits_to_f64(typingctx, x):
    """The float64 with the IEEE bits of the int64 x (a register bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


def _check_new_array(shape, dtype):
    """Typing shared by :func:`_empty` and :func:`_zeros`: (array type, ndim) or None."""
    if isinstance(shape, types.Integer):
        nd = 1
    elif isinstance(shape, types.BaseTuple) and all(isinstance(t, types.Integer) for t in shape):
        nd = len(shape)
    else:
        return None
    if not isinstance(dtype, types.NumberClass):
        return None
    return types.Array(dtype.instance_type, nd, "C")


def _lower_new_array(context, builder, sig, args, zero):
    """A new C-order array of sig.return_type with the shape args[0]: one aligned NRT
    allocation (MemoryError if it fails), optionally zero-filled.  numba's own np.empty
    lowering adds overflow checks of the size product and goes through a jitted allocator
    function; the kernels' sizes are small non-negative products, so this keeps the inline code
    to a few instructions per allocation (about 40 sites in the driver)."""
    from numba.core import cgutils
    from numba.np.arrayobj import make_array, populate_array

    aty = sig.return_type
    shty = sig.args[0]
    if isinstance(shty, types.Integer):
        shapes = [context.cast(builder, args[0], shty, types.intp)]
    else:
        shapes = [context.cast(builder, v, t, types.intp)
                  for v, t in zip(cgutils.unpack_tuple(builder, args[0]), shty)]
    intp = context.get_value_type(types.intp)
    itemsize = context.get_abi_sizeof(context.get_data_type(aty.dtype))
    strides = [ir.Constant(intp, itemsize)]
    for dim in reversed(shapes[1:]):
        strides.append(builder.mul(strides[-1], dim))
    strides.reverse()
    nbytes = builder.mul(strides[0], shapes[0])
    align = context.get_preferred_array_alignment(aty.dtype)
    meminfo = context.nrt.meminfo_alloc_aligned(builder, nbytes, align)
    data = context.nrt.meminfo_data(builder, meminfo)
    if zero:
        cgutils.memset(builder, data, nbytes, 0)
    ary = make_array(aty)(context, builder)
    populate_array(ary, data=builder.bitcast(data, context.get_data_type(aty.dtype).as_pointer()),
                   shape=cgutils.pack_array(builder, shapes, ty=intp),
                   strides=cgutils.pack_array(builder, strides, ty=intp),
                   itemsize=ir.Constant(intp, itemsize), meminfo=meminfo)
    return ary._getvalue()  # a new reference


@intrinsic
def _empty(typingctx, shape, dtype):
    """``_empty(shape, dtype)`` (C order; shape an int or a tuple of non-negative ints, dtype
    a NumPy scalar type such as np.float64), lowered inline where it is called.

    numba's np.empty/np.zeros/np.full compile a separate function for every distinct argument
    signature (typing, lowering, optimisation and machine code of each, then optimised again in
    every caller): about a second of a cold compile for the driver's handful of signatures.
    """
    rt = _check_new_array(shape, dtype)
    if rt is None:
        return None

    def codegen(context, builder, sig, args):
        return _lower_new_array(context, builder, sig, args, False)
    return rt(shape, dtype), codegen


@intrinsic
def _zeros(typingctx, shape, dtype):
    """``_zeros(shape, dtype)``: :func:`_empty` with the memory set to zero bytes."""
    rt = _check_new_array(shape, dtype)
    if rt is None:
        return None

    def codegen(context, builder, sig, args):
        return _lower_new_array(context, builder, sig, args, True)
    return rt(shape, dtype), codegen


@intrinsic
def _flat(typingctx, a):
    """``a.reshape(-1)`` for a C-contiguous array: the same memory as one dimension."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None
    rt = a.copy(ndim=1)

    def codegen(context, builder, sig, args):
        from numba.core.imputils import impl_ret_borrowed
        from numba.np.arrayobj import make_array, populate_array

        src = make_array(sig.args[0])(context, builder, value=args[0])
        dst = make_array(sig.return_type)(context, builder)
        populate_array(dst, data=src.data, shape=[src.nitems], strides=[src.itemsize],
                       itemsize=src.itemsize, meminfo=src.meminfo, parent=src.parent)
        return impl_ret_borrowed(context, builder, sig.return_type, dst._getvalue())
    return rt(a), codegen


@njit(**_INNER, fastmath=_EXACT)
def _vexp(T, arg, scale, ibuf):
    """scale[t] *= exp(arg[t]) for arg <= 0, vectorizable (numba's math.exp is a scalar call).

    Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-13 Taylor polynomial for e^r
    (truncation < 1e-17 relative) and 2^n assembled from its IEEE bits (a register bitcast, so
    one pass; ibuf is unused).  Arguments below -708 are clamped (such terms are < 1e-307 of
    their prefactor).
    """
    for t in range(T):
        x = arg[t]
        if x < -708.0:
            x = -708.0
        nf = math.floor(x * _INV_LN2 + 0.5)
        r = (x - nf * _LN2_HI) - nf * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        scale[t] = (scale[t] * p) * _bits_to_f64((np.int64(nf) + 1023) << 52)


@njit(**_INNER, fastmath=True)
def _fill_terms(s_x, s_y, s_z, s_D, bstart, bo, nspecies, ng, c1, c2, lam, ridx, u, ncls, tb,
                ibuf):
    """Write the contributing terms of one sigma; returns their number T.

    Terms come in one run per (species, Gaussian): the neighbours within the largest cutoff
    class of that Gaussian, nearest bins first.  tc[t] is the term's cutoff class, the smallest
    class whose radius admits it, so order n counts exactly the terms with tc <= class(n).
    Rows of tb: 0 E (C1 times the exponential), 1 the exponent, 2-4 lambda d, 6 tc (rows 5 and
    7 are not written here; order -1 uses 7).  Tables c1/c2/lam/ridx are indexed by sigma u.
    """
    p = 0
    for s in range(nspecies):
        a = bstart[bo[s]]
        if a == bstart[bo[s + 1]]:
            continue
        b0 = bo[s] + 1
        for g in range(ng[s]):
            C1 = c1[u, s, g]
            C2 = c2[u, s, g]
            lm = lam[u, s, g]
            L = bstart[b0 + ridx[u, ncls - 1, s, g]] - a
            # one pass per run (runs are short, so each extra loop costs its set-up): the
            # class tag of up to two classes in the same loop, more classes by extra passes.
            # Unsigned indices: numba's negative-index wraparound code is skipped, so LLVM
            # vectorizes the loops (signed indices from a kept them scalar), and no views are
            # made (each costs a reference-count increment and decrement).
            Lc = bstart[b0 + ridx[u, 0, s, g]] - a if ncls > 1 else L
            up = np.uint64(p)
            ua = np.uint64(a)
            for k in range(L):
                ku = np.uint64(k)
                t = up + ku
                v = ua + ku
                tb[0, t] = C1
                tb[1, t] = C2 * s_D[v]
                tb[2, t] = lm * s_x[v]
                tb[3, t] = lm * s_y[v]
                tb[4, t] = lm * s_z[v]
                tb[6, t] = 1.0 if k >= Lc else 0.0
            for c in range(1, ncls - 1):
                Lc = bstart[b0 + ridx[u, c, s, g]] - a
                for k in range(Lc, L):
                    tb[6, up + np.uint64(k)] += 1.0
            p += L
    _vexp(np.int64(p), tb[1], tb[0], ibuf)
    return p


class KernelTables(NamedTuple):
    """Everything the kernel needs besides the structure: one object across the kernel boundary,
    built in one place (``GMPFeaturizer._species_tables``) for one feature set and one set of
    species present (species index s = position in that sorted set), padded to the largest
    Gaussian count G.  numba passes it as a heterogeneous named tuple.

    Per species s and Gaussian g: ``ng[s]`` Gaussians, amplitudes ``Bs`` and exponents ``betas``.
    Per unique sigma u: ``c1/c2/lam[u, s, g]`` term constants (spec 5) and ``alpha[u]``.
    Cutoffs: ``thr[s, :nthr[s]]`` the sorted squared cutoff radii of species s (bins
    ``bo[s]..bo[s+1]-1``, see :func:`_bin_neighbors`), ``gscale``/``gtab`` the grid that finds a
    bin; ``ridx[u, c, s, g]`` / ``ridxm1[s, g]`` locate the cutoff of class c / of order -1 in
    ``thr[s]``; ``ncls`` cutoff classes; ``rsearch`` the search radius; ``gsort[u, s]`` the
    species' Gaussians by decreasing largest cutoff at sigma u (the derivatives' per-image
    weights take them four at a time, longest run first).
    Features: ``ords[o]``/``ocls[o]`` the orders >= 0 and their cutoff class, ``col[o, u]`` /
    ``col_m1`` output columns (-1 if absent), ``ncol`` columns, ``kmax`` the largest order.
    Harmonics: ``mono[k]`` = (p, q, s) by global monomial index, ``mono_off[n]`` first index of
    degree n, ``raise_idx[a, k]`` index of monomial k with exponent a raised by one,
    ``comp_start``/``comp_weight``/``hcoef`` the solid-harmonic tables (:mod:`._harmonics`).
    """

    ng: np.ndarray
    Bs: np.ndarray
    betas: np.ndarray
    c1: np.ndarray
    c2: np.ndarray
    lam: np.ndarray
    alpha: np.ndarray
    thr: np.ndarray
    nthr: np.ndarray
    bo: np.ndarray
    gscale: np.ndarray
    gtab: np.ndarray
    ridx: np.ndarray
    ridxm1: np.ndarray
    gsort: np.ndarray
    ncls: int
    rsearch: float
    ords: np.ndarray
    ocls: np.ndarray
    col: np.ndarray
    col_m1: int
    ncol: int
    kmax: int
    mono: np.ndarray
    mono_off: np.ndarray
    raise_idx: np.ndarray
    comp_start: np.ndarray
    comp_weight: np.ndarray
    hcoef: np.ndarray


def _typed_target(typingctx, f, args):
    """(function type, signature) of the jitted function f called with argument types args
    (compiled for them here, or found among its compiled specialisations).  Literal argument
    types are widened first (an int that the caller's type inference still sees as its initial
    constant would otherwise compile the loop a second time)."""
    fty = types.Dispatcher(f)
    fsig = typingctx.resolve_function_type(fty, tuple(types.unliteral(a) for a in args), {})
    if fsig is None:
        raise TypeError(f"{f} cannot be called with {args}")
    return fty, fsig


def _lower_target_call(context, builder, target, starty, star):
    """Emit a call of a typed target (from :func:`_typed_target`) with the arguments packed in
    the star-argument tuple ``star`` (type ``starty``) at the builder's position, exactly as
    numba lowers a call of a jitted function (its library is linked in)."""
    from numba.core import cgutils

    fty, fsig = target
    vals = [context.cast(builder, v, t, ft)
            for v, t, ft in zip(cgutils.unpack_tuple(builder, star), starty.types, fsig.args)]
    return context.get_function(fty, fsig)(builder, vals)


@intrinsic
def _featall(typingctx, K, *args):
    """``FEATALL[K](*args)`` for a literal K: the generated moment loop of orders 0..K.

    An intrinsic rather than an ``@overload`` whose implementation calls FEATALL[K]: an overload
    implementation is a jitted function of its own, i.e. one more level that is typed, lowered,
    optimised, compiled to machine code and then optimised again in the caller.  This call is
    emitted directly in the caller (the driver), which calls the generated loop itself.
    """
    if not isinstance(K, types.IntegerLiteral):
        return None
    target = _typed_target(typingctx, FEATALL[K.literal_value], args)

    def codegen(context, builder, sig, llargs):
        return _lower_target_call(context, builder, target, sig.args[1], llargs[1])
    return target[1].return_type(K, types.StarArgTuple.from_types(args)), codegen


@intrinsic
def _wimg(typingctx, K, *args):
    """``WIMG[K](*args)`` for a literal K: the generated per-image weights of orders 0..K, called
    directly from the driver (see :func:`_featall`)."""
    if not isinstance(K, types.IntegerLiteral):
        return None
    target = _typed_target(typingctx, WIMG[K.literal_value], args)

    def codegen(context, builder, sig, llargs):
        return _lower_target_call(context, builder, target, sig.args[1], llargs[1])
    return target[1].return_type(K, types.StarArgTuple.from_types(args)), codegen


@intrinsic
def _grad(typingctx, K, n, *args):
    """``GRAD[n](*args)`` for a run-time order ``0 <= n <= K`` (K literal: only the loops of
    orders 0..K are compiled), nothing for another n.  A switch on n emitted in the caller,
    each case a direct call of a generated loop (no dispatch function of its own; see
    :func:`_featall`).  The loops return nothing."""
    if not isinstance(K, types.IntegerLiteral) or not isinstance(n, types.Integer):
        return None
    targets = [_typed_target(typingctx, GRAD[k], args) for k in range(K.literal_value + 1)]

    def codegen(context, builder, sig, llargs):
        nv = llargs[1]
        done = builder.append_basic_block("grad.done")
        sw = builder.switch(nv, done)
        for k, target in enumerate(targets):
            bb = builder.append_basic_block(f"grad.{k}")
            sw.add_case(ir.Constant(nv.type, k), bb)
            builder.position_at_end(bb)
            _lower_target_call(context, builder, target, sig.args[2], llargs[2])
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()
    return types.none(K, n, types.StarArgTuple.from_types(args)), codegen


@njit(cache=_CACHE, no_cfunc_wrapper=True)
def _featurize(pos, spc, lat, inv, hinv, per, centers, tabs, square, deriv, total, stop, K):
    """Features (nc, ncol) and, if deriv, total derivatives (P, 3, ncol) with pair lists, for
    largest order ``K`` (a literal, so a compile-time constant: see featurize_structure), for
    the centres ``centers`` of the structure (positions ``pos``, species index ``spc``; lattice
    from ``GMPFeaturizer._lattice``) with the tables ``tabs`` (:class:`KernelTables`).

    Returns (features, dF, pair_j, pair_count); the pairs of centre c are the next
    pair_count[c] rows, neighbours ascending.  With total=False dF holds the reference's partial
    derivatives (probe centres held fixed, spec 8.1) instead of the total ones.

    ``stop`` (for benchmarks/bench_kernel.py's stage timings; 0 = everything): stop each centre
    after 1 the neighbour search, 2 the binning, 3 the term buffers (order -1 and, with
    derivatives, the per-image weights included),
    4 the moment loops and features, 5 the gradient loops (no scatter into the blocks).
    The results are then incomplete.
    """
    ng = tabs.ng
    Bs = tabs.Bs
    betas = tabs.betas
    c1 = tabs.c1
    c2 = tabs.c2
    lam = tabs.lam
    alpha = tabs.alpha
    thr = tabs.thr
    nthr = tabs.nthr
    bo = tabs.bo
    gscale = tabs.gscale
    gtab = tabs.gtab
    ridx = tabs.ridx
    ridxm1 = tabs.ridxm1
    gsort = tabs.gsort
    ncls = tabs.ncls
    rs = tabs.rsearch
    ords = tabs.ords
    ocls = tabs.ocls
    col = tabs.col
    col_m1 = tabs.col_m1
    ncol = tabs.ncol
    mono = tabs.mono
    mono_off = tabs.mono_off
    raise_idx = tabs.raise_idx
    comp_start = tabs.comp_start
    comp_weight = tabs.comp_weight
    hcoef = tabs.hcoef
    n = pos.shape[0]
    nc = centers.shape[0]
    nspecies = ng.shape[0]
    G = Bs.shape[1]
    nsig = alpha.shape[0]
    nord = ords.shape[0]
    nord1 = nord if nord > 0 else 1  # (max() would compile one more function)

    rs2 = rs * rs
    feats = _zeros((nc, ncol), np.float64)
    pcap = 0
    dF = _empty((0, 3, ncol), np.float64)
    pair_j = _empty(0, np.int64)
    pair_count = _zeros(nc, np.int64)
    npairs = 0
    jlist = _empty(n, np.int64)
    slot = _empty(n, np.int64)
    for j in range(n):
        slot[j] = -1

    nbins = bo[nspecies]
    bstart = _empty(nbins + 1, np.int64)
    bcount = _empty(nbins + 1, np.int64)
    mom = _empty(286, np.float64)  # raw moments of every degree 0..9, by global monomial index
    ocls_of_n = _zeros(10, np.float64)  # cutoff class of each order (orders not asked for: class 0)
    for o in range(nord):
        ocls_of_n[ords[o]] = ocls[o]
    mu = _empty(66, np.float64)
    uc = _empty(66, np.float64)
    ux = _empty(66, np.float64)
    uy = _empty(66, np.float64)
    uz = _empty(66, np.float64)
    gend = _zeros(nord1, np.int64)
    csum = _zeros(3 * ncol, np.float64)
    # the (i, j) blocks of one centre, laid out as its rows of dF (so they go out in one
    # contiguous copy) but in a buffer that stays in cache; flat, indexed unsigned
    blk = _zeros(n * 3 * ncol if deriv else 0, np.float64)

    cap = 0
    tcap = 0
    # scratch, sized on first use and grown when a centre has more neighbours
    nb_j = _empty(0, np.int64)
    nb_bin = _empty(0, np.int64)
    nb_x = _empty(0, np.float64)
    nb_y = _empty(0, np.float64)
    nb_z = _empty(0, np.float64)
    nb_D = _empty(0, np.float64)
    s_j = _empty(0, np.int64)
    s_x = _empty(0, np.float64)
    s_y = _empty(0, np.float64)
    s_z = _empty(0, np.float64)
    s_D = _empty(0, np.float64)
    tj = _empty(0, np.int64)
    ibuf = _empty(0, np.int64)
    tb = _empty((8, 0), np.float64)
    tE = tb[0]
    tux = tb[2]
    tuy = tb[3]
    tuz = tb[4]
    tc = tb[6]
    tl = tb[7]
    Gt = _empty((3 * nord1, 0), np.float64)
    trow = _empty(0, np.uint64)
    # derivatives: per-image weights of one sigma (rows: degree n, then n+1; _fused.wimg),
    # zeros, not empty: wimg multiplies the old contents by keep = 0 on its first pass
    W = _zeros((2 * (K + 1), 0), np.float64)
    gw = 4  # Gaussians per wimg call (_codegen.GW)
    pg = _zeros(gw, np.int64)
    gl = _zeros(gw * (K + 1), np.int64)
    gq = _zeros(gw * (K + 1), np.float64)
    pst = _zeros(G, np.int64)
    plen = _zeros(G, np.int64)
    ocls_i = _zeros(K + 1, np.int64)
    for o in range(nord):
        if ords[o] <= K:
            ocls_i[ords[o]] = ocls[o]
    cx = _empty(0, np.float64)
    cy = _empty(0, np.float64)
    cz = _empty(0, np.float64)
    ctrow = _empty(0, np.uint64)

    for ci in range(nc):
        i = centers[ci]
        q = pos[i]
        cnt = -128
        if cap > 0:
            cnt = _neighbors(q, pos, lat, inv, hinv, per, rs, rs2, nb_j, nb_x, nb_y, nb_z, nb_D)
        while cnt < 0:  # (re)allocate every per-neighbour scratch array and search again
            cap = -cnt * 5 // 4 + 16
            tcap = cap * G
            nb_j = _empty(cap, np.int64)
            nb_bin = _empty(cap, np.int64)
            nb_x = _empty(cap, np.float64)
            nb_y = _empty(cap, np.float64)
            nb_z = _empty(cap, np.float64)
            nb_D = _empty(cap, np.float64)
            s_j = _empty(cap, np.int64)
            s_x = _empty(cap, np.float64)
            s_y = _empty(cap, np.float64)
            s_z = _empty(cap, np.float64)
            s_D = _empty(cap, np.float64)
            tj = _empty(tcap, np.int64)
            ibuf = _empty(tcap, np.int64)
            # (+ cap: wimg reads up to a species' longest run past a shorter run's start;
            # zeros, so whatever it reads there is finite)
            tb = _zeros((8, tcap + cap), np.float64)
            tE = tb[0]
            tux = tb[2]
            tuy = tb[3]
            tuz = tb[4]
            tc = tb[6]
            tl = tb[7]
            if deriv:
                W = _zeros((2 * (K + 1), cap), np.float64)
                cx = _empty(cap, np.float64)
                cy = _empty(cap, np.float64)
                cz = _empty(cap, np.float64)
                Gt = _empty((3 * nord1, cap), np.float64)
                trow = _empty(cap, np.uint64)
                ctrow = _empty(cap, np.uint64)
            cnt = _neighbors(q, pos, lat, inv, hinv, per, rs, rs2, nb_j, nb_x, nb_y, nb_z, nb_D)
        if stop == 1:
            continue
        cnt = _bin_neighbors(cnt, nb_j, nb_x, nb_y, nb_z, nb_D, nb_bin, spc, thr, nthr, bo,
                             gscale, gtab, s_j, s_x, s_y, s_z, s_D, bstart, bcount)
        if stop == 2:
            continue
        base = npairs
        if deriv:
            # pair list of this centre: the centre and every atom with an image inside a cutoff
            k = 0
            slot[i] = 0
            jlist[k] = i
            k += 1
            for t in range(cnt):
                j = s_j[t]
                if slot[j] < 0:
                    slot[j] = 0
                    jlist[k] = j
                    k += 1
            if 8 * k >= n:  # dense: a scan of the marks is sorted for free
                k = 0
                for j in range(n):
                    if slot[j] == 0:
                        jlist[k] = j
                        k += 1
            else:
                _sort_ints(jlist, k)
            jl = jlist
            if npairs + k > pcap:
                # grow to what the centres so far predict for all of them (rows are zeroed
                # when a centre takes them, so the slack is never touched)
                est = (npairs + k) * nc // (ci + 1)
                # min(max(est + est // 8 + k, 2 pcap, need), max(nc n, need)), without min/max
                need = npairs + k
                grow = est + est // 8 + k
                if grow < 2 * pcap:
                    grow = 2 * pcap
                if grow < need:
                    grow = need
                lim = nc * n
                if lim < need:
                    lim = need
                pcap = grow if grow < lim else lim
                bigger = _empty((pcap, 3, ncol), np.float64)
                for r in range(npairs):  # explicit loops: slice assignment compiles slowly
                    for kk in range(3):
                        for m in range(ncol):
                            bigger[r, kk, m] = dF[r, kk, m]
                dF = bigger
                pj = _empty(pcap, np.int64)
                for r in range(npairs):
                    pj[r] = pair_j[r]
                pair_j = pj
            for kk in range(k):
                slot[jl[kk]] = kk
                pair_j[base + kk] = jl[kk]
            pair_count[ci] = k
            npairs += k
            # the centre's blocks start at zero; each image's block as a flat offset in blk
            rw = 3 * ncol
            for r in range(k * rw):
                blk[np.uint64(r)] = 0.0
            urw = np.uint64(rw)
            for t in range(cnt):
                trow[t] = np.uint64(slot[s_j[t]]) * urw

        # ---- order -1: the model density at the centre --------------------------------
        if col_m1 >= 0:
            m = col_m1
            T1 = 0
            for s in range(nspecies):
                a = bstart[bo[s]]
                for g in range(ng[s]):
                    L = bstart[bo[s] + ridxm1[s, g] + 1] - a
                    B = Bs[s, g]
                    be = -betas[s, g]
                    ut = np.uint64(T1)  # (unsigned indices, no views: see _fill_terms)
                    ua = np.uint64(a)
                    for k in range(L):
                        ku = np.uint64(k)
                        t = ut + ku
                        tj[t] = a + k
                        tb[0, t] = B
                        tb[1, t] = be * s_D[ua + ku]
                        tb[7, t] = be
                    T1 += L
            _vexp(np.int64(T1), tb[1], tE, ibuf)
            dens = 0.0
            for t in range(T1):
                dens += tE[t]
            S = dens * dens
            F = S if square else math.sqrt(S)
            if not square and F < 1e-15:
                F = 0.0
            feats[ci, m] = F
            if deriv and F != 0.0:
                # dS/dd = 2 mu sum(-2 beta B e^{-beta D} d);  sqrt mode: divided by 2F
                scale = 4.0 * dens if square else 2.0 * dens / F
                um = np.uint64(m)
                uncol = np.uint64(ncol)
                for t in range(T1):
                    e = tl[t] * tE[t] * scale
                    st = tj[t]
                    r = trow[st] + um
                    blk[r] += e * s_x[st]
                    blk[r + uncol] += e * s_y[st]
                    blk[r + uncol + uncol] += e * s_z[st]

        # ---- orders >= 0, one sigma at a time -----------------------------------------
        # Per image (one periodic image of a neighbour, index into the binned list), the terms
        # of all its Gaussians combine into one weight per degree: with u = lambda d,
        # E u^m = (E lambda^n) d^m for a degree-n monomial m, so the moments and gradients are
        # polynomials in d evaluated once per image, weighted by W[n] = sum E lambda^n.
        if nord > 0:
            for u in range(nsig):
                T = _fill_terms(s_x, s_y, s_z, s_D, bstart, bo, nspecies, ng, c1, c2, lam, ridx, u,
                                ncls, tb, ibuf)
                nimg = 0
                if deriv:
                    # The derivatives go by image (one periodic image of a neighbour): with
                    # u = lambda d, E u^m = (E lambda^n) d^m for a degree-n monomial m, so the
                    # terms of all the image's Gaussians combine into per-degree weights
                    # W[n] = sum E lambda^n (and W[K+1+n] with lambda^(n+1)), and the gradient
                    # is a polynomial in d evaluated, and scattered, once per image.  The images
                    # of each species within any of its cutoffs at this sigma (a prefix of its
                    # binned entries) go one species after another into cx/cy/cz (ctrow).
                    p = 0
                    for s in range(nspecies):
                        a = bstart[bo[s]]
                        if a == bstart[bo[s + 1]]:
                            continue  # (as _fill_terms: no runs)
                        b0 = bo[s] + 1
                        for g in range(ng[s]):  # the runs of _fill_terms
                            L = bstart[b0 + ridx[u, ncls - 1, s, g]] - a
                            pst[g] = p
                            plen[g] = L
                            p += L
                        Lmax = plen[gsort[u, s, 0]]
                        if Lmax <= 0:
                            continue
                        # (unsigned indices: no wraparound code, so plain vector copies)
                        ua = np.uint64(a)
                        uo = np.uint64(nimg)
                        for k in range(Lmax):
                            ku = np.uint64(k)
                            cx[uo + ku] = s_x[ua + ku]
                            cy[uo + ku] = s_y[ua + ku]
                            cz[uo + ku] = s_z[ua + ku]
                            ctrow[uo + ku] = trow[ua + ku]
                        # the species' Gaussians gw at a time, longest run first
                        for g0 in range(0, ng[s], gw):
                            n0 = plen[gsort[u, s, g0]]
                            if n0 <= 0:
                                break
                            for gi in range(gw):
                                if g0 + gi < ng[s]:
                                    g = gsort[u, s, g0 + gi]
                                    pg[gi] = pst[g]
                                    lm = lam[u, s, g]
                                    pw = lm
                                    for m in range(K + 1):
                                        gl[gi * (K + 1) + m] = bstart[b0 + ridx[u, ocls_i[m], s, g]] - a
                                        gq[gi * (K + 1) + m] = pw
                                        pw *= lm
                                else:
                                    pg[gi] = 0
                                    for m in range(K + 1):
                                        gl[gi * (K + 1) + m] = 0
                                        gq[gi * (K + 1) + m] = 0.0
                            _wimg(K, n0, tE, pg, gl, gq, W, nimg, 0.0 if g0 == 0 else 1.0)
                        nimg += Lmax
                if stop == 3:
                    continue
                m2a = -2.0 * alpha[u]
                _featall(K, T, ocls_of_n, tc, tE, tux, tuy, tuz, mom)
                for o in range(nord):
                    gend[o] = 0
                    m = col[o, u]
                    if m < 0:
                        continue
                    nn = ords[o]
                    m0 = mono_off[nn]
                    nm = mono_off[nn + 1] - m0
                    r0 = comp_start[nn]
                    r1 = comp_start[nn + 1]
                    S = 0.0
                    vm = mom[m0:m0 + nm]
                    for rr in range(r1 - r0):
                        hr = hcoef[r0 + rr]
                        acc = 0.0
                        for k in range(nm):
                            acc += hr[k] * vm[k]
                        mu[rr] = acc
                        S += comp_weight[r0 + rr] * acc * acc
                    F = S if square else math.sqrt(S)
                    if not square and F < 1e-15:
                        F = 0.0
                    feats[ci, m] = F
                    if not deriv or F == 0.0 or stop == 4:
                        continue
                    # U = sum_abc w mu_abc Q_abc on the degree-nn monomials, scaled for the chain
                    # rule (square: dS = 2 ...; sqrt: dF = dS / 2F); its gradient on degree nn-1
                    sc = 2.0 if square else 1.0 / F
                    for k in range(nm):
                        acc = 0.0
                        for r in range(r0, r1):
                            acc += comp_weight[r] * mu[r - r0] * hcoef[r, k]
                        uc[k] = acc * sc
                    if nn > 0:
                        l0 = mono_off[nn - 1]
                        for k in range(m0 - l0):
                            mm = l0 + k
                            ux[k] = (mono[mm, 0] + 1) * uc[raise_idx[0, mm] - m0]
                            uy[k] = (mono[mm, 1] + 1) * uc[raise_idx[1, mm] - m0]
                            uz[k] = (mono[mm, 2] + 1) * uc[raise_idx[2, mm] - m0]
                    _grad(K, nn, nimg, cx, cy, cz, W, nn, K + 1 + nn, m2a, uc, ux, uy, uz, Gt,
                          3 * o)
                    gend[o] = 1
                if not deriv:
                    continue
                # scatter every order's per-image gradient into its (i, j) block of dF
                if stop == 5:
                    nimg = 0
                uncol = np.uint64(ncol)
                for o in range(nord):
                    if gend[o] == 0:
                        continue
                    um = np.uint64(col[o, u])
                    o0 = np.uint64(3 * o)
                    o1 = o0 + np.uint64(1)
                    o2 = o0 + np.uint64(2)
                    for k in range(nimg):
                        ku = np.uint64(k)
                        r = ctrow[ku] + um
                        blk[r] += Gt[o0, ku]
                        blk[r + uncol] += Gt[o1, ku]
                        blk[r + uncol + uncol] += Gt[o2, ku]

        if deriv:
            kp = pair_count[ci]
            rw = 3 * ncol
            urw = np.uint64(rw)
            if total:  # the centre's own block loses the sum of all its blocks
                for a in range(rw):
                    csum[a] = 0.0
                for r in range(kp):
                    ur = np.uint64(r) * urw
                    for a in range(rw):
                        csum[a] += blk[ur + np.uint64(a)]
                ur = np.uint64(slot[i]) * urw
                for a in range(rw):
                    blk[ur + np.uint64(a)] -= csum[a]
            dF1 = _flat(dF)
            ub = np.uint64(base) * urw
            for r in range(kp * rw):
                ur = np.uint64(r)
                dF1[ub + ur] = blk[ur]
            for k in range(pair_count[ci]):
                slot[pair_j[base + k]] = -1
    return feats, dF[:npairs], pair_j[:npairs], pair_count


_compiled: dict = {}


def _arg_key(args) -> tuple:
    """What decides the compiled signature among the structure arrays (the tables always have
    one layout): dtype, rank, contiguity and writability of each."""
    return tuple((x.dtype.char, x.ndim, x.flags.c_contiguous, x.flags.writeable)
                 for x in args if isinstance(x, np.ndarray))


def _load_cached(sig) -> bool:
    """Load the specialisation from the cache if it is there, without the file lock (what
    ``Dispatcher.compile`` does on a cache hit), so the workers of a run load in parallel; only
    a miss goes to the lock.  False on a miss or if numba's internals differ."""
    try:
        from numba.core.compiler_lock import global_compiler_lock

        with global_compiler_lock:
            if tuple(sig) in _featurize.overloads:
                return True
            cres = _featurize._cache.load_overload(sig, _featurize.targetctx)
            if cres is None:
                return False
            _featurize._cache_hits[sig] += 1
            _featurize.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            _featurize.add_overload(cres)
            return True
    except Exception:  # pragma: no cover - another numba version
        return False


def featurize_structure(pos, spc, lat, inv, hinv, per, centers, tabs, square, deriv, total, stop=0):
    """Run :func:`_featurize` for largest order ``tabs.kmax``, given to it as a literal.

    The specialisation is compiled (or loaded from the cache) directly with that literal type,
    not through a jitted wrapper: a wrapper would re-optimise the whole linked kernel once more
    (about 2 s of a cold compile).  A process's first call for each K compiles or loads under
    :func:`~gmp_pipeline._numba_cache.compile_lock`, so concurrent processes compile once and
    the others load what it wrote.
    """
    args = (pos, spc, lat, inv, hinv, per, centers, tabs, square, deriv, total, stop)
    K = int(tabs.kmax)
    key = (K, _arg_key(args[:7]))
    ep = _compiled.get(key)
    if ep is None:
        from numba import typeof

        sig = tuple(typeof(x) for x in args) + (types.literal(K),)
        if not _load_cached(sig):
            with compile_lock():
                _featurize.compile(sig)  # loads it if another process compiled it meanwhile
        ep = _featurize.overloads[sig].entry_point
        _compiled[key] = ep
    return ep(*args, K)


run = featurize_structure
