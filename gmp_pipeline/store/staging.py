"""The staging area of a store being written: the plan, and what each task leaves behind.

``_staging/plan.json`` holds the task plan.  Each task (:func:`gmp_pipeline.pipeline.tasks.run_task`)
builds its arrays with a :class:`TaskCollector`, streams its ``pairs/dfeatures`` rows into its
own region of whole shards with a :class:`PairStream`, and saves the rest with
:func:`write_staged` into its own directory ``_staging/tasks/t0000012``: an uncompressed
``arrays.npz`` (read back memory-mapped by :class:`StagedTasks`, through the same
:class:`~gmp_pipeline.npzfile.NpzArrays` the MD17 readers use) and ``meta.json`` (the task's
counts, timings and skipped records).  The directory is written under a temporary name and
renamed into place, so its existence marks the task done.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

from ..errors import SourceError, StoreError
from ..schema import Schema
from .layout import DIRECT, STAGING_DIR, ArraySpec, extra_path

#: the staged arrays of a task: one uncompressed npz (``meta.json`` beside it)
STAGED_FILE = "arrays.npz"


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)



def staging_dir(path) -> Path:
    """``path/_staging``: the plan and the tasks' results of a run that has not finished."""
    return Path(path) / STAGING_DIR


def task_dir(path, task: int) -> Path:
    return staging_dir(path) / "tasks" / f"t{task:07d}"



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



def free_atoms(s) -> np.ndarray:
    """(n,) bool: the atoms of structure ``s`` whose per-atom ``fixed`` is 0 (for
    ``--derivative-atoms free``)."""
    fixed = s.atom_info.get("fixed")
    if fixed is None:
        raise StoreError(f"derivative_atoms='free' needs a per-atom 'fixed' for every structure; "
                         f"source index {s.source_index} has none")
    fixed = np.asarray(fixed).reshape(-1)
    if fixed.shape[0] != len(s):
        raise StoreError(f"per-atom 'fixed' of source index {s.source_index} has "
                         f"{fixed.shape[0]} values for {len(s)} atoms")
    return fixed == 0


