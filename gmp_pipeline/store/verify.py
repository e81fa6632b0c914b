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
                    "chunks": list(arr.chunks),
                    "shards": list(arr.shards) if getattr(arr, "shards", None) else None,
                    "bytes": nbytes,
                    "bytes_on_disk": _dir_bytes(path / level / name)})
    return report


class VerifyResult(list):
    """The problems :func:`verify_store` found (a list of messages, empty when the store is
    good), with ``checked`` (structures recomputed) and ``notes`` (what was not checked, and
    why)."""

    checked: int = 0
    chunks_checked: int = 0
    notes: list


#: verify reads the index arrays this many rows at a time, so its memory does not grow with
#: the store
VERIFY_BLOCK_ROWS = 1 << 22
#: bytes of derivative pairs (stored and recomputed, float64) above which a sampled structure's
#: dfeatures are not recomputed (its features still are)
VERIFY_PAIR_BYTES = 256 << 20


def _check_indexes(st, problems: list[str]) -> None:
    """Index arrays consistent, read block by block (memory independent of the store size)."""
    counts = st.attrs.get("counts", {})
    n_atoms = st.n_atoms()
    if int(n_atoms.sum()) != counts.get("n_atoms"):
        problems.append(f"counts.n_atoms {counts.get('n_atoms')} != sum of n_atoms "
                        f"{int(n_atoms.sum())}")
    if not np.array_equal(st.atom_start(), np.concatenate([[0], np.cumsum(n_atoms)[:-1]])):
        problems.append("structures/atom_start is not the running sum of n_atoms")
    if not st.has_derivatives:
        return
    pc_arr, ps_arr = st.array("atoms/pair_count"), st.array("atoms/pair_start")
    nb_arr = st.array("pairs/neighbor")
    rows = nb_arr.shape[0]
    n_total = pc_arr.shape[0]
    total_pairs = 0
    prev_end = 0          # end of the previous centre's pair range
    used_end = 0          # neighbour rows checked so far
    overlap = False
    bad_neighbors = False
    for a in range(0, n_total, VERIFY_BLOCK_ROWS):
        b = min(n_total, a + VERIFY_BLOCK_ROWS)
        pc = np.asarray(pc_arr[a:b], dtype=np.int64)
        ps = np.asarray(ps_arr[a:b], dtype=np.int64)
        total_pairs += int(pc.sum())
        if pc.size:
            if (ps[0] < prev_end or np.any(ps[1:] < ps[:-1] + pc[:-1]) or ps[0] < 0
                    or ps[-1] + pc[-1] > rows):
                overlap = True
            prev_end = int(ps[-1] + pc[-1])
        # neighbour rows of this block's centres, read in spans of at most a block
        ends = ps + pc
        k = 0
        while k < ps.size and not bad_neighbors:
            lo = int(ps[k])
            m = int(np.searchsorted(ends, lo + VERIFY_BLOCK_ROWS, side="right"))
            m = max(m, k + 1)
            hi = int(ends[m - 1])
            if hi > rows or lo < used_end:
                break
            neigh = np.asarray(nb_arr[used_end:hi])       # gap rows before lo, then pairs
            marks = np.zeros(hi - used_end + 1, dtype=np.int64)
            sel = pc[k:m] > 0
            np.add.at(marks, ps[k:m][sel] - used_end, 1)
            np.add.at(marks, ends[k:m][sel] - used_end, -1)
            used = np.cumsum(marks)[:-1] > 0
            if np.any(neigh[used] < 0) or np.any(neigh[~used] != -1):
                bad_neighbors = True
            used_end = hi
            k = m
    # rows after the last pair range are unused
    for a in range(used_end, rows, VERIFY_BLOCK_ROWS):
        if bad_neighbors:
            break
        if np.any(np.asarray(nb_arr[a:min(rows, a + VERIFY_BLOCK_ROWS)]) != -1):
            bad_neighbors = True
    if overlap:
        problems.append("atoms/pair_start ranges overlap or leave pairs/")
    if total_pairs != counts.get("n_pairs"):
        problems.append(f"sum of pair_count {total_pairs} != counts.n_pairs "
                        f"{counts.get('n_pairs')}")
    if bad_neighbors:
        problems.append("pairs/neighbor has unset rows inside or data outside the pair ranges")


#: verify decodes at most about this many bytes of an array at a time (whole inner chunks)
VERIFY_READ_BYTES = 64 << 20


