"""Private numba kernels: neighbour search, GMP features and total position derivatives.

Nothing here validates input; :mod:`gmp_pipeline.features` does that and prepares the tables.

Layout of the work for one centre atom i (spec sections 5-8):

1. All periodic images (j, T) of all atoms with ``|d|^2 < R_search^2``, ``d = (T + r_j) - q_i``,
   grouped by species and sorted by distance within a species.  Each per-Gaussian cutoff is
   then a prefix of its species' list.
2. For each sigma, every contributing (image, Gaussian) *term* is written to a term buffer,
   bucketed by the smallest cutoff class (orders with the same order factor share a class) that
   admits it.  Because classes are nested, the terms of order n are a prefix of the buffer.
3. Per term, the 1-D Gaussian moments ``P_k`` (spec 5) along x, y, z; the overlap of a probe
   monomial ``x^p y^q z^s`` is ``E * P_p(x) P_q(y) P_s(z)``.  Raw moment sums are contracted
   with the solid-harmonic coefficient tables into ``mu_abc``, then ``S``, then ``F``.
4. Derivatives use ``d/dd_x [E P_p] = E (-2 alpha P_{p+1} + p P_{p-1})`` (an exact identity of
   the moment recurrence), so the gradient of ``S`` per term is a fixed linear form in the same
   moments: the coefficients ``V`` (depending on ``mu`` of the centre) are formed once per
   (centre, order, sigma) and applied per term, then scattered into the (i, j) block.  The total
   derivative subtracts the sum of all blocks of centre i from its own block (spec 8.2).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_CACHE = True


@njit(cache=_CACHE)
def _bbox(pos):
    lo = np.empty(3)
    hi = np.empty(3)
    for k in range(3):
        lo[k] = pos[0, k]
        hi[k] = pos[0, k]
    for a in range(pos.shape[0]):
        for k in range(3):
            v = pos[a, k]
            if v < lo[k]:
                lo[k] = v
            if v > hi[k]:
                hi[k] = v
    return lo, hi


@njit(cache=_CACHE)
def _neighbors(q, pos, cell, trange, lo, hi, rs2, nb_j, nb_d, nb_D):
    """Images of all atoms within sqrt(rs2) of q.  Returns the count, or -needed on overflow."""
    n = pos.shape[0]
    cap = nb_j.shape[0]
    cnt = 0
    for t1 in range(-trange[0], trange[0] + 1):
        for t2 in range(-trange[1], trange[1] + 1):
            for t3 in range(-trange[2], trange[2] + 1):
                tx = t1 * cell[0, 0] + t2 * cell[1, 0] + t3 * cell[2, 0]
                ty = t1 * cell[0, 1] + t2 * cell[1, 1] + t3 * cell[2, 1]
                tz = t1 * cell[0, 2] + t2 * cell[1, 2] + t3 * cell[2, 2]
                # distance from q to the bounding box of this image of the structure
                b2 = 0.0
                for k, tk in ((0, tx), (1, ty), (2, tz)):
                    lk = lo[k] + tk
                    hk = hi[k] + tk
                    if q[k] < lk:
                        b2 += (lk - q[k]) ** 2
                    elif q[k] > hk:
                        b2 += (q[k] - hk) ** 2
                if b2 >= rs2:
                    continue
                for j in range(n):
                    dx = (tx + pos[j, 0]) - q[0]
                    dy = (ty + pos[j, 1]) - q[1]
                    dz = (tz + pos[j, 2]) - q[2]
                    D = dx * dx + dy * dy + dz * dz
                    if D < rs2:
                        if cnt < cap:
                            nb_j[cnt] = j
                            nb_d[cnt, 0] = dx
                            nb_d[cnt, 1] = dy
                            nb_d[cnt, 2] = dz
                            nb_D[cnt] = D
                        cnt += 1
    if cnt > cap:
        return -cnt
    return cnt


@njit(cache=_CACHE)
def _sorted_by_species(cnt, nb_j, nb_d, nb_D, spc, nspecies, s_j, s_d, s_D, sp_start):
    """Group the neighbour list by species, sorted by distance within each species."""
    order = np.argsort(nb_D[:cnt])
    counts = np.zeros(nspecies + 1, dtype=np.int64)
    for t in range(cnt):
        counts[spc[nb_j[t]] + 1] += 1
    for s in range(nspecies):
        counts[s + 1] += counts[s]
    for s in range(nspecies + 1):
        sp_start[s] = counts[s]
    fill = counts[:nspecies].copy()
    for t in order:
        s = spc[nb_j[t]]
        p = fill[s]
        fill[s] += 1
        s_j[p] = nb_j[t]
        s_d[p, 0] = nb_d[t, 0]
        s_d[p, 1] = nb_d[t, 1]
        s_d[p, 2] = nb_d[t, 2]
        s_D[p] = nb_D[t]


@njit(cache=_CACHE)
def _prefix(D, start, stop, r2):
    """Number of entries of the sorted D[start:stop] with D <= r2."""
    lo = start
    hi = stop
    while lo < hi:
        mid = (lo + hi) // 2
        if D[mid] <= r2:
            lo = mid + 1
        else:
            hi = mid
    return lo - start


@njit(cache=_CACHE)
def count_pairs(pos, spc, cell, trange, centers, rs2, rcontrib2, nspecies):
    """Pass 1: for every centre, the sorted atoms j that can contribute (pair lists).

    Returns (pair_count (nc,), pair_j (P,), max_neighbors).
    """
    n = pos.shape[0]
    nc = centers.shape[0]
    lo, hi = _bbox(pos)
    cap = 256
    nb_j = np.empty(cap, dtype=np.int64)
    nb_d = np.empty((cap, 3))
    nb_D = np.empty(cap)
    mark = np.zeros(n, dtype=np.bool_)
    pair_count = np.zeros(nc, dtype=np.int64)
    out = np.empty(max(nc * 4, 16), dtype=np.int64)
    npairs = 0
    maxnb = 0
    for ci in range(nc):
        q = pos[centers[ci]]
        cnt = _neighbors(q, pos, cell, trange, lo, hi, rs2, nb_j, nb_d, nb_D)
        if cnt < 0:
            cap = -cnt + 64
            nb_j = np.empty(cap, dtype=np.int64)
            nb_d = np.empty((cap, 3))
            nb_D = np.empty(cap)
            cnt = _neighbors(q, pos, cell, trange, lo, hi, rs2, nb_j, nb_d, nb_D)
        if cnt > maxnb:
            maxnb = cnt
        for t in range(cnt):
            j = nb_j[t]
            if nb_D[t] <= rcontrib2[spc[j]]:
                mark[j] = True
        mark[centers[ci]] = True
        k = 0
        for j in range(n):
            if mark[j]:
                if npairs + k >= out.shape[0]:
                    bigger = np.empty(out.shape[0] * 2 + n, dtype=np.int64)
                    bigger[: npairs + k] = out[: npairs + k]
                    out = bigger
                out[npairs + k] = j
                k += 1
                mark[j] = False
        pair_count[ci] = k
        npairs += k
    return pair_count, out[:npairs].copy(), maxnb


@njit(cache=_CACHE, fastmath=True)
def _fill_terms(s_D, s_d, s_j, sp_start, nspecies, ng, c1, c2, lam, hv, r2u, ncls,
                tj, tE, tux, tuy, tuz, th, bend):
    """Write the contributing terms of one sigma, bucketed by cutoff class.  Returns the total."""
    # bucket sizes
    for c in range(ncls):
        bend[c] = 0
    for s in range(nspecies):
        a = sp_start[s]
        b = sp_start[s + 1]
        if a == b:
            continue
        for g in range(ng[s]):
            prev = 0
            for c in range(ncls):
                L = _prefix(s_D, a, b, r2u[c, s, g])
                bend[c] += L - prev
                prev = L
    tot = 0
    for c in range(ncls):
        cnt = bend[c]
        bend[c] = tot  # start of bucket c, advanced while filling
        tot += cnt
    for s in range(nspecies):
        a = sp_start[s]
        b = sp_start[s + 1]
        if a == b:
            continue
        for g in range(ng[s]):
            C1 = c1[s, g]
            C2 = c2[s, g]
            lm = lam[s, g]
            h = hv[s, g]
            prev = 0
            for c in range(ncls):
                L = _prefix(s_D, a, b, r2u[c, s, g])
                p = bend[c]
                for t in range(a + prev, a + L):
                    tj[p] = s_j[t]
                    tE[p] = C1 * math.exp(C2 * s_D[t])
                    tux[p] = lm * s_d[t, 0]
                    tuy[p] = lm * s_d[t, 1]
                    tuz[p] = lm * s_d[t, 2]
                    th[p] = h
                    p += 1
                bend[c] = p
                prev = L
    return tot


@njit(cache=_CACHE, fastmath=True)
def _moments(T, K, tE, tux, tuy, tuz, th, Ex, Py, Pz):
    """1-D moments P_k (k <= K) per term; Ex carries the prefactor E."""
    for t in range(T):
        Ex[0, t] = tE[t]
        Py[0, t] = 1.0
        Pz[0, t] = 1.0
    if K >= 1:
        for t in range(T):
            Ex[1, t] = tE[t] * tux[t]
            Py[1, t] = tuy[t]
            Pz[1, t] = tuz[t]
    for k in range(2, K + 1):
        f = k - 1.0
        for t in range(T):
            hk = f * th[t]
            Ex[k, t] = tux[t] * Ex[k - 1, t] + hk * Ex[k - 2, t]
            Py[k, t] = tuy[t] * Py[k - 1, t] + hk * Py[k - 2, t]
            Pz[k, t] = tuz[t] * Pz[k - 1, t] + hk * Pz[k - 2, t]


@njit(cache=_CACHE, fastmath=True)
def _moment_sum(end, p, q, s, Ex, Py, Pz):
    acc = 0.0
    for t in range(end):
        acc += Ex[p, t] * Py[q, t] * Pz[s, t]
    return acc


@njit(cache=_CACHE)
def featurize_structure(pos, spc, cell, trange, centers, pair_count, pair_j, maxnb,
                        ng, Bs, betas, rs2,
                        c1, c2, lam, hv, alpha, r2, ncls, r2m1,
                        ords, ocls, col, col_m1, ncol,
                        mono, mono_off, comp_start, comp_weight, hcoef, g_lo, g_hi,
                        square, deriv):
    """Pass 2: features (nc, ncol) and, if deriv, total derivatives (P, 3, ncol).

    Per unique sigma u: c1/c2/lam/hv[u, s, g] term constants, alpha[u], r2[u, c, s, g] class
    cutoffs squared.  r2m1[s, g]: order -1 cutoffs squared.  ords[o]/ocls[o]: orders >= 0 and their
    cutoff class; col[o, u] / col_m1: output columns (-1 if absent).
    """
    n = pos.shape[0]
    nc = centers.shape[0]
    nspecies = ng.shape[0]
    G = Bs.shape[1]
    nsig = alpha.shape[0]
    nord = ords.shape[0]
    K = 0
    for o in range(nord):
        if ords[o] + 1 > K:
            K = ords[o] + 1
    if not deriv and K > 0:
        K -= 1

    feats = np.zeros((nc, ncol))
    P = pair_j.shape[0] if deriv else 0
    dF = np.zeros((P, 3, ncol))
    pair_start = np.zeros(nc + 1, dtype=np.int64)
    for ci in range(nc):
        pair_start[ci + 1] = pair_start[ci] + pair_count[ci]

    lo, hi = _bbox(pos)
    cap = maxnb + 1
    nb_j = np.empty(cap, dtype=np.int64)
    nb_d = np.empty((cap, 3))
    nb_D = np.empty(cap)
    s_j = np.empty(cap, dtype=np.int64)
    s_d = np.empty((cap, 3))
    s_D = np.empty(cap)
    sp_start = np.empty(nspecies + 1, dtype=np.int64)
    tcap = cap * G
    tj = np.empty(tcap, dtype=np.int64)
    tE = np.empty(tcap)
    tux = np.empty(tcap)
    tuy = np.empty(tcap)
    tuz = np.empty(tcap)
    th = np.empty(tcap)
    Ex = np.empty((K + 1, tcap))
    Py = np.empty((K + 1, tcap))
    Pz = np.empty((K + 1, tcap))
    gx = np.empty(tcap)
    gy = np.empty(tcap)
    gz = np.empty(tcap)
    bend = np.empty(max(ncls, 1), dtype=np.int64)
    slot = np.full(n, -1, dtype=np.int64)
    mom = np.empty(66)
    mu = np.empty(66)
    vx = np.empty(66)
    vy = np.empty(66)
    vz = np.empty(66)

    for ci in range(nc):
        i = centers[ci]
        q = pos[i]
        cnt = _neighbors(q, pos, cell, trange, lo, hi, rs2, nb_j, nb_d, nb_D)
        _sorted_by_species(cnt, nb_j, nb_d, nb_D, spc, nspecies, s_j, s_d, s_D, sp_start)
        base = pair_start[ci]
        if deriv:
            for k in range(pair_count[ci]):
                slot[pair_j[base + k]] = k

        # ---- order -1: the model density at the centre -------------------------------
        if col_m1 >= 0:
            m = col_m1
            dens = 0.0
            for s in range(nspecies):
                a = sp_start[s]
                b = sp_start[s + 1]
                for g in range(ng[s]):
                    L = _prefix(s_D, a, b, r2m1[s, g])
                    B = Bs[s, g]
                    be = betas[s, g]
                    for t in range(a, a + L):
                        dens += B * math.exp(-be * s_D[t])
            S = dens * dens
            F = S if square else math.sqrt(S)
            if not square and F < 1e-15:
                F = 0.0
            feats[ci, m] = F
            if deriv and F != 0.0:
                # dS/dd = 2 mu sum(-2 beta B e d);  sqrt mode: divide by 2F
                scale = 2.0 * dens if square else 2.0 * dens / (2.0 * F)
                for s in range(nspecies):
                    a = sp_start[s]
                    b = sp_start[s + 1]
                    for g in range(ng[s]):
                        L = _prefix(s_D, a, b, r2m1[s, g])
                        B = Bs[s, g]
                        be = betas[s, g]
                        for t in range(a, a + L):
                            e = -2.0 * be * B * math.exp(-be * s_D[t]) * scale
                            r = base + slot[s_j[t]]
                            dF[r, 0, m] += e * s_d[t, 0]
                            dF[r, 1, m] += e * s_d[t, 1]
                            dF[r, 2, m] += e * s_d[t, 2]

        # ---- orders >= 0, one sigma at a time ----------------------------------------
        if nord > 0:
            for u in range(nsig):
                T = _fill_terms(s_D, s_d, s_j, sp_start, nspecies, ng, c1[u], c2[u], lam[u], hv[u],
                                r2[u], ncls, tj, tE, tux, tuy, tuz, th, bend)
                _moments(T, K, tE, tux, tuy, tuz, th, Ex, Py, Pz)
                two_alpha = 2.0 * alpha[u]
                for o in range(nord):
                    m = col[o, u]
                    if m < 0:
                        continue
                    nn = ords[o]
                    end = bend[ocls[o]]
                    m0 = mono_off[nn]
                    nm = mono_off[nn + 1] - m0
                    for k in range(nm):
                        mom[k] = _moment_sum(end, mono[m0 + k, 0], mono[m0 + k, 1], mono[m0 + k, 2],
                                             Ex, Py, Pz)
                    r0 = comp_start[nn]
                    r1 = comp_start[nn + 1]
                    S = 0.0
                    for r in range(r0, r1):
                        acc = 0.0
                        for k in range(nm):
                            acc += hcoef[r, k] * mom[k]
                        mu[r - r0] = acc
                        S += comp_weight[r] * acc * acc
                    F = S if square else math.sqrt(S)
                    if not square and F < 1e-15:
                        F = 0.0
                    feats[ci, m] = F
                    if not deriv or F == 0.0:
                        continue
                    # dS/dd_k = sum_r 2 w_r mu_r dmu_r/dd_k ; sqrt mode: / (2F)
                    sc = 2.0 if square else 1.0 / F
                    for t in range(end):
                        gx[t] = 0.0
                        gy[t] = 0.0
                        gz[t] = 0.0
                    for part in range(2):
                        if part == 0:
                            if nn == 0:
                                continue
                            dg = nn - 1
                            gtab = g_lo
                            fac = sc
                        else:
                            dg = nn + 1
                            gtab = g_hi
                            fac = -two_alpha * sc
                        q0 = mono_off[dg]
                        nq = mono_off[dg + 1] - q0
                        for k in range(nq):
                            ax = 0.0
                            ay = 0.0
                            az = 0.0
                            for r in range(r0, r1):
                                wm = comp_weight[r] * mu[r - r0]
                                ax += wm * gtab[0, r, k]
                                ay += wm * gtab[1, r, k]
                                az += wm * gtab[2, r, k]
                            vx[k] = ax * fac
                            vy[k] = ay * fac
                            vz[k] = az * fac
                        for k in range(nq):
                            if vx[k] == 0.0 and vy[k] == 0.0 and vz[k] == 0.0:
                                continue
                            _grad_accumulate(end, mono[q0 + k, 0], mono[q0 + k, 1], mono[q0 + k, 2],
                                             vx[k], vy[k], vz[k], Ex, Py, Pz, gx, gy, gz)
                    for t in range(end):
                        r = base + slot[tj[t]]
                        dF[r, 0, m] += gx[t]
                        dF[r, 1, m] += gy[t]
                        dF[r, 2, m] += gz[t]

        if deriv:
            # total derivative: the centre's own block loses the sum of all partial blocks
            own = base + slot[i]
            for m in range(ncol):
                for k in range(3):
                    acc = 0.0
                    for r in range(base, base + pair_count[ci]):
                        acc += dF[r, k, m]
                    dF[own, k, m] -= acc
            for k in range(pair_count[ci]):
                slot[pair_j[base + k]] = -1
    return feats, dF, pair_start


@njit(cache=_CACHE, fastmath=True)
def _grad_accumulate(end, p, q, s, vx, vy, vz, Ex, Py, Pz, gx, gy, gz):
    for t in range(end):
        pr = Ex[p, t] * Py[q, t] * Pz[s, t]
        gx[t] += vx * pr
        gy[t] += vy * pr
        gz[t] += vz * pr
