"""Speed-of-light figures of this machine, one pinned core (issue 13; shared/bench/speed-of-light.md
measured them on an earlier machine of the kind).

Prints:

* the sustained clock, from a chain of dependent float adds (1 add per cycle on x86 cores
  with a 4-cycle add latency is *not* assumed: the chain gives cycles x latency, so the figure
  is reported as "dependent adds per ns" and as GHz for a latency of 3 and 4 cycles);
* the FMA peak (GFLOP/s) of numba-vectorized code: 16 independent FMA reductions;
* the kernel's vectorizable exp (``_kernels._vexp``) in ns per value;
* dense write bandwidth (GB/s) into a fresh and into a reused buffer;
* and the resulting lower bounds for the OC20-like bench (output written at the reused-buffer
  rate; the fresh-memory rate, page faults included, is printed for comparison) (numbers of speed-of-light.md: 2.21
  GFLOP + 38.9 M exp for features, 5.36 GFLOP + 38.9 M exp + 0.52 GB written with derivatives,
  14,328 atoms).

Usage: python benchmarks/bench_peak.py [--seconds 0.5]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from numba import njit

BENCH_ATOMS = 14328
FEAT_FLOP, DERIV_FLOP, EXPS, DERIV_BYTES = 2.21e9, 5.36e9, 38.9e6, 0.52e9


@njit(cache=False)
def _add_chain(n, x):
    s = x
    for _ in range(n):
        s = s + 1e-300  # each add depends on the previous one
    return s


@njit(fastmath=True, cache=False)
def _fma_peak(a, reps):
    # 16 independent reductions s_k += x * c_k: LLVM keeps each in a vector register (FMA)
    n = a.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = 0.0
    for _ in range(reps):
        for i in range(n):
            x = a[i]
            s0 += x * 1.234567
            s1 += x * 1.015625
            s2 += x * 1.031250
            s3 += x * 1.046875
            s4 += x * 1.062500
            s5 += x * 1.078125
            s6 += x * 1.093750
            s7 += x * 1.109375
            s8 += x * 1.125000
            s9 += x * 1.140625
            s10 += x * 1.156250
            s11 += x * 1.171875
            s12 += x * 1.187500
            s13 += x * 1.203125
            s14 += x * 1.218750
            s15 += x * 1.234375
    return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7 + s8 + s9 + s10 + s11 + s12 + s13 + s14 + s15


@njit(cache=False)
def _fill(out, v):
    for i in range(out.shape[0]):
        out[i] = v


def _best(f, seconds):
    best = float("inf")
    t_end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement (best of)")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import llvmlite.binding as ll

    print(f"{platform.processor() or platform.machine()}, llvm cpu {ll.get_host_cpu_name()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (one pinned core)")
    n = 20_000_000
    _add_chain(10, 0.0)
    t = _best(lambda: _add_chain(n, 0.0), args.seconds)
    per_ns = n / t / 1e9
    print(f"dependent adds: {per_ns:.2f} per ns -> clock {3 * per_ns:.2f} GHz (3-cycle add) / "
          f"{4 * per_ns:.2f} GHz (4-cycle add)")
    a = np.random.rand(512)
    reps = 20000
    _fma_peak(a, 1)
    t = _best(lambda: _fma_peak(a, reps), args.seconds)
    gflops = 2 * 16 * a.shape[0] * reps / t / 1e9
    print(f"FMA peak (16 vectorized reductions, numba fastmath): {gflops:.1f} GFLOP/s")
    from gmp_pipeline import _kernels as K

    @njit(cache=False)
    def vexp(T, arg, sc, ib):  # (_vexp has no Python-callable wrapper of its own)
        K._vexp(T, arg, sc, ib)

    T = 4096
    arg = -np.random.rand(T) * 30
    sc = np.ones(T)
    ib = np.empty(T, dtype=np.int64)
    vexp(np.int64(T), arg, sc, ib)
    reps_e = 500

    def run_exp():
        for _ in range(reps_e):
            vexp(np.int64(T), arg, sc, ib)
    t = _best(run_exp, args.seconds)
    exp_ns = t / (reps_e * T) * 1e9
    print(f"vectorizable exp (_kernels._vexp, cache-resident): {exp_ns:.2f} ns per value")
    big = 256 << 20
    _fill(np.empty(8), 1.0)
    t_fresh = _best(lambda: _fill(np.empty(big // 8), 1.0), args.seconds)
    buf = np.empty(big // 8)
    t_reuse = _best(lambda: _fill(buf, 1.0), args.seconds)
    print(f"dense writes: {big / t_fresh / 1e9:.1f} GB/s into fresh memory (page faults), "
          f"{big / t_reuse / 1e9:.1f} GB/s into a reused buffer")
    for label, flop, extra in (("features only", FEAT_FLOP, 0.0),
                               ("with derivatives", DERIV_FLOP, DERIV_BYTES / (big / t_reuse))):
        t_lo = flop / (gflops * 1e9) + EXPS * exp_ns * 1e-9 + extra
        print(f"bench bound, {label}: {t_lo * 1e3:.0f} ms -> {BENCH_ATOMS / t_lo / 1e3:.0f} k atoms/s "
              f"at peak; {BENCH_ATOMS / (4 * t_lo) / 1e3:.0f} k atoms/s at 25 % of it")


if __name__ == "__main__":
    main()
