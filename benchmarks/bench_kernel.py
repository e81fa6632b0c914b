"""Benchmark of the GMP kernel on the OC20-like 200-structure set (issue 2).

Feature set: orders -1..3 x sigma 0.2, 0.4, 0.6, 0.8, 1.0 (21 features), QE-kjpaw,
overlap_threshold 1e-16.  Prints, on one core (the process is pinned to one CPU):

* first-call compile time (a fresh numba cache in a child process) and the cached load time;
* atoms/s features-only and with derivatives (best of --repeats, compile excluded);
* peak RSS of a child process that streams the 200 structures with derivatives;
* stage timings (--stages): the kernel stopped after each stage per centre (neighbour search,
  binning into cutoff bins, term buffers with their exp (and, with derivatives, the per-image
  weights), moment loops and features, gradient loops, scatter into the (i, j) blocks, plus the
  total own-block and result assembly), each
  stage's share = difference of consecutive cumulative times, best of --repeats.

Usage: python benchmarks/bench_kernel.py [--repeats 3] [--structures 200] [--stages] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE / "data" / "oc20_like_200.extxyz"
CONFIG = dict(orders=[-1, 0, 1, 2, 3], sigmas=[0.2, 0.4, 0.6, 0.8, 1.0], psp="QE-kjpaw",
              overlap_threshold=1e-16)


def _pin_one_core():
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return cpu
    return None


def _child(code: str, env_extra: dict) -> dict:
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


COMPILE = f"""
import json, time
t0 = time.perf_counter()
from gmp_pipeline import GMPFeaturizer
t1 = time.perf_counter()
fz = GMPFeaturizer(**{CONFIG!r})
fz.warmup()
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "compile_s": t2 - t1}}))
"""

STREAM = f"""
import json, resource, time
import ase.io
from gmp_pipeline import GMPFeaturizer
fz = GMPFeaturizer(**{CONFIG!r})
fz.warmup()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pairs = 0
n = 0
for atoms in ase.io.iread({str(BENCH)!r}, index=":"):
    r = fz.featurize(atoms, derivatives=True)
    pairs += len(r.pair_center)
    n += len(atoms)
    del r
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_rss_mb": peak / 1024, "rss_after_warmup_mb": base / 1024,
                   "atoms": n, "pairs": pairs}}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per mode (best is reported)")
    ap.add_argument("--structures", type=int, default=200, help="use the first N structures")
    ap.add_argument("--stages", action="store_true", help="also print the stage timings")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time children")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child")
    args = ap.parse_args(argv)

    cpu = _pin_one_core()
    import ase.io
    import numpy as np

    from gmp_pipeline import GMPFeaturizer, __version__

    frames = ase.io.read(BENCH, index=f":{args.structures}")
    n_atoms = sum(len(a) for a in frames)
    print(f"gmp-pipeline {__version__}, Python {platform.python_version()}, {platform.machine()}, "
          f"pinned to CPU {cpu}")
    print(f"bench set: {len(frames)} structures, {n_atoms} atoms ({BENCH.name})")
    print(f"features: orders {CONFIG['orders']} x sigmas {CONFIG['sigmas']}, {CONFIG['psp']}, "
          f"threshold {CONFIG['overlap_threshold']}")

    if not args.no_compile:
        with tempfile.TemporaryDirectory() as cache:
            cold = _child(COMPILE, {"GMP_PIPELINE_KERNEL_CACHE": cache})
            warm = _child(COMPILE, {"GMP_PIPELINE_KERNEL_CACHE": cache})
        print(f"first-call compile (empty kernel cache): {cold['compile_s']:.1f} s; "
              f"with the cache: {warm['compile_s']:.2f} s (benchmarks/bench_compile.py: more)")

    fz = GMPFeaturizer(**CONFIG)
    print(f"M = {fz.n_features} features")
    for a in frames:  # warm-up: compile (or load) kernels, fill per-element tables
        fz.featurize(a, derivatives=True)
    results = {}
    for deriv in (False, True):
        best_wall = best_cpu = float("inf")
        pairs = 0
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            pairs = 0
            for a in frames:
                r = fz.featurize(a, derivatives=deriv)
                if deriv:
                    pairs += len(r.pair_center)
            best_wall = min(best_wall, time.perf_counter() - w0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        results[deriv] = (best_wall, best_cpu, pairs)
        label = "with derivatives" if deriv else "features only   "
        extra = f", {pairs} (i,j) pairs" if deriv else ""
        print(f"{label}: {n_atoms / best_wall:9.0f} atoms/s  ({best_wall:.3f} s wall, "
              f"{best_cpu:.3f} s CPU, best of {args.repeats}{extra})")

    if args.stages:
        stage_times(fz, frames, n_atoms, args.repeats)
    if not args.no_memory:
        mem = _child(STREAM, {})
        print(f"peak RSS streaming {mem['atoms']} atoms with derivatives: {mem['peak_rss_mb']:.0f} MB "
              f"(after warm-up {mem['rss_after_warmup_mb']:.0f} MB)")


STAGES = {1: "neighbour search", 2: "binning", 3: "terms + exp (+ order -1, weights)",
          4: "moment loops + features", 5: "gradient loops", 0: "scatter, own block, results"}


def stage_times(fz, frames, n_atoms, repeats):
    """Cumulative time with the kernel stopped after each stage; printed as per-stage shares."""
    for deriv in (False, True):
        stops = [1, 2, 3, 4, 5, 0] if deriv else [1, 2, 3, 4, 0]
        best = {s: float("inf") for s in stops}
        for _ in range(repeats):  # interleaved, so load changes hit every stage alike
            for s in stops:
                t0 = time.process_time()  # CPU time: robust on a shared machine
                for a in frames:
                    fz.featurize(a, derivatives=deriv, _stop=s)
                best[s] = min(best[s], time.process_time() - t0)
        print(f"stage timings, {'with derivatives' if deriv else 'features only'} "
              f"({n_atoms} atoms, CPU time, best of {repeats}):")
        prev = 0.0
        total = best[0]
        for s in stops:
            if not deriv and s == 0:
                label = "results"
            else:
                label = STAGES[s]
            d = best[s] - prev
            prev = best[s]
            print(f"  {label:34s} {d * 1e3:8.1f} ms  {100 * d / total:5.1f} %  "
                  f"({d / n_atoms * 1e6:.2f} us/atom)")
        print(f"  {'total':34s} {total * 1e3:8.1f} ms  ({n_atoms / total:.0f} atoms/s)")


if __name__ == "__main__":
    main()
