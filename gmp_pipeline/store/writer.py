"""Writing a store in three race-free phases: plan, stage (per task), assemble (per chunk).

1. **Plan** (driver): the root group is created with ``complete: false`` and the task plan
   (structure ranges balanced by atoms) is saved in ``_staging/plan.json``.
2. **Stage** (one Dask task per planned range, :func:`stage_task`): the task reads its slice of
   the source, featurizes it and saves its arrays under its *own* directory
   ``_staging/tasks/t0000012``.  It writes into a temporary directory and renames it into place,
   so the directory exists only when complete: it is the task's completion marker.  Its
   ``meta.json`` holds the task's structure, atom and pair counts -- this is the pair-counting
   pass: pair counts are only known once the neighbour lists are built.
3. **Assemble** (one Dask task per group of whole output chunks, :func:`assemble_rows`): the
   global offsets of every task are prefix sums of the staged counts; the final arrays are created
   with their exact shapes; each assembly job owns a disjoint, chunk-aligned row range of one
   array and is the only writer of those chunks.
4. **Finalize** (driver, :func:`finalize`): root attrs get ``complete: true`` and the counts,
   metadata is consolidated once, and ``_staging`` is removed.

No two concurrent writers ever touch the same file: staging directories are per task, assembly
jobs own whole chunks, metadata is written only by the driver.  The final layout depends only on
the source and the configuration, not on the task plan or on which worker did what.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
import numpy as np

from ..errors import StoreError
from .layout import (DIRECT, FORMAT_NAME, FORMAT_VERSION, STAGING_DIR, ArraySpec, array_specs, codecs_for,
                     describe_differences, fingerprint)

#: uncompressed bytes one assembly job writes (a whole number of chunks, at least one)
ASSEMBLY_JOB_BYTES = 64 << 20


@contextlib.contextmanager
def quiet_zarr():
    """Silence zarr's warnings about consolidated metadata, text dtypes and ``_staging``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
        warnings.filterwarnings("ignore", category=FutureWarning, module="zarr")
        yield


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def read_root_attrs(path) -> dict | None:
    """Root attributes of the Zarr v3 group at ``path``, or None if there is none."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{meta} is unreadable: {exc}") from exc
    return doc.get("attributes", {}) or {}


def staging_dir(path) -> Path:
    return Path(path) / STAGING_DIR


def task_dir(path, task: int) -> Path:
    return staging_dir(path) / "tasks" / f"t{task:07d}"


# -- phase 1: create or resume -------------------------------------------------------------------

def prepare_store(path, attrs: dict, *, overwrite: bool = False) -> str:
    """Create the store, or check an existing one against ``attrs["fingerprint"]``.

    Returns ``"new"``, ``"resume"`` (same fingerprint, not complete) or ``"complete"``.
    Raises :class:`StoreError` for a store written with a different configuration (naming what
    differs) or a path that holds something else.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory")
        old = read_root_attrs(path)
        if old is None:
            if any(path.iterdir()):
                raise StoreError(f"{path} exists and is not a Zarr store; refusing to touch it "
                                 "(choose another output path or remove it yourself)")
        elif overwrite:
            shutil.rmtree(path)
        elif old.get("format") != FORMAT_NAME:
            raise StoreError(f"{path} is a Zarr store but not a {FORMAT_NAME} store; use "
                             "--overwrite to replace it")
        elif old.get("fingerprint") != attrs["fingerprint"]:
            diffs = describe_differences(old.get("fingerprint_parts", {}),
                                         attrs.get("fingerprint_parts", {}))
            detail = "; ".join(diffs) if diffs else "fingerprint differs"
            raise StoreError(f"{path} was written with a different configuration ({detail}). "
                             "Use --overwrite to replace it, or choose another output path.")
        elif old.get("complete"):
            return "complete"
        else:
            staging_dir(path).mkdir(parents=True, exist_ok=True)
            return "resume"
    import zarr

    with quiet_zarr():
        zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs)
    (staging_dir(path) / "tasks").mkdir(parents=True, exist_ok=True)
    return "new"


def save_plan(path, tasks: list[tuple[int, int]], extra: dict | None = None) -> None:
    plan = {"tasks": [[int(a), int(b)] for a, b in tasks], **(extra or {})}
    staging_dir(path).mkdir(parents=True, exist_ok=True)
    _atomic_write_json(staging_dir(path) / "plan.json", plan)


def load_plan(path) -> dict | None:
    p = staging_dir(path) / "plan.json"
    return json.loads(p.read_text()) if p.is_file() else None