class TaskCollector:
    """The staged arrays of one task, built structure by structure.

    ``pairs`` (a :class:`PairStream`, with derivatives) takes each structure's ``dfeatures``
    rows as they come, so a task never holds all of its derivative blocks at once.
    """

    def __init__(self, specs: dict[str, ArraySpec], schema: Schema, derivatives: bool,
                 n_atoms: int, pairs: "PairStream | None" = None,
                 derivative_atoms: str = "all"):
        schema = Schema.coerce(schema)
        self.specs = specs
        self.derivatives = derivatives
        #: "free": keep only the pairs (i, j) whose neighbour j is free (per-atom fixed == 0)
        self.free_only = derivative_atoms == "free"
        self.pairs = pairs
        self.n_features = specs["atoms/features"].trailing[0]
        self.out: dict[str, list] = {p: [] for p in specs}
        fspec = specs["atoms/features"]
        self.features = np.empty((int(n_atoms),) + fspec.trailing, dtype=fspec.dtype)
        self.n_atoms = 0
        self.n_pairs = 0
        self.info_map = {name: extra_path("structures", name) for name in schema.info}
        self.atom_map = {name: extra_path("atoms", name) for name in schema.atom_info}

    def add(self, s, r) -> None:
        """Add structure ``s`` (a :class:`~gmp_pipeline.structure.Structure`) and its result."""
        out, specs = self.out, self.specs
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
        if feats.shape != (n, self.n_features):
            raise StoreError(f"featurizer returned features of shape {feats.shape} for a "
                             f"structure of {n} atoms (source index {s.source_index})")
        if self.n_atoms + n > self.features.shape[0]:
            raise StoreError(f"task has more atoms than the {self.features.shape[0]} planned "
                             f"(source index {s.source_index})")
        self.features[self.n_atoms:self.n_atoms + n] = feats
        self.n_atoms += n
        for name, p in self.info_map.items():
            value = s.info.get(name, specs[p].fill)
            out[p].append(np.array([value], dtype=object if specs[p].is_str else specs[p].dtype))
        for name, p in self.atom_map.items():
            value = s.atom_info.get(name)
            spec = specs[p]
            if value is None:
                value = spec.empty(n)
            value = np.asarray(value)
            if value.shape != (n,) + spec.trailing:
                if value.size != n * int(np.prod(spec.trailing, dtype=np.int64)):
                    raise StoreError(f"per-atom extra {name!r} of source index {s.source_index} "
                                     f"has shape {value.shape}; the schema declares "
                                     f"{(n,) + spec.trailing} for its {n} atoms")
                value = value.reshape((n,) + spec.trailing)
            out[p].append(value)
        if self.derivatives:
            pc = np.asarray(r.pair_center, dtype=np.int64)
            pn = np.asarray(r.pair_neighbor)
            df = np.asarray(r.dfeatures)
            if pc.size > 1 and np.any(np.diff(pc) < 0):
                order = np.lexsort((pn, pc))
                pc, pn, df = pc[order], pn[order], df[order]
            if self.free_only:
                keep = free_atoms(s)[pn]
                if not keep.all():
                    pc, pn, df = pc[keep], pn[keep], df[keep]
            out["atoms/pair_count"].append(np.bincount(pc, minlength=n).astype(np.int64))
            out["pairs/neighbor"].append(pn.astype(np.int32))
            self.pairs.append(df)
            self.n_pairs += pc.shape[0]

    def finish(self) -> dict[str, np.ndarray]:
        """The task's arrays to stage (everything but ``pairs/dfeatures``)."""
        arrays = {"atoms/features": self.features[:self.n_atoms]}
        for p, parts in self.out.items():
            spec = self.specs[p]
            if p in ("structures/atom_start", "atoms/pair_start", "atoms/features") or p in DIRECT:
                continue  # derived from the counts at assembly time, or filled above
            a = np.concatenate(parts, axis=0) if parts else spec.empty(0)
            if spec.is_str:
                a = np.asarray([str(x) for x in a.reshape(-1)], dtype=str)
                if a.size == 0:
                    a = np.zeros(0, dtype="<U1")
            else:
                a = np.ascontiguousarray(a, dtype=spec.dtype).reshape((-1,) + spec.trailing)
            arrays[p] = a
        return arrays



def write_staged(path, task: int, arrays: dict[str, np.ndarray], meta: dict) -> bool:
    """Save one task's arrays in its own directory; False if another run already saved it.

    The arrays go into one uncompressed npz (``arrays.npz``, members named by array path with
    ``/`` as ``.``) and ``meta.json`` records the task's counts and timings: one file to write
    and read per task instead of one per array.
    """
    final = task_dir(path, task)
    if (final / "meta.json").is_file():
        return False
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(tmp / STAGED_FILE, "w", compression=zipfile.ZIP_STORED,
                             allowZip64=True) as zf:
            for p, a in arrays.items():
                a = np.ascontiguousarray(a)
                if a.dtype.hasobject:
                    raise StoreError(f"staged array {p} has dtype object")
                with zf.open(_member(p) + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, a, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({**meta, "staged": sorted(arrays)},
                                                  default=str))
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


def _member(array_path: str) -> str:
    return array_path.replace("/", ".")


