"""The full QM9 through the reader and the CLI: parse rate, directory vs archive, reading share.

    python workflows/qm9_data.py --out /work/data/qm9             # once (needs qm9pack)
    python benchmarks/bench_qm9.py --data /work/data/qm9 [--skip-cli] [--parse-limit N]

1. Parse rate, one process: ``open_reader("qm9", DIR).read()`` over the directory (file reads +
   parsing + Structure objects), molecules per CPU second of this process (= per core) and per
   wall second; the batch parser alone on bytes already in memory; the per-file parser
   (``parse_qm9_text``, the previous reader's path) on a subset; and a check that batch and
   per-file parser give identical records for every molecule parsed.
2. ``gmp-pipeline featurize qm9 DIR`` and ``gmp-pipeline featurize qm9 DIR.xyz.tar.bz2`` (features
   only: ``--no-derivatives``, the default feature set, ``--workers 2``), each in a fresh
   process after removing the previous store and syncing: wall time of the command, the CLI's
   own ``total``, the per-stage worker time summed over tasks (read, featurize, ...), the
   archive/dir wall ratio (goal <= 1.5), the directory run's read/featurize share (goal
   <= 25 %), that no staging directory is left behind, and the two stores compared array by
   array (every array of the Zarr hierarchy, exact, NaN equal to NaN).

Goals are printed next to the figures, not asserted; the machine may be shared.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def settle() -> None:
    if hasattr(os, "sync"):
        os.sync()
    time.sleep(1.0)


def parse_rate(directory: Path, limit: int | None, legacy_n: int) -> dict:
    from gmp_pipeline.readers import open_reader
    from gmp_pipeline.readers._qm9_text import parse_batch
    from gmp_pipeline.readers.qm9 import parse_qm9_text

    r = open_reader("qm9", directory)
    n = len(r) if limit is None else min(limit, len(r))
    list(r.read(0, 2))  # compiled scanners loaded
    c0, t0 = time.process_time(), time.perf_counter()
    k = 0
    for _ in r.read(0, n):
        k += 1
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    out = {"n": k, "reader_mol_per_cpu_s": k / cpu, "reader_mol_per_wall_s": k / wall,
           "reader_cpu_s": cpu, "reader_wall_s": wall}
    names = r._names[:n]
    blobs = [open(os.path.join(directory, nm), "rb").read() for nm in names]
    c0 = time.process_time()
    recs = []
    for lo in range(0, len(blobs), 512):
        recs.extend(parse_batch(blobs[lo:lo + 512]))
    out["batch_parser_mol_per_cpu_s"] = len(blobs) / (time.process_time() - c0)
    sub = blobs[:legacy_n]
    c0 = time.process_time()
    ref = [parse_qm9_text(b.decode(), path="x", record=0) for b in sub]
    out["per_file_parser_mol_per_cpu_s"] = len(sub) / (time.process_time() - c0)
    # identical records: every molecule parsed (the per-file parser is the reference)
    mismatches = 0
    for i, b in enumerate(blobs):
        ref_i = ref[i] if i < len(ref) else parse_qm9_text(b.decode(), path="x", record=0)
        a = recs[i]
        if not (a["info"] == ref_i["info"] and np.array_equal(a["numbers"], ref_i["numbers"])
                and np.array_equal(a["positions"], ref_i["positions"])
                and np.array_equal(a["charges"], ref_i["charges"])):
            mismatches += 1
    out["records_checked"] = len(blobs)
    out["records_differing"] = mismatches
    return out


def inproc_share(source: Path, n_chunks: int = 40, chunk: int = 1070) -> dict:
    """Reading vs featurizing (default feature set, no derivatives) of the same task-sized
    chunks in this process, as a task does them (a pickled reader, list(read(a, b)) and the
    task's two checks, then featurize each structure): wall and CPU ratios under the same load for both."""
    import pickle

    import yaml

    from gmp_pipeline import GMPFeaturizer
    from gmp_pipeline.pipeline.tasks import get_featurizer
    from gmp_pipeline.readers import open_reader

    import gmp_pipeline

    cfg = yaml.safe_load(open(Path(gmp_pipeline.__file__).parent / "data" /
                              "features-default.yaml"))
    fz = get_featurizer(GMPFeaturizer(**cfg).config())
    r = open_reader("qm9", source)
    n = len(r)
    blob = pickle.dumps(r)
    fz.featurize(next(pickle.loads(blob).read(0, 1)), derivatives=False)
    tr = tf = cr = cf = 0.0
    step = max(chunk, (n - chunk) // n_chunks)
    for a in range(0, n - chunk, step)[:n_chunks]:
        w = pickle.loads(blob)
        t, c = time.perf_counter(), time.process_time()
        st = list(w.read(a, a + chunk))
        st = w.drop_nonfinite(w.drop_missing_elements(st, fz.psp.has, "psp"))  # as a task does
        tr += time.perf_counter() - t
        cr += time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        for x in st:
            fz.featurize(x, derivatives=False)
        tf += time.perf_counter() - t
        cf += time.process_time() - c
    if hasattr(r, "close"):
        r.close()
    return {"read_wall_s": tr, "featurize_wall_s": tf, "wall_share": tr / tf,
            "cpu_share": cr / cf, "molecules": n_chunks * chunk}


def run_cli(source: Path, store: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "gmp_pipeline.cli", "featurize", "qm9", str(source), "-o",
           str(store), "--workers", str(workers), "--no-progress", "--overwrite",
           "--no-derivatives"]
    shutil.rmtree(store, ignore_errors=True)
    settle()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"featurize failed:\n{proc.stdout}\n{proc.stderr}")
    text = proc.stdout + proc.stderr
    res = {"command": "gmp-pipeline " + " ".join(cmd[3:]), "wall_s": wall}
    m = re.search(r"worker time summed over tasks: (.*)", text)
    if m:
        res["stages"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(1))}
    m = re.search(r"^time: (.*)$", text, re.M)
    if m:
        res["cli_times"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(1))}
    res["output_tail"] = text.strip().splitlines()[-3:]
    return res


