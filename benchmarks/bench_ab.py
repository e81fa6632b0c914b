"""In-process interleaved A/B of kernel variants (how the speed commits of issue 13 were measured).

Each variant is a directory holding a ``gmp_pipeline`` package (e.g. ``git worktree add /tmp/a
<commit>``, or a copy of the package with a change).  Every variant is copied under its own name
(``gmp_ab0``, ``gmp_ab1``, ...) into a temporary directory and imported in this one process, with
a private kernel cache, and warmed up.  Then, for every round, the first N bench structures are
timed in chunks: each chunk is featurized by every variant in turn (the order alternating), CPU
time (``time.process_time``), the process pinned to one CPU.  Printed per variant and mode: the
sum over chunks of the per-chunk minimum over the rounds (robust to the load spikes of a shared
machine) and the median of the round totals.

Run from the project root with gmp_pipeline importable (the copies find the bundled data files
through that name).  Usage: python benchmarks/bench_ab.py DIR_A DIR_B [...] [--rounds 6] [--n 100] [--chunk 5]
       [--mode fd] [--stop S]   (--stop: the kernel's stage stop, see bench_kernel.py --stages)
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE / "data" / "oc20_like_200.extxyz"
CONFIG = dict(orders=[-1, 0, 1, 2, 3], sigmas=[0.2, 0.4, 0.6, 0.8, 1.0], psp="QE-kjpaw",
              overlap_threshold=1e-16, square=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="directories that contain a gmp_pipeline package")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n", type=int, default=100, help="first N bench structures")
    ap.add_argument("--chunk", type=int, default=5, help="structures per timed chunk")
    ap.add_argument("--mode", default="fd", help="f: features only, d: with derivatives")
    ap.add_argument("--stop", type=int, default=0, help="stage stop (0 = the whole kernel)")
    a = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    tmp = Path(tempfile.mkdtemp(prefix="gmp-ab-"))
    os.environ["GMP_PIPELINE_KERNEL_CACHE"] = str(tmp / "cache")
    names = []
    for k, d in enumerate(a.dirs):
        name = f"gmp_ab{k}"
        shutil.copytree(Path(d) / "gmp_pipeline", tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
        names.append(name)
    sys.path.insert(0, str(tmp))
    import ase.io

    images = ase.io.read(BENCH, index=f":{a.n}")
    atoms = sum(len(x) for x in images)
    chunks = [images[i:i + a.chunk] for i in range(0, len(images), a.chunk)]
    fzs = {}
    for name in names:
        fz = importlib.import_module(name).GMPFeaturizer(**CONFIG)
        for x in images:
            fz.featurize(x, derivatives=True)
            fz.featurize(x, derivatives=False)
        fzs[name] = fz
    modes = [m for m in "fd" if m in a.mode]
    best = {(nm, md, c): float("inf") for nm in names for md in modes for c in range(len(chunks))}
    tot = {(nm, md): [] for nm in names for md in modes}
    for r in range(a.rounds):
        for md in modes:
            acc = dict.fromkeys(names, 0.0)
            for c, ch in enumerate(chunks):
                for nm in (names if (r + c) % 2 == 0 else names[::-1]):
                    t0 = time.process_time()
                    for x in ch:
                        fzs[nm].featurize(x, derivatives=md == "d", _stop=a.stop)
                    dt = time.process_time() - t0
                    acc[nm] += dt
                    best[(nm, md, c)] = min(best[(nm, md, c)], dt)
            for nm in names:
                tot[(nm, md)].append(acc[nm])
    for md in modes:
        for nm, d in zip(names, a.dirs):
            s = sum(best[(nm, md, c)] for c in range(len(chunks)))
            label = "features   " if md == "f" else "derivatives"
            print(f"{label} {d}: sum of chunk minima {s * 1e3:7.1f} ms ({atoms / s:6.0f} atoms/s), "
                  f"median round {statistics.median(tot[(nm, md)]) * 1e3:7.1f} ms")
    print(f"{len(images)} structures, {atoms} atoms, {a.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