def _check_chunks(st, problems: list[str]) -> int:
    """Decode every chunk of every array, a few at a time (a chunk whose bytes were changed
    fails its crc32c checksum, or its decompression; so does a shard whose index was changed).
    A problem names the array, the shard (format v2) or chunk (v1) and its rows.  Returns the
    number of (inner) chunks read."""
    n = 0
    for path, arr in sorted(st._arrays.items()):
        if not hasattr(arr, "metadata"):        # not a zarr array (an incomplete store's view)
            continue
        rows = int(arr.chunks[0])               # the inner chunk of a sharded array
        shard = int(arr.shards[0]) if getattr(arr, "shards", None) else None
        unit = shard or rows
        item = getattr(arr.dtype, "itemsize", 16) or 16
        row_bytes = max(1, item * int(np.prod(arr.shape[1:], dtype=np.int64)))
        per = unit // rows                       # chunks per shard (1 unsharded)
        k = max(1, min(per, VERIFY_READ_BYTES // max(1, rows * row_bytes)))
        while per % k:                           # reads never straddle two shards
            k -= 1
        step = rows * k
        total = int(arr.shape[0])
        bad = {}
        for a in range(0, total, step):
            b = min(a + step, total)
            try:
                arr[a:b]
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
                bad.setdefault(a // unit, exc)
            n += -(-(b - a) // rows)
        if bad:
            k, exc = next(iter(bad.items()))
            what = "shard" if shard else "chunk"
            more = f" (and {len(bad) - 1} more {what}s)" if len(bad) > 1 else ""
            problems.append(f"{path}: {what} {k} (rows {k * unit}-"
                            f"{min(total, (k + 1) * unit) - 1}) is corrupt: "
                            f"{str(exc).splitlines()[0][:160]}{more}")
    return n


def verify_store(path, sample: int = 5, seed: int = 0, checksums: bool = True) -> VerifyResult:
    """Check the structure of STORE and recompute ``sample`` random structures in-process.

    Returns the problems found (empty when the store is good) as a :class:`VerifyResult`,
    which also says how many structures were recomputed.  ``checksums``: first decode every
    chunk of every array, which checks the crc32c checksum each chunk carries.  Memory stays bounded whatever the
    store size: index arrays are read in blocks, the reader's chunk cache is small, and the
    derivatives of a sampled structure with more than ``VERIFY_PAIR_BYTES`` of pairs are not
    recomputed (its features are; a note says so).
    """
    from ..features import GMPFeaturizer
    from ..readers import open_reader
    from .reader import open_store
    from .staging import free_atoms

    st = open_store(path, cache_bytes=64 << 20)
    a = st.attrs
    problems = VerifyResult()
    problems.notes = []
    if checksums:
        problems.chunks_checked = _check_chunks(st, problems)
    _check_indexes(st, problems)
    src = a["source"]
    options = dict(src.get("options") or {})
    reader = open_reader(src["reader"], src["path"],
                         skip_bad_records=bool(src.get("skip_bad_records")), **options)
    fz = GMPFeaturizer.from_config(a["feature_config"])
    derivatives = bool(a["options"]["derivatives"])
    free_only = st.derivative_atoms == "free"
    dtype = np.dtype(a["options"]["dtype"])
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(st), size=min(int(sample), len(st)), replace=False) if len(st) else []
    pair_row_bytes = 3 * st.n_features * (dtype.itemsize + 8) + 16
    for i in sorted(int(i) for i in idx):
        n_pairs = 0
        if derivatives:
            a0, n = int(st.atom_start()[i]), int(st.n_atoms()[i])
            n_pairs = int(np.asarray(st.array("atoms/pair_count")[a0:a0 + n]).sum())
        with_derivs = derivatives and n_pairs * pair_row_bytes <= VERIFY_PAIR_BYTES
        if derivatives and not with_derivs:
            problems.notes.append(
                f"structure {i}: dfeatures not recomputed ({n_pairs} pairs, "
                f"{n_pairs * pair_row_bytes / 2**20:.0f} MiB over the {VERIFY_PAIR_BYTES >> 20} "
                "MiB verify budget); its features were")
        fields = [f for f in st.fields if f not in st.text_fields
                  and (with_derivs or f not in ("dfeatures", "pair_center", "pair_neighbor"))]
        d = st.get_batch([i], fields=fields)[0]
        si = int(d["source_index"])
        found = [s for s in reader.read(si, si + 1)]
        if len(found) != 1:
            problems.append(f"structure {i}: source record {si} could not be read back")
            continue
        s = found[0]
        r = fz.featurize(s, derivatives=with_derivs)
        problems.checked += 1

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
        if with_derivs:
            pc, pn, df = r.pair_center, r.pair_neighbor, r.dfeatures
            if free_only:
                keep = free_atoms(s)[pn]
                pc, pn, df = pc[keep], pn[keep], df[keep]
            if not (np.array_equal(d["pair_center"], pc)
                    and np.array_equal(d["pair_neighbor"], pn)):
                problems.append(f"structure {i}: pair lists differ")
            else:
                close("dfeatures", d["dfeatures"], df)
        del d, r
    return problems


__all__ = ["VerifyResult", "store_report", "verify_store"]
