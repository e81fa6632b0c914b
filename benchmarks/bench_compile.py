"""Cold and warm first-call times of the kernels (issue 13: compile once per machine).

Every figure is the wall time of a child process's first ``featurize`` call (import of
gmp_pipeline excluded, numba's import included), with the kernel cache pointed at a fresh
temporary directory (``GMP_PIPELINE_KERNEL_CACHE``) so the machine's real cache is untouched:

1. cold: empty cache, one process (compiles the default feature set: orders -1..3 => the
   loops of orders 0..3 only);
2. warm: a second process (loads);
3. second clone: the package copied to another directory and imported from there (same cache:
   its key is the kernel sources, numba/llvmlite/Python and the CPU, not the path);
4. concurrent: --procs processes started together on an empty cache (like the workers of a
   run): one compiles under the file lock, the others wait and load;
5. another max order (9) cold, to show each order range compiles on its own.

Usage: python benchmarks/bench_compile.py [--procs 2] [--derivatives/--no-derivatives]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import gmp_pipeline
from gmp_pipeline import GMPFeaturizer
import ase
t1 = time.perf_counter()
c1 = time.process_time()
fz = GMPFeaturizer(orders={orders!r})
atoms = ase.Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[8, 8, 8], pbc=True)
fz.featurize(atoms, derivatives={deriv!r})
t2 = time.perf_counter()
c2 = time.process_time()
fz.featurize(atoms, derivatives={deriv!r})
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2, "first_call_cpu_s": c2 - c1,
                  "package": gmp_pipeline.__file__}}))
"""


def _start(src_root: Path, cache: str, orders, deriv):
    env = dict(os.environ, GMP_PIPELINE_KERNEL_CACHE=cache, PYTHONPATH=str(src_root))
    code = CHILD.format(orders=list(orders), deriv=bool(deriv))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())


def _result(p):
    out, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"child failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2, help="concurrent processes on an empty cache")
    ap.add_argument("--derivatives", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    default = [-1, 0, 1, 2, 3]
    import numba

    print(f"Python {platform.python_version()}, numba {numba.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = str(tmp / "cache")
        t = time.perf_counter()
        cold = _result(_start(ROOT, cache, default, args.derivatives))
        print(f"cold, empty cache, 1 process:  first call {cold['first_call_s']:6.2f} s wall, "
              f"{cold['first_call_cpu_s']:.2f} s CPU (process {time.perf_counter() - t:.1f} s wall)")
        warm = _result(_start(ROOT, cache, default, args.derivatives))
        print(f"warm, second process:          first call {warm['first_call_s']:6.2f} s wall, "
              f"{warm['first_call_cpu_s']:.2f} s CPU")
        clone = tmp / "clone"
        shutil.copytree(ROOT / "gmp_pipeline", clone / "gmp_pipeline",
                        ignore=shutil.ignore_patterns("__pycache__"))
        cl = _result(_start(clone, cache, default, args.derivatives))
        assert cl["package"].startswith(str(clone)), cl["package"]
        print(f"warm, second clone:            first call {cl['first_call_s']:6.2f} s wall, "
              f"{cl['first_call_cpu_s']:.2f} s CPU ({clone})")
        cache2 = str(tmp / "cache2")
        ps = [_start(ROOT, cache2, default, args.derivatives) for _ in range(args.procs)]
        res = sorted(_result(p)["first_call_s"] for p in ps)
        print(f"{args.procs} concurrent processes, empty cache: first calls "
              + ", ".join(f"{r:.2f}" for r in res) + " s (one compiles, the others wait and load)")
        again = [_start(ROOT, cache2, default, args.derivatives) for _ in range(args.procs)]
        res = sorted(_result(p)["first_call_s"] for p in again)
        print(f"{args.procs} concurrent processes, filled cache: first calls "
              + ", ".join(f"{r:.2f}" for r in res) + " s")
        o9 = _result(_start(ROOT, cache, [-1, 0, 1, 2, 3, 9], args.derivatives))
        print(f"cold, orders up to 9 (same cache, only the order-9 variant compiles): "
              f"{o9['first_call_s']:.2f} s wall, {o9['first_call_cpu_s']:.2f} s CPU")
        print(f"steady-state call on a 3-atom cell: {warm['second_call_s'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
