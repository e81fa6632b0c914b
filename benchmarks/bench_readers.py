"""Reader throughput and memory: 100,000 generated MD17 frames and a generated 20,000-record
OC20-sized legacy LMDB (PyG 1.x pickles, ~80 atoms, S2EF fields, no edges).

    python benchmarks/bench_readers.py [--frames 100000] [--records 20000] [--keep DIR]

The data are generated in a child process, so the RSS figures printed here (current RSS at
several points of the stream, and the peak) belong to reading only.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anon_mb() -> float:
    """Anonymous (heap) RSS: excludes the file-backed pages of memory-mapped npz/LMDB files,
    which the kernel can drop at any time."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(directory: str, frames: int, records: int) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from fixtures.ocp_writers import write_pyg_lmdb

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    n = 9
    R = rng.normal(size=(frames, n, 3))
    np.savez(os.path.join(directory, "md17_bench.npz"), R=R, z=np.array([6, 6, 8, 1, 1, 1, 1, 1, 1],
             np.uint8), E=rng.normal(-97000, 5, (frames, 1)), F=rng.normal(size=(frames, n, 3)))
    del R

    def recs():
        for i in range(records):
            na = int(rng.integers(60, 101))  # ~80 atoms, as in OC20 S2EF
            yield {"atomic_numbers": rng.choice([1, 6, 7, 8, 29, 78], na).astype(np.float32),
                   "pos": rng.uniform(0, 12, (na, 3)).astype(np.float32),
                   "cell": np.diag([12.0, 12.0, 30.0]).astype(np.float32)[None],
                   "natoms": na, "tags": rng.integers(0, 3, na),
                   "fixed": (rng.random(na) < 0.4).astype(np.float32), "sid": 100000 + i,
                   "fid": i % 50, "y": np.float64(rng.normal()),
                   "force": rng.normal(size=(na, 3)).astype(np.float32)}

    write_pyg_lmdb(os.path.join(directory, "data.0000.lmdb"), recs(), layout="pyg1")
    print(f"generated in {time.perf_counter() - t:.1f} s (child process)", flush=True)


def stream(reader, label: str) -> None:
    t0 = time.perf_counter()
    n = len(reader)
    counts = reader.n_atoms()
    t1 = time.perf_counter()
    print(f"[{label}] len={n}  n_atoms: {t1 - t0:.2f} s  (total atoms {int(counts.sum())})",
          flush=True)
    chunk = max(n // 8, 1)
    done = atoms = 0
    t = time.perf_counter()
    marks = {n // 4, n // 2, 3 * n // 4, n}
    for a in range(0, n, chunk):  # independent range reads, as Dask tasks do
        for s in reader.read(a, min(a + chunk, n)):
            done += 1
            atoms += len(s)
            if done in marks:
                el = time.perf_counter() - t
                print(f"[{label}] {done:>7} records  {done / el:>9.0f} rec/s  "
                      f"{atoms / el:>10.0f} atoms/s  RSS {rss_mb():7.1f} MB  "
                      f"(anon {anon_mb():6.1f} MB)", flush=True)
    assert done == n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--keep", default=None, help="use/keep this directory")
    ap.add_argument("--generate-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        generate(args.generate_only, args.frames, args.records)
        return
    tmp = args.keep or tempfile.mkdtemp(prefix="bench_readers_")
    os.makedirs(tmp, exist_ok=True)
    if not os.path.exists(os.path.join(tmp, "data.0000.lmdb")):
        subprocess.run([sys.executable, __file__, "--generate-only", tmp, "--frames",
                        str(args.frames), "--records", str(args.records)], check=True)
    for f in sorted(os.listdir(tmp)):
        print(f"  {f}: {os.path.getsize(os.path.join(tmp, f)) / 2**20:.1f} MB")
    from gmp_pipeline.readers import open_reader

    print(f"RSS after imports {rss_mb():.1f} MB (anon {anon_mb():.1f} MB)")
    stream(open_reader("md17", os.path.join(tmp, "md17_bench.npz")), "md17")
    stream(open_reader("ocp", os.path.join(tmp, "data.0000.lmdb")), "ocp-lmdb")
    print(f"peak RSS of the reading process: {peak_mb():.1f} MB")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
