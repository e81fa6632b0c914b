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
def _neighbors(q, pos, lat, inv, hinv, per, rs, rs2, nb_j, nb_d, nb_D):
    """Images of all atoms within sqrt(rs2) of q.  Returns the count, or -needed on overflow.

    ``lat`` rows are the periodic lattice vectors (zero rows for non-periodic directions),
    ``inv`` maps a Cartesian vector to its coordinates along them, ``hinv[k]`` = 1/h_k with h_k
    the interplanar spacing.  For atom j the translations with |f_k + t_k| <= R/h_k along every
    periodic direction are enumerated: a box per atom that contains the search sphere.
    """
    n = pos.shape[0]
    cap = nb_j.shape[0]
    cnt = 0
    lo = np.zeros(3, dtype=np.int64)
    hi = np.zeros(3, dtype=np.int64)
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
def _bin_neighbors(cnt, nb_j, nb_d, nb_D, spc, thr, nthr, bo, s_j, s_d, s_D, bstart, counts):
    """Counting sort of the neighbour list into cutoff bins.

    Species s owns bins bo[s] .. bo[s+1] - 1; bin b of species s holds the neighbours with
    thr[s, b-1] < D <= thr[s, b] (thr[s] sorted ascending: every squared cutoff radius used for
    that species).  So the neighbours of species s within cutoff thr[s, b] are exactly the
    entries bstart[bo[s]] : bstart[bo[s] + b + 1].  Neighbours beyond every cutoff are dropped.
    Returns the number kept.
    """
    nb = bstart.shape[0] - 1
    for b in range(nb + 1):
        counts[b] = 0
    for t in range(cnt):
        s = spc[nb_j[t]]
        D = nb_D[t]
        lo = 0
        hi = nthr[s]
        while lo < hi:  # first threshold >= D
            mid = (lo + hi) >> 1
            if thr[s, mid] < D:
                lo = mid + 1
            else:
                hi = mid
        if lo == nthr[s]:
            nb_j[t] = -1  # beyond every cutoff of its species
            continue
        bb = bo[s] + lo
        nb_j[t] = nb_j[t] * nb + bb  # the bin packed with the atom index
        counts[bb + 1] += 1
    for b in range(nb):
        counts[b + 1] += counts[b]
    for b in range(nb + 1):
        bstart[b] = counts[b]
    for t in range(cnt):
        code = nb_j[t]
        if code < 0:
            continue
        j = code // nb
        bb = code - j * nb
        p = counts[bb]
        counts[bb] += 1
        s_j[p] = j
        s_d[p, 0] = nb_d[t, 0]
        s_d[p, 1] = nb_d[t, 1]
        s_d[p, 2] = nb_d[t, 2]
        s_D[p] = nb_D[t]
    return bstart[nb]


_EXACT = {"nnan", "ninf", "nsz", "arcp", "contract"}  # fast-math without reassociation
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00