class StagedTasks:
    """Reads the staged arrays of a store's tasks (one ``arrays.npz`` per task, memory-mapped).

    ``cache=True`` keeps every task opened (for assembly in one process, where each task's file
    is then opened once rather than once per array).
    """

    def __init__(self, path, cache: bool = False):
        self.path = path
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        self._lock = threading.Lock()   # threads sharing a cache open each task once

    def arrays(self, task: int) -> dict[str, np.ndarray]:
        if self._cache is None:
            return self._load(task)
        with self._lock:
            if task not in self._cache:
                self._cache[task] = self._load(task)
            return self._cache[task]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self, task: int) -> dict[str, np.ndarray]:
        from ..npzfile import NpzArrays

        d = task_dir(self.path, task)
        try:
            names = json.loads((d / "meta.json").read_text())["staged"]
            npz = NpzArrays(d / STAGED_FILE)
            try:
                return {p: npz.array(_member(p)) for p in names}
            finally:
                npz.close()
        except (OSError, ValueError, KeyError, TypeError, SourceError) as exc:
            raise StoreError(f"staged result of task {task} in {d} is unreadable or truncated "
                             f"({exc}); remove that directory and rerun to recompute the "
                             "task") from exc

    def rows(self, task: int, spec: ArraySpec, bases: dict[str, np.ndarray]) -> np.ndarray:
        """The staged rows of ``spec`` for ``task`` (offsets made global where needed)."""
        a = self.arrays(task)
        if spec.path == "structures/atom_start":
            return bases["atoms"][task] + _exclusive_cumsum(a["structures/n_atoms"])
        if spec.path == "atoms/pair_start":
            return bases["pairs"][task] + _exclusive_cumsum(a["atoms/pair_count"])
        return a[spec.path]


def _exclusive_cumsum(counts) -> np.ndarray:
    out = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=out[1:])
    return out


class PairStream:
    """A task's ``pairs/dfeatures`` rows, written into its reserved region as they come.

    The region starts on a shard boundary and spans whole shards, so the task is the only
    writer of those shard files.  Rows go to a :class:`~.chunks.ShardStream`, which encodes
    every inner chunk as soon as it is full and appends it to its shard file, so the derivative
    blocks stay in cache between the kernel and the file and the task holds one chunk, not a
    shard.  ``close()`` writes the last, partly filled chunk and the shard's index (the rest of
    the region is fill value: no chunk, and no file for a shard the task does not reach).
    """

    def __init__(self, path, spec: ArraySpec, base: int, capacity: int):
        from .chunks import open_direct  # noqa: PLC0415  (imports numcodecs)

        self.label = f"{spec.path} of {path}"
        self.array_path = Path(path) / spec.path
        self.base, self.capacity = int(base), int(capacity)
        self.spec = spec
        self.direct = open_direct(self.array_path)
        if self.direct is None:
            raise StoreError(f"{self.label}: a text array; cannot stream into it")
        self.rows = self.direct.rows
        if self.base % self.rows:
            raise StoreError(f"{self.label}: region start {self.base} is not shard-aligned "
                             f"({self.rows} rows per shard)")
        self.stream = self.direct.stream(self.base) if capacity else None
        self.seconds = 0.0    # time spent encoding and writing

    @property
    def n_rows(self) -> int:
        return self.stream.row - self.base if self.stream is not None else 0

    def append(self, block) -> None:
        block = np.asarray(block)
        n = block.shape[0]
        if self.n_rows + n > self.capacity:
            raise StoreError(f"{self.label}: more than the {self.capacity} rows reserved")
        if not n:
            return
        t = time.perf_counter()
        self.stream.append(block)      # cast to the store dtype chunk by chunk
        self.seconds += time.perf_counter() - t

    def close(self) -> int:
        """Write what is left; returns the number of rows written."""
        if self.stream is None:
            return 0
        t = time.perf_counter()
        n = self.n_rows
        self.stream.close()
        self.seconds += time.perf_counter() - t
        return n



def load_metas(path, n_tasks: int) -> list[dict]:
    metas = []
    for t in range(n_tasks):
        f = task_dir(path, t) / "meta.json"
        if not f.is_file():
            raise StoreError(f"task {t} of {path} has no staged result; cannot assemble")
        metas.append(json.loads(f.read_text()))
    return metas


__all__ = ["STAGED_FILE", "staging_dir", "task_dir", "save_plan", "load_plan", "finished_tasks",
           "clean_partial_tasks", "TaskCollector", "PairStream", "write_staged", "StagedTasks",
           "load_metas"]