def finished_tasks(path) -> set[int]:
    """Ids of the tasks whose staging directory is complete (their completion marker)."""
    d = staging_dir(path) / "tasks"
    if not d.is_dir():
        return set()
    done = set()
    for entry in d.iterdir():
        name = entry.name
        if name.startswith("t") and name[1:].isdigit() and (entry / "meta.json").is_file():
            done.add(int(name[1:]))
    return done


def clean_partial_tasks(path) -> int:
    """Remove temporary directories left by tasks that were killed mid-write."""
    d = staging_dir(path) / "tasks"
    n = 0
    if d.is_dir():
        for entry in d.iterdir():
            if ".tmp-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)
                n += 1
    return n


# -- phase 2: stage one task ---------------------------------------------------------------------

def _file(spec_path: str) -> str:
    return spec_path.replace("/", "__") + ".npy"


def collect_arrays(structures, results, specs: dict[str, ArraySpec], schema: dict,
                   derivatives: bool) -> dict[str, np.ndarray]:
    """The staged arrays of one task: per-structure, per-atom and per-pair rows, concatenated."""
    out: dict[str, list] = {p: [] for p in specs}
    # the big arrays are filled in place, cast to the store dtype on the way (no float64 concat)
    big: dict[str, np.ndarray] = {}
    n_tot = sum(len(s) for s in structures)
    fspec = specs["atoms/features"]
    big["atoms/features"] = np.empty((n_tot,) + fspec.trailing, dtype=fspec.dtype)
    if derivatives:
        p_tot = sum(int(np.asarray(r.pair_center).shape[0]) for r in results)
        dspec = specs["pairs/dfeatures"]
        big["pairs/dfeatures"] = np.empty((p_tot,) + dspec.trailing, dtype=dspec.dtype)
        big["pairs/neighbor"] = np.empty(p_tot, dtype=np.int32)
    a_off = p_off = 0
    info_map = {name: p for name, p in _extra_paths(schema, "info", "structures").items()}
    atom_map = {name: p for name, p in _extra_paths(schema, "atom_info", "atoms").items()}
    for s, r in zip(structures, results):
        n = len(s)
        out["structures/n_atoms"].append(np.array([n], dtype=np.int64))
        out["structures/source_index"].append(np.array([s.source_index], dtype=np.int64))
        out["structures/energy"].append(
            np.array([np.nan if s.energy is None else float(s.energy)], dtype=np.float64))
        out["structures/cell"].append(s.cell.reshape(1, 3, 3))
        out["structures/pbc"].append(s.pbc.reshape(1, 3))
        out["atoms/numbers"].append(s.numbers)
        out["atoms/positions"].append(s.positions)
        if "atoms/forces" in specs:
            out["atoms/forces"].append(s.forces if s.forces is not None
                                       else np.full((n, 3), np.nan))
        feats = np.asarray(r.features)
        if feats.shape != (n, specs["atoms/features"].trailing[0]):
            raise StoreError(f"featurizer returned features of shape {feats.shape} for a "
                             f"structure of {n} atoms (source index {s.source_index})")
        big["atoms/features"][a_off:a_off + n] = feats
        a_off += n
        for name, p in info_map.items():
            value = s.info.get(name, specs[p].fill)
            out[p].append(np.array([value], dtype=object if specs[p].is_str else specs[p].dtype))
        for name, p in atom_map.items():
            value = s.atom_info.get(name)
            if value is None:
                value = specs[p].empty(n)
            out[p].append(np.asarray(value).reshape(n))
        if derivatives:
            pc = np.asarray(r.pair_center, dtype=np.int64)
            pn = np.asarray(r.pair_neighbor, dtype=np.int64)
            df = np.asarray(r.dfeatures)
            if pc.size > 1 and np.any(np.diff(pc) < 0):
                order = np.lexsort((pn, pc))
                pc, pn, df = pc[order], pn[order], df[order]
            out["atoms/pair_count"].append(np.bincount(pc, minlength=n).astype(np.int64))
            k = pc.shape[0]
            big["pairs/neighbor"][p_off:p_off + k] = pn
            big["pairs/dfeatures"][p_off:p_off + k] = df
            p_off += k
    arrays = dict(big)
    for p, parts in out.items():
        spec = specs[p]
        if p in ("structures/atom_start", "atoms/pair_start") or p in big:
            continue  # derived from the counts at assembly time, or filled above
        if parts:
            a = np.concatenate(parts, axis=0)
        else:
            a = spec.empty(0)
        if spec.is_str:
            a = np.asarray([str(x) for x in a.reshape(-1)], dtype=str)
            if a.size == 0:
                a = np.zeros(0, dtype="<U1")
        else:
            a = np.ascontiguousarray(a, dtype=spec.dtype).reshape((-1,) + spec.trailing)
        arrays[p] = a
    return arrays


