"""Scale benchmark (issue 11, item 6): an OC20-like legacy LMDB of 100,000 structures.

    python benchmarks/bench_scale.py [--n 100000] [--slice 10000] [--workdir DIR] [--keep]
    python benchmarks/bench_scale.py --quick          # 2,000 structures, slice 500 (a test runs it)

What it does, in order:

1. **Generate** ``--n`` OC20-like slabs into a legacy OC20 LMDB of pickled PyG ``Data`` records
   (the layout of OC20's S2EF LMDBs, written without torch by ``tests/fixtures/ocp_writers.py``)
   *without* fairchem's ``metadata.npz``, so planning has no cheap size table.  Each record is a
   perturbed copy of one of the 200 structures of ``benchmarks/data/oc20_like_200.extxyz`` (the
   bench set's recipe): positions rattled by 0.05 A, tags as in the set, ``fixed`` = tag 0,
   random energy and forces.  Files of 10,000 records; a second directory holds the first
   ``--slice`` records (symlinks), the small size.
2. **Featurize** through the CLI (``gmp-pipeline featurize ocp ...``, local cluster, default
   workers), each run in a fresh driver process whose peak RSS (``VmHWM``) and that of its
   largest descendant (a worker) are sampled: features-only on the slice and on all ``--n``
   structures (two sizes ``--n / --slice`` apart: the driver's peak must stay flat and
   <= 1 GB), then with derivatives on the slice with ``--derivative-atoms all`` and ``free``.
   The planning time (counting atoms on the cluster: no cheap size table) is read from the
   CLI's output; a resumed plan of the large store is timed too (the cached counts).
3. **Store figures**: files and bytes on disk, files per GB, files per TB scaled to a
   100,000-structure store with derivatives, bytes per (i, j) pair.
4. **Throughput** of each run against the bare kernel (one core, features-only and with
   derivatives, the same structures) times the number of workers.
5. **Read throughput**: ``open_store(...).get_batch`` of 64 random indices, and a torch
   ``DataLoader`` epoch with :class:`~gmp_pipeline.store.ChunkShuffleSampler` vs a sequential
   one, on the large features-only store and on the derivative store.

The workdir (default ``/tmp/gmp-bench-scale``) is removed at the end unless ``--keep``; a
generated LMDB is reused when it already holds the asked records.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH = HERE / "data" / "oc20_like_200.extxyz"
PER_FILE = 10_000
GB = 1e9

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


# -- 1. the source -------------------------------------------------------------------------------

def bench_structures():
    """The 200 bench structures as (numbers, positions, cell, tags)."""
    import ase.io

    out = []
    for atoms in ase.io.iread(str(BENCH), index=":"):
        tags = np.asarray(atoms.arrays.get("tags", np.zeros(len(atoms))), dtype=np.int64)
        out.append((atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64),
                    np.asarray(atoms.cell, dtype=np.float64), tags))
    return out


def records(base, start: int, stop: int, seed: int = 20261201):
    """OC20 S2EF-style attribute dicts of structures ``start..stop`` (perturbed copies)."""
    for i in range(start, stop):
        numbers, pos, cell, tags = base[i % len(base)]
        rng = np.random.default_rng((seed, i))
        n = numbers.size
        yield {"atomic_numbers": numbers.astype(np.float32),
               "pos": (pos + rng.normal(0.0, 0.05, pos.shape)).astype(np.float32),
               "cell": cell.astype(np.float32)[None], "natoms": n,
               "tags": tags, "fixed": (tags == 0).astype(np.float32),
               "sid": i // len(base), "fid": i % len(base),
               "y": np.float64(rng.normal(-1.0, 0.5)),
               "force": rng.normal(0.0, 0.1, (n, 3)).astype(np.float32)}


def generate(workdir: Path, n: int, small: int) -> tuple[Path, Path, float]:
    """(directory of all n records, directory of the first ``small``, seconds spent)."""
    from fixtures.ocp_writers import write_pyg_lmdb

    big = workdir / f"lmdb_{n}"
    small_dir = workdir / f"lmdb_{small}"
    done = big / "DONE"
    t0 = time.perf_counter()
    if not (done.is_file() and done.read_text().strip() == str(n)):
        shutil.rmtree(big, ignore_errors=True)
        big.mkdir(parents=True)
        base = bench_structures()
        for k, a in enumerate(range(0, n, PER_FILE)):
            b = min(n, a + PER_FILE)
            write_pyg_lmdb(big / f"data.{k:04d}.lmdb", records(base, a, b),
                           map_size=1 << 36)
            print(f"  generated {b:,} of {n:,} records", file=sys.stderr, flush=True)
        done.write_text(str(n))
    shutil.rmtree(small_dir, ignore_errors=True)
    small_dir.mkdir(parents=True)
    files = sorted(big.glob("*.lmdb"))
    if small % PER_FILE and n > PER_FILE:
        raise SystemExit(f"--slice must be a multiple of {PER_FILE} (or --n at most that)")
    if n <= PER_FILE:   # one file: the slice is a file of its own
        write_pyg_lmdb(small_dir / "data.0000.lmdb", records(bench_structures(), 0, small))
    else:
        for f in files[:small // PER_FILE]:
            os.symlink(f, small_dir / f.name)
    assert not (big / "metadata.npz").exists()
    return big, small_dir, time.perf_counter() - t0


# -- 2. featurizing through the CLI, with the driver's and the workers' peak RSS ----------------

def _mem(pid: int) -> tuple[int, int] | None:
    """(peak RSS ``VmHWM``, anonymous RSS now ``RssAnon``) of process ``pid`` in bytes, None
    once it is gone.  The difference is mostly file-backed pages: the LMDB source is mapped
    read-only, so a worker's RSS includes the pages of the records it read (page cache the
    kernel reclaims under pressure), while ``RssAnon`` is the memory the process allocated."""
    hwm = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        return None
    return hwm, anon


class PeakSampler(threading.Thread):
    """Samples the peak RSS and the peak anonymous RSS of a process and of each of its
    descendants every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.driver, self.driver_anon = pid, 0, 0
        self.children: dict[int, int] = {}
        self.children_anon: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            m = _mem(self.pid)
            if m:
                self.driver, self.driver_anon = max(self.driver, m[0]), max(self.driver_anon, m[1])
            try:
                for c in psutil.Process(self.pid).children(recursive=True):
                    m = _mem(c.pid)
                    if m:
                        self.children[c.pid] = max(self.children.get(c.pid, 0), m[0])
                        self.children_anon[c.pid] = max(self.children_anon.get(c.pid, 0), m[1])
            except psutil.Error:
                pass
            self.stop.wait(0.2)


