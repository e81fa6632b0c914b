"""Files per GB of a store with derivatives, measured on the OC20-like bench set and scaled.

    python benchmarks/bench_files.py [--source FILE] [--workers-at-scale 2 16 64] [--keep DIR]
                                     [--existing STORE] [--write-speed]

Featurizes the 200-structure OC20-like set (default features, float32, derivatives on) in
this process, with this checkout's code, and prints for the store it wrote: files and bytes
per array, files per GB.  Then it scales the measurement to a store of ``--structures``
(default 100,000) OC20-like structures: the bench set's per-structure atom and pair counts
repeated, planned as the pipeline would plan them for each ``--workers-at-scale`` (tasks
balanced by atoms, at most ``pipeline.max-task-atoms``), laid out with the store's own rules
(shard sizes, each task's pair region of whole shards), and each array's compressed bytes per
row taken from the measured store.  A shard file is counted when it holds any row (the shards
a task does not reach have no file).  Prints the scaled files, bytes and files per TB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "oc20_like_200.extxyz"


def file_stats(store: Path) -> dict[str, list[int]]:
    """{array path or "(metadata)": [files, bytes]} of a store."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for root, _dirs, files in os.walk(store):
        rel = Path(root).relative_to(store).as_posix()
        for f in files:
            size = os.path.getsize(os.path.join(root, f))
            if f == "zarr.json":
                key = "(metadata)"
            else:
                parts = rel.split("/")
                key = "/".join(parts[:2])
            out[key][0] += 1
            out[key][1] += size
    return dict(out)