def _extra_paths(schema, key, level):
    from .layout import extra_path

    return {name: extra_path(level, name) for name in sorted(schema.get(key) or {})}


def write_staged(path, task: int, arrays: dict[str, np.ndarray], meta: dict) -> bool:
    """Save one task's arrays in its own directory; False if another run already saved it."""
    final = task_dir(path, task)
    if (final / "meta.json").is_file():
        return False
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        for p, a in arrays.items():
            np.save(tmp / _file(p), a, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / "meta.json").is_file():  # same task finished elsewhere: same content
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def load_metas(path, n_tasks: int) -> list[dict]:
    metas = []
    for t in range(n_tasks):
        f = task_dir(path, t) / "meta.json"
        if not f.is_file():
            raise StoreError(f"task {t} of {path} has no staged result; cannot assemble")
        metas.append(json.loads(f.read_text()))
    return metas


# -- pairs/dfeatures: written directly by the tasks into regions they own ---------------------------

def pair_capacities(n_atoms, tasks, chunk_rows: int) -> np.ndarray:
    """Rows of ``pairs/dfeatures`` reserved for each task: an upper bound of its pair count
    (a structure of n atoms has at most n * n distinct (centre, neighbour) pairs) rounded up to
    whole chunks, so every task owns whole chunks and starts on a chunk boundary."""
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    sq = np.concatenate([[0], np.cumsum(n_atoms * n_atoms)])
    bound = np.array([sq[b] - sq[a] for a, b in tasks], dtype=np.int64)
    return -(-bound // chunk_rows) * chunk_rows


def ensure_direct_arrays(path, specs: dict[str, ArraySpec], pair_rows: int) -> None:
    """Create the arrays tasks write directly (``pairs/dfeatures``), once, before any task."""
    import zarr

    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        for spec in specs.values():
            if spec.path not in DIRECT:
                continue
            if spec.level not in root:
                root.create_group(spec.level)
            if spec.path in root:
                continue
            root.create_array(
                spec.path, shape=(int(pair_rows),) + spec.trailing,
                chunks=(spec.chunk_rows(1 << 62),) + spec.trailing, dtype=spec.dtype,
                fill_value=spec.fill, compressors=codecs_for(spec),
                dimension_names=[spec.level] + [f"dim{i + 1}" for i in range(len(spec.trailing))])


def write_direct(path, spec_path: str, base: int, capacity: int, block: np.ndarray) -> None:
    """Write a task's rows at the start of the region ``[base, base + capacity)`` it owns."""
    import zarr

    if block.shape[0] > capacity:
        raise StoreError(f"{spec_path}: {block.shape[0]} rows exceed the {capacity} reserved")
    if block.shape[0] == 0:
        return
    with quiet_zarr():
        arr = zarr.open_array(str(Path(path) / spec_path), mode="r+")
        arr[base:base + block.shape[0]] = block


# -- phase 3: assemble -----------------------------------------------------------------------------

def task_layout(metas: list[dict], pair_base=None) -> tuple[dict, dict]:
    """(bases, counts): row offset (length n_tasks + 1) and row count of every task per level.

    Structures and atoms are dense (each task starts where the previous one ends).  Pairs
    start at ``pair_base`` (the regions reserved in the plan), so they may be followed by
    unused rows.
    """
    bases, counts = {}, {}
    for level, key in (("structures", "n_structures"), ("atoms", "n_atoms"),
                       ("pairs", "n_pairs")):
        c = np.array([m.get(key, 0) for m in metas], dtype=np.int64)
        counts[level] = c
        bases[level] = np.concatenate([[0], np.cumsum(c)])
    if pair_base is not None:
        bases["pairs"] = np.asarray(pair_base, dtype=np.int64)
    return bases, counts


def create_arrays(path, specs: dict[str, ArraySpec], totals: dict[str, int]) -> None:
    """Create every assembled array with its exact shape (replacing any from a killed
    assembly); the directly written arrays already exist."""
    import zarr

    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        for level in ("structures", "atoms", "pairs"):
            if any(s.level == level for s in specs.values()) and level not in root:
                root.create_group(level)
        for spec in specs.values():
            if spec.path in DIRECT:
                continue
            n = int(totals[spec.level])
            root.create_array(
                spec.path, shape=(n,) + spec.trailing,
                chunks=(spec.chunk_rows(n),) + spec.trailing,
                dtype=str if spec.is_str else spec.dtype, fill_value=spec.fill,
                compressors=codecs_for(spec), overwrite=True,
                dimension_names=[spec.level] + [f"dim{i + 1}" for i in range(len(spec.trailing))])


def assembly_jobs(specs: dict[str, ArraySpec], totals: dict[str, int]) -> list[tuple[str, int, int]]:
    """Disjoint (array path, row start, row stop) ranges, each a whole number of chunks."""
    jobs = []
    for spec in specs.values():
        if spec.path in DIRECT:
            continue
        n = int(totals[spec.level])
        if n == 0:
            continue
        rows = spec.chunk_rows(n)
        per_job = rows * max(1, ASSEMBLY_JOB_BYTES // max(1, rows * spec.row_bytes()))
        for r0 in range(0, n, per_job):
            jobs.append((spec.path, r0, min(n, r0 + per_job)))
    return jobs


def _staged_rows(path, task: int, spec: ArraySpec, bases: dict[str, np.ndarray]) -> np.ndarray:
    d = task_dir(path, task)
    if spec.path == "structures/atom_start":
        counts = np.load(d / _file("structures/n_atoms"))
        return bases["atoms"][task] + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if spec.path == "atoms/pair_start":
        counts = np.load(d / _file("atoms/pair_count"))
        return bases["pairs"][task] + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return np.load(d / _file(spec.path), mmap_mode=None if spec.is_str else "r")


def assemble_rows(path, spec: ArraySpec, r0: int, r1: int, bases: dict[str, np.ndarray],
                  counts: dict[str, np.ndarray]) -> int:
    """Write rows ``[r0, r1)`` of one array from the staged tasks that cover them.

    ``r0`` is a chunk boundary and ``r1`` a chunk boundary or the end of the array, so this job
    is the only writer of the chunks it touches.  Rows no task covers (the unused end of a
    task's pair region) get the fill value.  Returns the number of bytes written (uncompressed).
    """
    import zarr

    b, c = bases[spec.level], counts[spec.level]
    first = max(int(np.searchsorted(b, r0, side="right")) - 1, 0)
    last = min(int(np.searchsorted(b, r1, side="left")), len(c))
    parts = []
    for t in range(first, last):
        lo, hi = max(r0, int(b[t])), min(r1, int(b[t] + c[t]))
        if hi > lo:
            rows = _staged_rows(path, t, spec, bases)
            parts.append((lo, np.asarray(rows[lo - int(b[t]):hi - int(b[t])])))
    covered = sum(p.shape[0] for _, p in parts)
    if spec.level != "pairs" and covered != r1 - r0:
        raise StoreError(f"staged rows of {spec.path} [{r0}, {r1}) are incomplete "
                         f"({covered} rows found)")
    if len(parts) == 1 and covered == r1 - r0:
        block = parts[0][1]
    else:
        block = spec.empty(r1 - r0)
        for lo, p in parts:
            block[lo - r0:lo - r0 + p.shape[0]] = p
    if spec.is_str:
        block = block.astype(object)
    with quiet_zarr():
        arr = zarr.open_array(str(Path(path) / spec.path), mode="r+")
        arr[r0:r1] = block
    return int(block.nbytes)


# -- phase 4: finalize -----------------------------------------------------------------------------

def finalize(path, attrs_update: dict) -> None:
    """Mark the store complete, consolidate metadata (once), and remove the staging area."""
    import zarr

    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        root.attrs.update({**attrs_update, "complete": True,
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        zarr.consolidate_metadata(str(path))
    shutil.rmtree(staging_dir(path), ignore_errors=True)


def base_attrs(*, feature_config: dict, feature_list, source: dict, options: dict,
               units: dict, schema: dict, parts: dict, version: str) -> dict:
    from .layout import extras_map

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "gmp_pipeline_version": version,
        "fingerprint": fingerprint(parts),
        "fingerprint_parts": parts,
        "feature_config": feature_config,
        "feature_list": [[int(o), float(s)] for o, s in feature_list],
        "source": source,
        "options": options,
        "units": units,
        "extras": extras_map(schema),
        "schema": {"has_energy": bool(schema.get("has_energy")),
                   "has_forces": bool(schema.get("has_forces"))},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


__all__ = ["prepare_store", "save_plan", "load_plan", "finished_tasks", "clean_partial_tasks",
           "collect_arrays", "write_staged", "load_metas", "task_layout", "create_arrays", "pair_capacities",
           "ensure_direct_arrays", "write_direct",
           "assembly_jobs", "assemble_rows", "finalize", "base_attrs", "read_root_attrs",
           "quiet_zarr"]
