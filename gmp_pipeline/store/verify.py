"""Checking a store: :func:`store_report` (what ``gmp-pipeline inspect`` shows) and
:func:`verify_store` (indexes consistent, and a random sample recomputed from the source)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .layout import FORMAT_NAME, LEVELS, quiet_zarr, read_root_attrs
from .staging import finished_tasks, load_plan


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def store_report(path) -> dict:
    """Everything ``inspect`` prints, as a dict."""
    path = Path(path)
    attrs = read_root_attrs(path) if path.is_dir() else None
    if attrs is None:
        raise StoreError(f"{path} is not a Zarr store (no zarr.json)")
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not a gmp-features store (format {attrs.get('format')!r})")
    report = {"path": str(path.resolve()), "attrs": attrs, "arrays": [],
              "bytes_on_disk": _dir_bytes(path)}
    if not attrs.get("complete"):
        plan = load_plan(path)
        if plan:
            report["progress"] = {"tasks_planned": len(plan["tasks"]),
                                  "tasks_done": len(finished_tasks(path))}
    import zarr

    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r")
        for level in LEVELS:
            if level not in root:
                continue
            for name, arr in sorted(root[level].arrays()):
                nbytes = int(np.prod(arr.shape, dtype=np.int64)) * (
                    arr.dtype.itemsize if hasattr(arr.dtype, "itemsize") else 16)
                report["arrays"].append({
                    "path": f"{level}/{name}", "shape": list(arr.shape),
                    "dtype": "str" if "str" in str(arr.dtype).lower() else str(arr.dtype),
                    "chunks": list(arr.chunks), "bytes": nbytes,
                    "bytes_on_disk": _dir_bytes(path / level / name)})
    return report


def verify_store(path, sample: int = 5, seed: int = 0) -> list[str]:
    """Check the structure of STORE and recompute ``sample`` random structures in-process.

    Returns a list of problems (empty when the store is good).
    """
    from ..features import GMPFeaturizer
    from ..readers import open_reader
    from .reader import open_store

    st = open_store(path)
    a = st.attrs
    problems: list[str] = []
    n_atoms = st.n_atoms()
    counts = a.get("counts", {})
    if int(n_atoms.sum()) != counts.get("n_atoms"):
        problems.append(f"counts.n_atoms {counts.get('n_atoms')} != sum of n_atoms "
                        f"{int(n_atoms.sum())}")
    start = np.asarray(st.array("structures/atom_start")[:])
    if not np.array_equal(start, np.concatenate([[0], np.cumsum(n_atoms)[:-1]])):
        problems.append("structures/atom_start is not the running sum of n_atoms")
    if st.has_derivatives:
        pc = np.asarray(st.array("atoms/pair_count")[:])
        ps = np.asarray(st.array("atoms/pair_start")[:])
        rows = st.array("pairs/neighbor").shape[0]
        if pc.size and (np.any(ps[1:] < ps[:-1] + pc[:-1]) or ps[0] < 0
                        or ps[-1] + pc[-1] > rows):
            problems.append("atoms/pair_start ranges overlap or leave pairs/")
        if int(pc.sum()) != counts.get("n_pairs"):
            problems.append(f"sum of pair_count {int(pc.sum())} != counts.n_pairs "
                            f"{counts.get('n_pairs')}")
        if rows > 50_000_000:   # too big to scan here; the sampled structures are checked below
            rows = 0
        neigh = np.asarray(st.array("pairs/neighbor")[:rows])
        ps, pc = ps[(ps + pc) <= rows], pc[(ps + pc) <= rows]
        marks = np.zeros(rows + 1, dtype=np.int64)
        np.add.at(marks, ps[pc > 0], 1)
        np.add.at(marks, (ps + pc)[pc > 0], -1)
        used = np.cumsum(marks)[:-1] > 0
        if np.any(neigh[used] < 0) or np.any(neigh[~used] != -1):
            problems.append("pairs/neighbor has unset rows inside or data outside the pair ranges")
    src = a["source"]
    options = dict(src.get("options") or {})
    reader = open_reader(src["reader"], src["path"],
                         skip_bad_records=bool(src.get("skip_bad_records")), **options)
    fz = GMPFeaturizer.from_config(a["feature_config"])
    derivatives = bool(a["options"]["derivatives"])
    dtype = np.dtype(a["options"]["dtype"])
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(st), size=min(int(sample), len(st)), replace=False) if len(st) else []
    for i in sorted(int(i) for i in idx):
        d = st[i]
        si = int(d["source_index"])
        found = [s for s in reader.read(si, si + 1)]
        if len(found) != 1:
            problems.append(f"structure {i}: source record {si} could not be read back")
            continue
        s = found[0]
        r = fz.featurize(s, derivatives=derivatives)

        def close(name, got, want, tol=rtol):
            want = np.asarray(want, dtype=np.float64)
            got = np.asarray(got, dtype=np.float64)
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            if got.shape != want.shape:
                problems.append(f"structure {i}: {name} shape {got.shape} != {want.shape}")
            elif not np.allclose(got, want, rtol=tol, atol=tol * scale + 1e-30, equal_nan=True):
                err = float(np.max(np.abs(got - want)))
                problems.append(f"structure {i}: {name} differs (max abs error {err:.3g})")

        if not np.array_equal(d["numbers"], s.numbers):
            problems.append(f"structure {i}: numbers differ from source record {si}")
        close("positions", d["positions"], s.positions, 0)
        close("cell", d["cell"], s.cell, 0)
        if s.energy is not None:
            close("energy", d["energy"], s.energy, 0)
        if s.forces is not None:
            close("forces", d["forces"], s.forces, 0)
        close("features", d["features"], r.features)
        if derivatives:
            if not (np.array_equal(d["pair_center"], r.pair_center)
                    and np.array_equal(d["pair_neighbor"], r.pair_neighbor)):
                problems.append(f"structure {i}: pair lists differ")
            else:
                close("dfeatures", d["dfeatures"], r.dfeatures)
    return problems


__all__ = ["store_report", "verify_store"]
