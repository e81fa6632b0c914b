"""Wall time of the README's main job on a fresh clone, with an empty and then a filled kernel
cache (issue 13: "the README main job on a fresh clone finishes in <= 30 s wall").

The job is the README's command after its ``pip install -e .``:

    gmp-pipeline featurize md17 tests/data/samples/md17/ethanol.npz -o ethanol.zarr --overwrite

run from a fresh ``git clone`` of this repository (HEAD, or ``--commit``) in a temporary
directory, with the clone on ``PYTHONPATH`` (``python -c 'from gmp_pipeline.cli import main;
main()'``, the console script's entry point) and ``GMP_PIPELINE_KERNEL_CACHE`` pointed at a fresh
temporary directory, so the machine's real kernel cache is neither used nor touched.  Runs:

1. cold: empty kernel cache (the local cluster's workers compile, one under the file lock while
   the others wait and load);
2. warm: the same clone again, cache filled.

Each run's wall time includes Python start-up, the local Dask cluster and the store; the job's
own timing line (``time: cluster ..., warmup ..., featurize ...``) is printed as the CLI gives it.

Usage: python benchmarks/bench_first_run.py [--commit REV] [--keep]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ["featurize", "md17", "tests/data/samples/md17/ethanol.npz", "-o", "ethanol.zarr",
       "--overwrite"]


def _run(clone: Path, cache: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(clone), GMP_PIPELINE_KERNEL_CACHE=str(cache))
    cmd = [sys.executable, "-c", "import sys; from gmp_pipeline.cli import main; sys.exit(main())",
           *JOB]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"the job failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")
    timing = next((ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip().startswith("time:")), "")
    return wall, timing


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="HEAD", help="revision to clone (default HEAD)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gmp-first-run-"))
    try:
        clone = tmp / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.commit],
                              capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", want], check=True)
        rev = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        print(f"gmp-pipeline {rev}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        print("job: gmp-pipeline " + " ".join(JOB))
        cache = tmp / "kernel-cache"
        for label in ("cold, empty kernel cache", "warm, cache filled"):
            wall, timing = _run(clone, cache)
            print(f"{label:26s} {wall:6.1f} s wall   {timing}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