def scaled(store: Path, structures: int, workers: int) -> tuple[int, int, dict]:
    """(files, bytes, per array) of a store of ``structures`` structures like ``store``'s,
    planned for ``workers`` workers."""
    import zarr

    from gmp_pipeline.pipeline.plan import plan_tasks
    from gmp_pipeline.store import open_store
    from gmp_pipeline.store.layout import ArraySpec, array_specs
    from gmp_pipeline.store.writer import pair_capacities, pair_shard_rows

    st = open_store(store)
    stats = file_stats(store)
    n_atoms = st.n_atoms()
    a0 = st.atom_start()
    pc = np.asarray(st.array("atoms/pair_count")[:])
    pairs = np.add.reduceat(pc, a0) if pc.size else np.zeros(0, np.int64)
    reps = -(-structures // len(st))
    big_atoms = np.tile(n_atoms, reps)[:structures]
    big_pairs = np.tile(pairs, reps)[:structures]
    schema = {"info": {}, "atom_info": {}}
    specs = array_specs(st.n_features, st.attrs["options"]["dtype"], True, schema)
    tasks = plan_tasks(big_atoms, n_workers=workers)
    spec = specs["pairs/dfeatures"]
    shard = pair_shard_rows(spec, big_atoms, tasks)
    caps = pair_capacities(big_atoms, tasks, shard)
    per_task = np.array([big_pairs[a:b].sum() for a, b in tasks], dtype=np.int64)
    rows = {"structures": structures, "atoms": int(big_atoms.sum()),
            "pairs": int(caps.sum())}
    out = {}
    g = zarr.open_group(str(store), mode="r")
    total_files = stats.get("(metadata)", [0, 0])[0]
    total_bytes = stats.get("(metadata)", [0, 0])[1]
    for path, (files, nbytes) in stats.items():
        if path == "(metadata)":
            continue
        level = path.split("/")[0]
        if path == "pairs/dfeatures":
            used = int(pc.sum())
            f = int(np.sum(-(-per_task // shard)))
            b = int(nbytes / used * int(per_task.sum()))
        else:
            arr = g[path]
            n_now = int(arr.shape[0])
            used = int(pc.sum()) if level == "pairs" else n_now
            used_big = int(per_task.sum()) if level == "pairs" else rows[level]
            sp = specs.get(path)
            if sp is None:          # an extra of the source: its dtype and trailing shape
                text = getattr(arr.dtype, "kind", "O") in "OUT" or "str" in str(arr.dtype)
                sp = ArraySpec(path, "str" if text else str(arr.dtype), tuple(arr.shape[1:]))
            shard_rows = sp.shard_rows(rows[level])
            if level == "pairs":     # shards holding any pair of some task
                starts = np.concatenate([[0], np.cumsum(caps)[:-1]])
                first, last = starts // shard_rows, (starts + per_task - 1) // shard_rows
                f = len({int(k) for a, b, n in zip(first, last, per_task) if n
                         for k in range(a, b + 1)})
            else:
                f = -(-rows[level] // shard_rows)
            b = int(nbytes / max(1, used) * used_big)
        out[path] = (f, b)
        total_files += f
        total_bytes += b
    return total_files, total_bytes, {"tasks": len(tasks), "pair_shard_rows": shard,
                                      "arrays": out}


def write_speed(store: Path, repeat: int = 3) -> None:
    """A/B in one process: the rows of ``store``'s ``pairs/dfeatures`` written into a fresh
    array of the same layout by the direct shard writer (streamed in the per-structure blocks
    a task hands it) and by Zarr's own write path (``arr[a:b] = rows``, one whole shard at a
    time, from memory); best of ``repeat`` each, interleaved, files compared byte for byte."""
    import json

    import zarr

    from gmp_pipeline.store import open_store
    from gmp_pipeline.store.chunks import open_direct
    from gmp_pipeline.store.layout import quiet_zarr

    st = open_store(store)
    src = st.array("pairs/dfeatures")
    n = int(st.attrs["counts"]["n_pairs"])
    data = np.asarray(src[:n])
    ps = np.asarray(st.array("atoms/pair_start")[:])
    a0 = st.atom_start()
    cuts = ps[a0][1:] - ps[a0][0] if len(a0) > 1 else np.zeros(0, np.int64)
    cuts = cuts[(cuts > 0) & (cuts < n)]
    meta = json.loads((store / "pairs" / "dfeatures" / "zarr.json").read_text())
    shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    tmp = Path(tempfile.mkdtemp(prefix="gmp-write-"))
    times = {"direct": [], "zarr": []}

    def fresh(name):
        root = zarr.open_group(str(tmp / name), mode="w")
        kw = {k: meta[k] for k in ("shape", "data_type", "chunk_grid", "chunk_key_encoding",
                                   "fill_value", "codecs", "dimension_names")}
        (tmp / name / "a").mkdir(parents=True)
        (tmp / name / "a" / "zarr.json").write_text(json.dumps(
            {**kw, "zarr_format": 3, "node_type": "array", "attributes": {},
             "storage_transformers": []}))
        return root

    try:
        with quiet_zarr():
            for _ in range(repeat):
                fresh("d")
                direct = open_direct(tmp / "d" / "a")
                t = time.perf_counter()
                stream = direct.stream(0)
                for block in np.split(data, cuts):
                    stream.append(block)
                stream.close()
                times["direct"].append(time.perf_counter() - t)
                fresh("z")
                arr = zarr.open_array(str(tmp / "z" / "a"), mode="r+")
                t = time.perf_counter()
                for r0 in range(0, n, shard):
                    arr[r0:min(n, r0 + shard)] = data[r0:r0 + shard]
                times["zarr"].append(time.perf_counter() - t)
                same = file_stats_bytes(tmp / "d" / "a") == file_stats_bytes(tmp / "z" / "a")
        mb = data.nbytes / 1e6
        print(f"write A/B, pairs/dfeatures of the store: {n} rows, {mb:.0f} MB uncompressed, "
              f"{shard} rows per shard, best of {repeat}, same bytes: {same}")
        for k, v in times.items():
            print(f"  {k:<7} {min(v):6.2f} s  {mb / min(v):7.0f} MB/s   (all: "
                  + ", ".join(f"{x:.2f}" for x in v) + ")")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_stats_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(DATA), help="extxyz file (ASE reader)")
    ap.add_argument("--structures", type=int, default=100_000,
                    help="size of the store the figures are scaled to")
    ap.add_argument("--workers-at-scale", type=int, nargs="+", default=[2, 16, 64],
                    help="worker counts the scaled store is planned for")
    ap.add_argument("--keep", help="write the store here and keep it (default: a temp dir)")
    ap.add_argument("--write-speed", action="store_true",
                    help="also time the direct shard writer against zarr's own write path")
    ap.add_argument("--existing", help="measure this store instead of writing one")
    args = ap.parse_args()

    from gmp_pipeline import GMPFeaturizer
    from gmp_pipeline.config import load_feature_config
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.readers import open_reader
    from gmp_pipeline.store import FORMAT_VERSION

    tmp = None
    if args.keep:
        store = Path(args.keep)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="gmp-files-"))
        store = tmp / "store.zarr"
    try:
        reader = open_reader("ase", args.source)
        if args.existing:
            store, dt = Path(args.existing), float("nan")
        else:
            fz = GMPFeaturizer(**load_feature_config(None))
            t0 = time.perf_counter()
            featurize_to_store(reader, store, fz, derivatives=True, overwrite=True,
                               progress=False, log=lambda m: None)
            dt = time.perf_counter() - t0
        stats = file_stats(store)
        files = sum(v[0] for v in stats.values())
        nbytes = sum(v[1] for v in stats.values())
        print(f"format v{FORMAT_VERSION} store of {len(reader)} structures from "
              f"{Path(args.source).name} (default features, float32, derivatives), written "
              f"in-process in {dt:.1f} s")
        print(f"{'array':<28} {'files':>6} {'MB':>9}")
        for k in sorted(stats):
            print(f"{k:<28} {stats[k][0]:>6} {stats[k][1] / 1e6:>9.2f}")
        print(f"measured: {files} files, {nbytes / 1e6:.1f} MB: "
              f"{files / (nbytes / 1e9):.0f} files per GB")
        for w in args.workers_at_scale:
            f, b, detail = scaled(store, args.structures, w)
            print(f"scaled to {args.structures} structures planned for {w} workers "
                  f"({detail['tasks']} tasks, {detail['pair_shard_rows']} pair rows per "
                  f"shard): {f} files, {b / 1e9:.1f} GB: {f / (b / 1e12):.0f} files per TB "
                  f"(goal <= 10000)")
        if args.write_speed:
            write_speed(store)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