#: the CLI, as a user runs it
CLI = "from gmp_pipeline.cli import main; main()"
#: the CLI stopped as by a Ctrl-C right after the atom counts are saved in the store and before
#: the plan is (deterministic, where a real SIGINT sent on reading the log line raced the run)
CLI_STOPPED_AFTER_COUNTING = (
    "import gmp_pipeline.pipeline.run as run\n"
    "def stop(*args, **kwargs):\n"
    "    raise KeyboardInterrupt\n"
    "run.plan_tasks = stop\n" + CLI)


def featurize(src: Path, store: Path, *, derivatives: bool, derivative_atoms: str = "all",
              workers: int | None = None, stop_after_counting: bool = False) -> dict:
    """Run ``gmp-pipeline featurize ocp SRC -o STORE`` in a fresh process; its figures.

    ``stop_after_counting``: the run is interrupted once the atom counts are saved (to be
    resumed)."""
    cmd = [sys.executable, "-c", CLI_STOPPED_AFTER_COUNTING if stop_after_counting else CLI,
           "featurize", "ocp", str(src), "-o", str(store), "--no-progress",
           "--derivatives" if derivatives else "--no-derivatives"]
    if derivatives:
        cmd += ["--derivative-atoms", derivative_atoms]
    if workers:
        cmd += ["--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    lines = [line.rstrip("\n") for line in proc.stdout]
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    text = "\n".join(lines)
    out = {"rc": rc, "wall": time.perf_counter() - t0, "driver_mb": sampler.driver / 2**20,
           "driver_anon_mb": sampler.driver_anon / 2**20,
           "worker_mb": max(sampler.children.values(), default=0) / 2**20,
           "worker_anon_mb": max(sampler.children_anon.values(), default=0) / 2**20, "log": text}
    m = re.search(r"time: cluster ([\d.]+) s, plan ([\d.]+) s, warmup ([\d.]+) s, featurize "
                  r"([\d.]+) s, assemble ([\d.]+) s, total ([\d.]+) s", text)
    if m:
        for k, v in zip(("cluster", "plan", "warmup", "featurize", "assemble", "total"),
                        m.groups()):
            out[k] = float(v)
    m = re.search(r"wrote .*: (\d+) structures?, (\d+) atoms, (\d+) pairs", text)
    if m:
        out["structures"], out["atoms"], out["pairs"] = map(int, m.groups())
    m = re.search(r"counted (\d+) atoms in (\d+) records in ([\d.]+) s", text)
    if m:
        out["count_seconds"] = float(m.group(3))
    out["counts_from_cache"] = "counted by an earlier run" in text
    m = re.search(r"worker time summed over tasks: (.*)", text)
    if m:
        out["stages"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(1))}
    out["load"] = os.getloadavg()[0]
    return out


