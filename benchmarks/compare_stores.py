"""Compare the stores two checkouts of gmp-pipeline write, for every bundled sample and reader kind.

    python benchmarks/compare_stores.py --old /path/to/old/checkout --new /path/to/new/checkout
                                        [--work DIR] [--keep] [--only NAME ...]

Every case (a reader kind, a source and reader options; bundled samples under
``tests/data/samples`` plus small OCP fixtures generated once) is featurized in-process
(``featurize_to_store(..., client=None)``) by a fresh interpreter whose ``PYTHONPATH`` is the
checkout, once with each checkout.  The two stores are then compared array by array: shape,
dtype, chunks and values (NaN equal to NaN), and root attributes apart from timestamps and
paths.  Arrays only the new checkout writes are listed as *new* (for example per-atom vector
extras that the old one could not store); a case the old checkout fails on is reported with its
error and every array of the new store counts as new.

Exit status 0 when nothing that both checkouts store differs, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLES = REPO / "tests" / "data" / "samples"

#: a small feature set (the default one for a few cases, to cover the shipped configuration)
SMALL = {"orders": [-1, 0, 1, 2], "sigmas": [0.3, 0.6], "psp": "QE-kjpaw",
         "overlap_threshold": 1e-12, "square": False}
DEFAULT = {"orders": [-1, 0, 1, 2, 3], "sigmas": [0.2, 0.4, 0.6, 0.8, 1.0], "psp": "QE-kjpaw",
           "overlap_threshold": 1e-16, "square": False}

#: root attributes that differ between any two runs
VOLATILE = ("created_at", "finished_at")


def cases(gen: Path) -> list[dict]:
    """(name, kind, path, options, features, derivatives) of every case."""
    s = SAMPLES
    return [
        dict(name="md17", kind="md17", path=s / "md17" / "ethanol.npz", options={},
             features=SMALL, derivatives=True),
        dict(name="md17-default-features-200", kind="md17", path=gen / "ethanol_200.npz",
             options={}, features=DEFAULT, derivatives=True),
        dict(name="md17-noderiv-f64", kind="md17", path=s / "md17" / "ethanol.npz",
             options={}, features=SMALL, derivatives=False, dtype="float64"),
        dict(name="rmd17", kind="rmd17", path=s / "rmd17" / "rmd17_ethanol_train_01.npz",
             options={}, features=SMALL, derivatives=True),
        dict(name="rmd17-old-forces", kind="rmd17",
             path=s / "rmd17" / "rmd17_ethanol_test_01.npz",
             options={"include_old_forces": True}, features=SMALL, derivatives=True),
        dict(name="qm9-dir", kind="qm9", path=s / "qm9", options={}, features=DEFAULT,
             derivatives=True),
        dict(name="ocp-pyg2-sample", kind="ocp", path=s / "oc20_lmdb" / "pyg2_is2re_style" /
             "data.lmdb", options={}, features=SMALL, derivatives=True),
        dict(name="ocp-pyg2-is2re-pos_relaxed", kind="ocp", path=gen / "is2re_pyg2.lmdb",
             options={}, features=SMALL, derivatives=True),
        dict(name="ocp-pyg1-s2ef-dir", kind="ocp", path=gen / "pyg1", options={},
             features=SMALL, derivatives=True),
        dict(name="ocp-aselmdb", kind="ocp", path=gen / "rows.aselmdb", options={},
             features=SMALL, derivatives=True),
        dict(name="ocp-s2ef-extxyz", kind="ocp", path=gen / "s2ef", options={},
             features=SMALL, derivatives=True),
        dict(name="ocp-extxyz-sample", kind="ocp", path=s / "extxyz" / "toy_c3h8_relax.extxyz",
             options={}, features=SMALL, derivatives=True),
        dict(name="ase-extxyz", kind="ase", path=s / "extxyz" / "toy_c3h8_relax.extxyz",
             options={}, features=DEFAULT, derivatives=True),
        dict(name="ase-db-json", kind="ase", path=s / "ase_db_json" / "atoms.json",
             options={}, features=SMALL, derivatives=True),
        dict(name="ase-extxyz-vector-array", kind="ase", path=gen / "vectors.extxyz",
             options={}, features=SMALL, derivatives=True),
    ]


def make_inputs(gen: Path, fixture_checkout: Path) -> None:
    """Generated sources (written once, read by both checkouts)."""
    gen.mkdir(parents=True, exist_ok=True)
    code = r'''
import sys, os, numpy as np
from pathlib import Path
gen = Path(sys.argv[1]); samples = Path(sys.argv[2])
try:
    from fixtures.ocp_writers import write_aselmdb, write_pyg_lmdb, write_s2ef_shard
except ImportError:
    from gmp_pipeline.readers._ocp_writers import write_aselmdb, write_pyg_lmdb, write_s2ef_shard
rng = np.random.default_rng(7)
with np.load(samples / "md17" / "ethanol.npz") as z:
    np.savez(gen / "ethanol_200.npz", **{k: (z[k][:200] if z[k].ndim and z[k].shape[0] == len(z["E"]) else z[k]) for k in z.files})
def rec(n, sid, fid, is2re=False):
    d = {"atomic_numbers": rng.choice([1, 6, 8, 29], n).astype(np.float32),
         "pos": rng.uniform(0, 8, (n, 3)).astype(np.float32),
         "cell": (np.eye(3, dtype=np.float32) * 8)[None], "natoms": n,
         "tags": rng.integers(0, 3, n), "fixed": (rng.random(n) < 0.3).astype(np.float32),
         "sid": sid}
    if is2re:
        d.update(y_init=np.float64(rng.normal()), y_relaxed=float(rng.normal()),
                 pos_relaxed=d["pos"] + rng.normal(scale=0.1, size=(n, 3)).astype(np.float32))
    else:
        d.update(fid=fid, y=np.float64(rng.normal()), force=rng.normal(size=(n, 3)).astype(np.float32))
    return d
write_pyg_lmdb(gen / "is2re_pyg2.lmdb", [rec(n, 10 + i, 0, True) for i, n in enumerate([6, 9, 4, 11])], layout="pyg2")
(gen / "pyg1").mkdir(exist_ok=True)
recs = [rec(n, 100 + i, i % 3) for i, n in enumerate([5, 9, 2, 7, 8])]
write_pyg_lmdb(gen / "pyg1" / "data.0000.lmdb", recs[:3], layout="pyg1")
write_pyg_lmdb(gen / "pyg1" / "data.0001.lmdb", recs[3:], layout="pyg1", length_key=False)
rows = []
for i, n in enumerate([3, 6, 5]):
    rows.append({"numbers": np.array([29] * (n - 1) + [8]), "positions": rng.uniform(0, 5, (n, 3)),
                 "cell": np.diag([5.0, 5.0, 20.0]), "pbc": np.array([True, True, True]),
                 "unique_id": f"{i:032x}", "tags": np.array([0] * (n - 1) + [2]),
                 "constraints": [{"name": "FixAtoms", "kwargs": {"indices": [0, 1]}}],
                 "energy": -10.0 - i, "free_energy": -10.5 - i, "forces": rng.normal(size=(n, 3)),
                 "stress": np.arange(6.0) * (i + 1), "key_value_pairs": {"sid": 70 + i},
                 "data": {"fid": i, "note": "x"}, "ctime": 24.0, "mtime": 24.0, "user": "u",
                 "calculator": "singlepoint"})
write_aselmdb(gen / "rows.aselmdb", rows, dialect="ase")
(gen / "s2ef").mkdir(exist_ok=True)
frames = [{"numbers": rng.choice([1, 6, 29], n), "positions": rng.uniform(0, 9, (n, 3)),
           "cell": np.diag([9.0, 9.0, 30.0]), "fixed": rng.random(n) < 0.4,
           "tags": rng.integers(0, 3, n), "forces": rng.normal(size=(n, 3)),
           "energy": float(rng.normal(-300, 5)), "free_energy": float(rng.normal(-300, 5))}
          for n in [4, 6, 3]]
write_s2ef_shard(gen / "s2ef", "0", frames, ["random11,frame0,-290.5", "random12,frame7,-280.25", "random13,frame1,-270"])
import ase.io
from ase.build import molecule
out = []
for k in range(4):
    a = molecule("CH3CH2OH"); a.positions += rng.normal(scale=0.05, size=a.positions.shape)
    a.new_array("displacement", rng.normal(size=(len(a), 3)))
    a.new_array("weight", rng.normal(size=len(a)))
    a.info["step"] = k
    out.append(a)
ase.io.write(gen / "vectors.extxyz", out, format="extxyz")
'''
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fixture_checkout),
                                                        str(fixture_checkout / "tests")])}
    subprocess.run([sys.executable, "-c", code, str(gen), str(SAMPLES)], check=True, env=env,
                   cwd=gen)


RUN = r'''
import json, sys, warnings
case = json.loads(sys.argv[1])
from gmp_pipeline.features import GMPFeaturizer
from gmp_pipeline.pipeline import featurize_to_store
from gmp_pipeline.readers import open_reader
import gmp_pipeline
print("using", gmp_pipeline.__file__, file=sys.stderr)
reader = open_reader(case["kind"], case["path"], **case["options"])
featurize_to_store(reader, case["store"], GMPFeaturizer(**case["features"]),
                   derivatives=case["derivatives"], dtype=case.get("dtype", "float32"),
                   client=None, overwrite=True, progress=False, log=lambda m: None)
'''


def featurize(checkout: Path, case: dict, store: Path) -> str | None:
    """Write ``store`` with ``checkout``; None on success, else the error's last line."""
    doc = {**case, "path": str(case["path"]), "store": str(store)}
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    # run outside any checkout: ``python -c`` puts the working directory first on sys.path
    p = subprocess.run([sys.executable, "-c", RUN, json.dumps(doc)], env=env, cwd=store.parent,
                       capture_output=True, text=True)
    used = [ln for ln in p.stderr.splitlines() if ln.startswith("using ")]
    if used and not used[0].split()[1].startswith(str(checkout)):
        raise SystemExit(f"{checkout}: the subprocess imported {used[0].split()[1]} instead")
    if p.returncode:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {p.returncode}"
    return None


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _arrays(group) -> dict:
    out = {}
    for level in ("structures", "atoms", "pairs", "skipped"):
        if level in group:
            for name, arr in group[level].arrays():
                out[f"{level}/{name}"] = arr
    return out