@njit(cache=_CACHE, fastmath=_EXACT)
def _vexp_inplace(T, arg, scale, ibuf):
    """scale[t] *= exp(arg[t]) for arg <= 0, vectorizable (numba's math.exp is a scalar call).

    Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-13 Taylor polynomial for e^r
    (truncation < 1e-17 relative) and 2^n assembled from its IEEE bits.  Arguments below -708
    are clamped (their terms are < 1e-307 of the prefactor).
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
        scale[t] *= p
        ibuf[t] = (np.int64(nf) + 1023) << 52
    two_n = ibuf[:T].view(np.float64)
    for t in range(T):
        scale[t] *= two_n[t]


@njit(cache=_CACHE, fastmath=True)
def _fill_terms(s_D, s_d, s_j, bstart, bo, nspecies, ng, c1, c2, lam, hv, ridx, ncls,
                tj, tE, targ, tux, tuy, tuz, th, bend, ibuf):
    """Write the contributing terms of one sigma, bucketed by cutoff class.  Returns the total."""
    for c in range(ncls):
        bend[c] = 0
    for s in range(nspecies):
        a = bstart[bo[s]]
        if a == bstart[bo[s + 1]]:
            continue
        for g in range(ng[s]):
            prev = 0
            for c in range(ncls):
                L = bstart[bo[s] + ridx[c, s, g] + 1] - a
                bend[c] += L - prev
                prev = L
    tot = 0
    for c in range(ncls):
        cnt = bend[c]
        bend[c] = tot  # start of bucket c, advanced while filling
        tot += cnt
    for s in range(nspecies):
        a = bstart[bo[s]]
        if a == bstart[bo[s + 1]]:
            continue
        for g in range(ng[s]):
            C1 = c1[s, g]
            C2 = c2[s, g]
            lm = lam[s, g]
            h = hv[s, g]
            prev = 0
            for c in range(ncls):
                L = bstart[bo[s] + ridx[c, s, g] + 1] - a
                p = bend[c]
                for t in range(a + prev, a + L):
                    tj[p] = s_j[t]
                    tE[p] = C1
                    targ[p] = C2 * s_D[t]
                    tux[p] = lm * s_d[t, 0]
                    tuy[p] = lm * s_d[t, 1]
                    tuz[p] = lm * s_d[t, 2]
                    th[p] = h
                    p += 1
                bend[c] = p
                prev = L
    _vexp_inplace(tot, targ, tE, ibuf)
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
def featurize_structure(pos, spc, lat, inv, hinv, per, centers,
                        ng, Bs, betas, rs, thr, nthr, bo,
                        c1, c2, lam, hv, alpha, ridx, ncls, ridxm1,
                        ords, ocls, col, col_m1, ncol,
                        mono, mono_off, comp_start, comp_weight, hcoef, g_lo, g_hi,
                        square, deriv):
    """Features (nc, ncol) and, if deriv, total derivatives (P, 3, ncol) with pair lists.

    Per unique sigma u: c1/c2/lam/hv[u, s, g] term constants and alpha[u].  Cutoffs: thr[s, :nthr[s]]
    are the sorted squared cutoff radii of species s (see _bin_neighbors, bins bo[s]..bo[s+1]-1);
    ridx[u, c, s, g] / ridxm1[s, g] index the cutoff of class c / of order -1 in thr[s].
    ords[o]/ocls[o]: orders >= 0 and their cutoff class; col[o, u] / col_m1: output columns
    (-1 if absent).
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

    rs2 = rs * rs
    feats = np.zeros((nc, ncol))
    pcap = nc * min(n, 32) if deriv else 0
    dF = np.zeros((pcap, 3, ncol))
    pair_j = np.empty(pcap, dtype=np.int64)
    pair_count = np.zeros(nc, dtype=np.int64)
    npairs = 0
    jlist = np.empty(n, dtype=np.int64)

    cap = 64
    nb_j = np.empty(cap, dtype=np.int64)
    nb_d = np.empty((cap, 3))
    nb_D = np.empty(cap)
    s_j = np.empty(cap, dtype=np.int64)
    s_d = np.empty((cap, 3))
    s_D = np.empty(cap)
    bstart = np.empty(bo[nspecies] + 1, dtype=np.int64)
    bcount = np.empty(bo[nspecies] + 1, dtype=np.int64)
    tcap = cap * G
    tj = np.empty(tcap, dtype=np.int64)
    tE = np.empty(tcap)
    targ = np.empty(tcap)
    ibuf = np.empty(tcap, dtype=np.int64)
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
        cnt = _neighbors(q, pos, lat, inv, hinv, per, rs, rs2, nb_j, nb_d, nb_D)
        if cnt < 0:  # grow every per-neighbour scratch array and search again
            cap = -cnt * 5 // 4 + 16
            nb_j = np.empty(cap, dtype=np.int64)
            nb_d = np.empty((cap, 3))
            nb_D = np.empty(cap)
            s_j = np.empty(cap, dtype=np.int64)
            s_d = np.empty((cap, 3))
            s_D = np.empty(cap)
            tcap = cap * G
            tj = np.empty(tcap, dtype=np.int64)
            tE = np.empty(tcap)
            targ = np.empty(tcap)
            ibuf = np.empty(tcap, dtype=np.int64)
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
            cnt = _neighbors(q, pos, lat, inv, hinv, per, rs, rs2, nb_j, nb_d, nb_D)
        cnt = _bin_neighbors(cnt, nb_j, nb_d, nb_D, spc, thr, nthr, bo, s_j, s_d, s_D, bstart, bcount)
        base = npairs
        if deriv:
            # pair list of this centre: atoms with an image inside one of their cutoffs
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
            jl = np.sort(jlist[:k])
            if npairs + k > pcap:
                pcap = max(2 * pcap, npairs + k)
                bigger = np.zeros((pcap, 3, ncol))
                bigger[:npairs] = dF[:npairs]
                dF = bigger
                pj = np.empty(pcap, dtype=np.int64)
                pj[:npairs] = pair_j[:npairs]
                pair_j = pj
            for kk in range(k):
                slot[jl[kk]] = kk
                pair_j[base + kk] = jl[kk]
            pair_count[ci] = k
            npairs += k

        # ---- order -1: the model density at the centre -------------------------------
        if col_m1 >= 0:
            m = col_m1
            dens = 0.0
            for s in range(nspecies):
                a = bstart[bo[s]]
                for g in range(ng[s]):
                    L = bstart[bo[s] + ridxm1[s, g] + 1] - a
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
                    a = bstart[bo[s]]
                    for g in range(ng[s]):
                        L = bstart[bo[s] + ridxm1[s, g] + 1] - a
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
                T = _fill_terms(s_D, s_d, s_j, bstart, bo, nspecies, ng, c1[u], c2[u], lam[u], hv[u],
                                ridx[u], ncls, tj, tE, targ, tux, tuy, tuz, th, bend, ibuf)
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
    return feats, dF[:npairs], pair_j[:npairs], pair_count


@njit(cache=_CACHE, fastmath=True)
def _grad_accumulate(end, p, q, s, vx, vy, vz, Ex, Py, Pz, gx, gy, gz):
    for t in range(end):
        pr = Ex[p, t] * Py[q, t] * Pz[s, t]
        gx[t] += vx * pr
        gy[t] += vy * pr
        gz[t] += vz * pr