def compare_stores(a: Path, b: Path) -> dict:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")

    def arrays(g, prefix=""):
        out = {}
        for name, node in g.members():
            path = f"{prefix}{name}"
            if isinstance(node, zarr.Array):
                out[path] = node
            else:
                out.update(arrays(node, path + "/"))
        return out

    A, B = arrays(ga), arrays(gb)
    differing = []
    for k in sorted(set(A) | set(B)):
        if k not in A or k not in B:
            differing.append(f"{k}: only in {'dir' if k in A else 'archive'}")
            continue
        x, y = np.asarray(A[k][...]), np.asarray(B[k][...])
        if x.shape != y.shape or x.dtype != y.dtype:
            differing.append(f"{k}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
        elif x.dtype.kind == "f":
            if not np.array_equal(x, y, equal_nan=True):
                differing.append(k)
        elif not np.array_equal(x, y):
            differing.append(k)
    return {"arrays_compared": len(set(A) & set(B)), "differing": differing}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/data/qm9"),
                    help="folder written by workflows/qm9_data.py")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parse-limit", type=int, help="molecules for the parse rate (default all)")
    ap.add_argument("--legacy-n", type=int, default=10000)
    ap.add_argument("--skip-parse", action="store_true")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--work", type=Path, help="where the two stores go (default a temp dir)")
    args = ap.parse_args()
    directory = args.data / "dsgdb9nsd"
    archive = args.data / "dsgdb9nsd.xyz.tar.bz2"
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    if not args.skip_parse:
        p = parse_rate(directory, args.parse_limit, args.legacy_n)
        print(f"parse rate, one process, {p['n']} molecules from {directory}:")
        print(f"  reader.read (file reads + parse + Structure): {p['reader_mol_per_cpu_s']:,.0f} "
              f"molecules per CPU second (goal >= 20,000), {p['reader_mol_per_wall_s']:,.0f} per "
              f"wall second ({p['reader_cpu_s']:.1f} CPU s, {p['reader_wall_s']:.1f} wall s)")
        print(f"  batch parser alone (bytes in memory): {p['batch_parser_mol_per_cpu_s']:,.0f} "
              "molecules per CPU second")
        print(f"  per-file parser (the previous reader's path), {args.legacy_n} molecules: "
              f"{p['per_file_parser_mol_per_cpu_s']:,.0f} molecules per CPU second")
        print(f"  batch == per-file parser on {p['records_checked']} molecules: "
              f"{p['records_differing']} differ", flush=True)
    if not args.skip_parse:
        for label, src in (("dir", directory), ("archive", archive)):
            q = inproc_share(src)
            print(f"in-process, {label}: reading / featurizing (default set) of {q['molecules']} "
                  f"molecules in task-sized chunks: wall {100 * q['wall_share']:.1f} %, CPU "
                  f"{100 * q['cpu_share']:.1f} % ({q['read_wall_s']:.1f} s vs "
                  f"{q['featurize_wall_s']:.1f} s)", flush=True)
    if args.skip_cli:
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_qm9_", dir="/work/data"
                                               if os.path.isdir("/work/data") else None))
    work.mkdir(parents=True, exist_ok=True)
    stage_glob = os.path.join(tempfile.gettempdir(), "gmp-qm9-stage-*")
    before = set(glob.glob(stage_glob))
    res = {}
    for label, src in (("dir", directory), ("archive", archive)):
        res[label] = r = run_cli(src, work / f"{label}.zarr", args.workers)
        st = r.get("stages", {})
        print(f"{label}: {r['command']}\n  wall {r['wall_s']:.1f} s; CLI times {r.get('cli_times')}"
              f"\n  worker time summed over tasks: {st}", flush=True)
    left = set(glob.glob(stage_glob)) - before
    d, a = res["dir"], res["archive"]
    ratio = a["wall_s"] / d["wall_s"]
    share = d["stages"]["read"] / d["stages"]["featurize"]
    print(f"archive / dir wall time: {a['wall_s']:.1f} / {d['wall_s']:.1f} s = {ratio:.2f} "
          "(goal <= 1.5)")
    print(f"dir run: reading {d['stages']['read']:.1f} s vs featurizing "
          f"{d['stages']['featurize']:.1f} s summed over tasks = {100 * share:.1f} % (goal <= 25 %)")
    print(f"archive run: reading {a['stages']['read']:.1f} s vs featurizing "
          f"{a['stages']['featurize']:.1f} s = {100 * a['stages']['read'] / a['stages']['featurize']:.1f} %")
    print(f"staging directories left behind: {sorted(left) or 'none'}")
    cmp = compare_stores(work / "dir.zarr", work / "archive.zarr")
    print(f"stores compared array by array: {cmp['arrays_compared']} arrays, "
          f"{len(cmp['differing'])} differ {cmp['differing'][:10]}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