def in_driver_count(src: Path) -> float:
    """Seconds ``reader.n_atoms()`` takes in one process (a fresh one, nothing cached): what the
    driver did before counting moved to the cluster (with this version's decoder)."""
    code = ("import time, sys; from gmp_pipeline.readers import open_reader; "
            f"r = open_reader('ocp', {str(src)!r}); len(r); t = time.perf_counter(); "
            "r.n_atoms(); print(time.perf_counter() - t)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


# -- 3. the store on disk --------------------------------------------------------------------------

def disk(store: Path) -> dict:
    files = nbytes = pair_bytes = 0
    for root, _, names in os.walk(store):
        for n in names:
            size = os.path.getsize(os.path.join(root, n))
            files += 1
            nbytes += size
            if os.sep + "pairs" in root[len(str(store)):]:
                pair_bytes += size
    return {"files": files, "bytes": nbytes, "pair_bytes": pair_bytes}


# -- 4. the bare kernel ---------------------------------------------------------------------------

def bare_kernel(n_structures: int) -> dict:
    """atoms/s of ``GMPFeaturizer.featurize`` in this process (one core), features only and
    with derivatives, on the first structures of the bench set (the default feature set)."""
    import ase.io

    from gmp_pipeline import GMPFeaturizer

    frames = ase.io.read(str(BENCH), index=f":{n_structures}")
    atoms = sum(len(a) for a in frames)
    fz = GMPFeaturizer()
    for a in frames[:3]:
        fz.featurize(a, derivatives=True)
    out = {}
    for deriv in (False, True):
        best = float("inf")
        for _ in range(2):
            t0 = time.process_time()
            for a in frames:
                fz.featurize(a, derivatives=deriv)
            best = min(best, time.process_time() - t0)
        out["derivatives" if deriv else "features"] = atoms / best
    return out


# -- 5. reading ------------------------------------------------------------------------------------

def read_figures(store: Path, *, batches: int, loader: bool) -> dict:
    from gmp_pipeline import open_store

    st = open_store(store)
    n = len(st)
    rng = np.random.default_rng(0)
    order = rng.permutation(n)[:batches * 64]
    out = {}
    for label, fields in (("default", None), ("features+numbers+energy",
                                              ["features", "numbers", "energy"])):
        st = open_store(store)
        t0 = time.perf_counter()
        for lo in range(0, len(order), 64):
            st.get_batch(order[lo:lo + 64], fields=fields)
        out[label] = len(order) / (time.perf_counter() - t0)
    if loader:
        try:
            import torch
        except ImportError:
            return out
        from gmp_pipeline.store import ChunkShuffleSampler, collate_energy_forces

        for kind in ("sequential", "chunk-shuffle"):
            ds = open_store(store).torch_dataset()
            sampler = (torch.utils.data.SequentialSampler(ds) if kind == "sequential"
                       else ChunkShuffleSampler(ds, seed=0))
            dl = torch.utils.data.DataLoader(ds, batch_size=64, sampler=sampler,
                                             collate_fn=collate_energy_forces)
            t0 = time.perf_counter()
            for _ in dl:
                pass
            out[f"epoch {kind}"] = time.perf_counter() - t0
    return out


# -- the report ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="structures generated and featurized "
                    "features-only")
    ap.add_argument("--slice", type=int, default=10_000, help="structures featurized with "
                    "derivatives (all and free), and the small features-only size")
    ap.add_argument("--workdir", default=None, help="where the LMDB and the stores go "
                    "(default: a directory under the temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (the LMDB is reused)")
    ap.add_argument("--workers", type=int, default=None, help="local workers (default: cores)")
    ap.add_argument("--quick", action="store_true", help="2,000 structures, slice 500")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.slice = 2000, 500
    if args.slice > args.n:
        raise SystemExit("--slice must be at most --n")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gmp-bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    try:
        return _main(args, workdir, say)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _main(args, workdir: Path, say) -> int:
    from gmp_pipeline import __version__

    t_all = time.perf_counter()
    say(f"bench_scale: gmp-pipeline {__version__}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}, --n {args.n} "
        f"--slice {args.slice}, workdir {workdir}, {time.strftime('%Y-%m-%d %H:%M')}")
    big, small, gen_s = generate(workdir, args.n, args.slice)
    src_bytes = sum(f.stat().st_size for f in big.glob("*.lmdb"))
    say(f"source: legacy OC20 LMDB (pickled PyG Data, no metadata.npz), {args.n} records in "
        f"{len(list(big.glob('*.lmdb')))} files, {src_bytes / GB:.2f} GB; generated or reused "
        f"in {gen_s:.0f} s; slice: the first {args.slice} records")
    for p in workdir.glob("*.zarr"):
        shutil.rmtree(p, ignore_errors=True)
    runs = {}
    # features-only at two sizes; the small one is interrupted once counted, then resumed
    st_small = workdir / "features_small.zarr"
    first = featurize(small, st_small, derivatives=False, workers=args.workers,
                      stop_after_counting=True)
    runs["features, slice (resumed)"] = featurize(small, st_small, derivatives=False,
                                                  workers=args.workers)
    runs["features, slice (resumed)"]["interrupted"] = first
    runs["features, all"] = featurize(big, workdir / "features_all.zarr", derivatives=False,
                                      workers=args.workers)
    for mode in ("all", "free"):
        runs[f"derivatives {mode}, slice"] = featurize(
            small, workdir / f"derivatives_{mode}.zarr", derivatives=True,
            derivative_atoms=mode, workers=args.workers)
    failed = {k: r for k, r in runs.items() if r["rc"] != 0 or "atoms" not in r}
    for k, r in failed.items():
        say(f"FAILED: {k} (exit {r['rc']}):\n{r['log'][-3000:]}")
    if failed:
        return 1
    n_workers = args.workers or os.cpu_count()
    kernel = bare_kernel(20 if args.quick else 100)
    driver_count = in_driver_count(big)

    say("")
    say("planning (atom counts of a source without a size table):")
    r_all = runs["features, all"]
    say(f"  in one process (what the driver did before: reader.n_atoms(), this version's "
        f"decoder): {driver_count:.1f} s for {args.n} records "
        f"({driver_count / args.n * 1e3:.2f} ms a record)")
    say(f"  now, counted on {n_workers} workers: plan {r_all['plan']:.1f} s for {args.n} records "
        f"(count {r_all.get('count_seconds', float('nan')):.1f} s)")
    inter = runs["features, slice (resumed)"]["interrupted"]
    res = runs["features, slice (resumed)"]
    say(f"  slice of {args.slice}: counted in {inter.get('count_seconds', float('nan')):.1f} s, "
        f"interrupted right after (as by a Ctrl-C), resumed: plan {res['plan']:.2f} s "
        f"({'counts read from the store cache' if res['counts_from_cache'] else 'plan of the interrupted run reused'})")

    say("")
    say("peak RSS (VmHWM; worker = the largest process under the driver; in brackets the peak "
        "anonymous RSS, without the read-only mapped LMDB pages and shared libraries):")
    for k, r in runs.items():
        say(f"  {k:<26} {r['structures']:>7} structures: driver {r['driver_mb']:6.0f} MB "
            f"({r['driver_anon_mb']:4.0f}), worker {r['worker_mb']:6.0f} MB "
            f"({r['worker_anon_mb']:4.0f})")
    from gmp_pipeline.config import knob

    w_small, w_big = res["worker_anon_mb"], r_all["worker_anon_mb"]
    say(f"  worker, features-only, {args.slice} -> {args.n} structures: anonymous {w_small:.0f} -> "
        f"{w_big:.0f} MB ({w_big / max(w_small, 1):.2f}x); a task holds at most "
        f"{knob('pipeline.max-task-atoms'):,} atoms (pipeline.max-task-atoms)")
    say("  (a store of at most pipeline.local-assembly-bytes, 256 MiB uncompressed, is assembled "
        "in the driver's threads, reading the staged files memory-mapped; a larger one on the "
        "workers)")
    d_small, d_big = res["driver_mb"], r_all["driver_mb"]
    say(f"  driver, features-only, {args.slice} -> {args.n} structures "
        f"({args.n / args.slice:.0f}x): {d_small:.0f} -> {d_big:.0f} MB "
        f"({d_big / d_small:.2f}x; goal <= 1024 MB: "
        f"{'met' if max(d_small, d_big) <= 1024 else 'NOT met'})")

    say("")
    say(f"throughput (featurize phase, {n_workers} workers) against the bare kernel "
        f"(one core, this process, {kernel['features']:,.0f} atoms/s features only, "
        f"{kernel['derivatives']:,.0f} with derivatives) x {n_workers}:")
    for k, r in runs.items():
        one = kernel["derivatives" if k.startswith("derivatives") else "features"]
        base = one * n_workers
        rate = r["atoms"] / r["featurize"]
        rate_total = r["atoms"] / r["total"]
        say(f"  {k:<26} {rate:9,.0f} atoms/s = {rate / base:.2f} of the bare kernel; whole run "
            f"{r['total']:.0f} s ({rate_total:,.0f} atoms/s = {rate_total / base:.2f}); load "
            f"average {r['load']:.1f}")
        st = r.get("stages") or {}
        if st.get("featurize"):
            busy = sum(st.values())
            say(f"  {'':<26} in the tasks (wall time summed over tasks, {busy:.0f} s): "
                + ", ".join(f"{name} {100 * v / busy:.0f} %" for name, v in st.items())
                + f"; the kernel in the tasks {r['atoms'] / st['featurize']:,.0f} atoms/s = "
                f"{r['atoms'] / st['featurize'] / one:.2f} of the bare kernel on one core")
    say("  (the bare kernel is CPU time in an otherwise idle process; the runs are wall time on "
        "a machine shared with other jobs: see the load averages)")

    say("")
    say("store on disk:")
    sizes = {}
    for k, name in (("features, slice (resumed)", "features_small.zarr"),
                    ("features, all", "features_all.zarr"),
                    ("derivatives all, slice", "derivatives_all.zarr"),
                    ("derivatives free, slice", "derivatives_free.zarr")):
        d = sizes[k] = disk(workdir / name)
        r = runs[k]
        per_pair = (f", {d['pair_bytes'] / r['pairs']:.0f} bytes per (i, j) pair in pairs/ "
                    f"({d['bytes'] / r['pairs']:.0f} with everything)" if r["pairs"] else "")
        say(f"  {k:<26} {d['files']:>7} files, {d['bytes'] / GB:7.3f} GB, "
            f"{d['files'] / (d['bytes'] / GB):8.0f} files per GB{per_pair}")
    for mode in ("all", "free"):
        d = sizes[f"derivatives {mode}, slice"]
        scale = 100_000 / args.slice
        tb = d["bytes"] * scale / 1e12
        files = d["files"] * scale
        say(f"  scaled to 100,000 structures with derivatives ({mode}): ~{files:,.0f} files, "
            f"~{tb:.2f} TB: {files / tb:,.0f} files per TB (goal <= 10,000: "
            f"{'met' if files / tb <= 10_000 else 'NOT met'})")
    pa, pf = runs["derivatives all, slice"]["pairs"], runs["derivatives free, slice"]["pairs"]
    ba, bf = sizes["derivatives all, slice"]["bytes"], sizes["derivatives free, slice"]["bytes"]
    say(f"  free vs all: {pf / pa:.3f} of the pairs, {bf / ba:.3f} of the bytes")

    say("")
    say("read throughput (one process, fresh open, random batches of 64 via get_batch):")
    n_batches = 20 if args.quick else 200
    for k, name, loader in (("features, all", "features_all.zarr", False),
                            ("derivatives free, slice", "derivatives_free.zarr", True)):
        f = read_figures(workdir / name, batches=n_batches, loader=loader)
        say(f"  {k:<26} {f['default']:9,.0f} structures/s (default fields), "
            f"{f['features+numbers+energy']:9,.0f} (features+numbers+energy)")
        if "epoch sequential" in f:
            ratio = f["epoch chunk-shuffle"] / f["epoch sequential"]
            say(f"  {'':<26} DataLoader epoch (batch 64): sequential {f['epoch sequential']:.1f} s, "
                f"ChunkShuffleSampler {f['epoch chunk-shuffle']:.1f} s ({ratio:.2f}x; "
                f"target <= 1.5x)")
    say("")
    say(f"bench_scale done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