def compare(old: Path, new: Path) -> tuple[list[str], list[str], list[str]]:
    """(differences, arrays only in new (with shape), attributes only in new)."""
    import warnings

    import zarr

    ja = json.loads((old / "zarr.json").read_text()).get("attributes", {})
    jb = json.loads((new / "zarr.json").read_text()).get("attributes", {})
    fa, fb = _flat(ja), _flat(jb)
    diffs, added_attrs = [], []
    for key in sorted(set(fa) | set(fb)):
        if any(key == v or key.startswith(v + ".") for v in VOLATILE):
            continue
        if key not in fa:
            added_attrs.append(f"{key} = {fb[key]!r}")
        elif fa[key] != fb.get(key, "<absent>"):
            diffs.append(f"attr {key}: {fa[key]!r} (old) != {fb.get(key, '<absent>')!r} (new)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = _arrays(zarr.open_group(str(old), mode="r")), _arrays(zarr.open_group(str(new),
                                                                                     mode="r"))
        for name in sorted(set(a) - set(b)):
            diffs.append(f"{name}: only in the old store")
        added = [f"{n} {tuple(b[n].shape)} {b[n].dtype}" for n in sorted(set(b) - set(a))]
        for name in sorted(set(a) & set(b)):
            xa, xb = a[name], b[name]
            if (xa.shape, str(xa.dtype), xa.chunks) != (xb.shape, str(xb.dtype), xb.chunks):
                diffs.append(f"{name}: shape/dtype/chunks {xa.shape} {xa.dtype} {xa.chunks} "
                             f"(old) != {xb.shape} {xb.dtype} {xb.chunks} (new)")
                continue
            va, vb = np.asarray(xa[...]), np.asarray(xb[...])
            if va.dtype.kind in "OUT" or vb.dtype.kind in "OUT":
                same = [str(x) for x in va.ravel()] == [str(x) for x in vb.ravel()]
            else:
                same = np.array_equal(va, vb, equal_nan=va.dtype.kind == "f")
            if not same:
                diffs.append(f"{name}: values differ")
    return diffs, added, added_attrs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="checkout written before the change")
    ap.add_argument("--new", default=REPO, type=Path, help="checkout after (default: this one)")
    ap.add_argument("--work", type=Path, help="directory for inputs and stores (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--only", nargs="*", help="case names to run")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gmp-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    gen = work / "inputs"
    if not (gen / "vectors.extxyz").exists():
        make_inputs(gen, args.old.resolve())
    bad = 0
    for case in cases(gen):
        if args.only and case["name"] not in args.only:
            continue
        stores = {}
        errors = {}
        for label, checkout in (("old", args.old.resolve()), ("new", args.new.resolve())):
            stores[label] = work / "stores" / label / f"{case['name']}.zarr"
            stores[label].parent.mkdir(parents=True, exist_ok=True)
            errors[label] = featurize(checkout, case, stores[label])
        title = f"{case['name']} ({case['kind']} {Path(case['path']).name}" + (
            f" {case['options']}" if case["options"] else "") + ")"
        if errors["new"]:
            bad += 1
            print(f"FAIL {title}: the new checkout failed: {errors['new']}")
            continue
        if errors["old"]:
            import zarr

            arrays = _arrays(zarr.open_group(str(stores["new"]), mode="r"))
            extras = json.loads((stores["new"] / "zarr.json").read_text())["attributes"]["extras"]
            shown = [f"{p} {tuple(arrays[p].shape)} {arrays[p].dtype}"
                     for p in sorted({**extras["info"], **extras["atom_info"]}.values())
                     if p in arrays and arrays[p].ndim > 1]
            print(f"NEW  {title}: the old checkout failed ({errors['old']}); the new store has "
                  f"{len(arrays)} arrays" + (f", vector extras: {', '.join(shown)}" if shown
                                             else ""))
            continue
        diffs, added, added_attrs = compare(stores["old"], stores["new"])
        status = "FAIL" if diffs else "OK  "
        bad += bool(diffs)
        print(f"{status} {title}: {'equal' if not diffs else f'{len(diffs)} differences'}"
              + (f"; new arrays: {', '.join(added)}" if added else "")
              + (f"; new attributes: {', '.join(added_attrs)}" if added_attrs else ""))
        for d in diffs:
            print(f"       {d}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
