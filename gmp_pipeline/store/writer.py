"""Writing a store in race-free phases: plan, stage (per task), assemble (per chunk), finalize.

1. **Plan** (driver): the root group is created with ``complete: false``, the task plan
   (structure ranges balanced by atoms, and each task's chunk-aligned ``pairs/`` region) is
   saved in ``_staging/plan.json``, and every array is created with its planned shape.
2. **Stage** (one Dask task per planned range, ``pipeline.run_task``): the task streams its
   ``dfeatures`` rows into its own ``pairs/`` region (:class:`PairStream`) and saves its other
   arrays (:class:`TaskCollector`) in one file under its *own* directory
   ``_staging/tasks/t0000012``.  It writes into a temporary directory and renames it into place,
   so the directory exists only when complete: it is the task's completion marker.  Its
   ``meta.json`` holds the task's structure, atom and pair counts -- this is the pair-counting
   pass: pair counts are only known once the neighbour lists are built.
3. **Assemble** (jobs of whole output chunks, :func:`assemble_rows`): the global offsets of
   every task are prefix sums of the staged counts; an array whose final shape differs from the
   plan is re-created; each assembly job owns a disjoint, chunk-aligned row range of one array
   and is the only writer of those chunks.
4. **Finalize** (driver, :func:`finalize`): root attrs get ``complete: true`` and the counts,
   metadata is consolidated once, and ``_staging`` is removed.

No two concurrent writers ever touch the same file: staging directories and ``pairs/`` regions
are per task, assembly jobs own whole chunks, metadata is written only by the driver.  The final
layout depends only on the source and the configuration, not on which worker did what.
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
from .layout import (DIRECT, FORMAT_NAME, FORMAT_VERSION, STAGING_DIR, ArraySpec, codecs_for,
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


def lock_path(path) -> Path:
    """The lock file of the store at ``path``: a hidden file beside it (``.NAME.lock``), so
    that ``--overwrite`` can remove the store itself while the lock is held."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def store_lock(path, log=None):
    """Hold an exclusive lock on the store at ``path`` for one featurize run.

    A second run on the same store (by mistake: two shells, a resubmitted batch job) fails at
    once with :class:`StoreError` naming the process that holds it, instead of both writing
    the same staging area.  The lock is an ``flock`` on :func:`lock_path`; the system drops it
    when the holder dies, so a killed run never leaves a stale lock.  Where the file system
    has no locks (some network file systems) the run goes on without one, with a warning.
    """
    import socket

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    lp = lock_path(path)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the directory of {path}: {exc}") from exc
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {lp}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                   f"{holder.get('started', '?')}") if holder else "another process"
            raise StoreError(f"{path} is being written by another gmp-pipeline run ({who}); "
                             f"wait for it to finish or stop it (lock file {lp})") from None
        except OSError as exc:
            os.close(fd)
            if log:
                log(f"warning: cannot lock {lp} ({exc}); make sure no other run writes {path}")
            yield
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file as we locked it: take the new one
    try:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        yield
    finally:
        try:
            os.unlink(lp)
        except OSError:
            pass
        os.close(fd)


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

class TaskCollector:
    """The staged arrays of one task, built structure by structure.

    ``pairs`` (a :class:`PairStream`, with derivatives) takes each structure's ``dfeatures``
    rows as they come, so a task never holds all of its derivative blocks at once.
    """

    def __init__(self, specs: dict[str, ArraySpec], schema: dict, derivatives: bool,
                 n_atoms: int, pairs: "PairStream | None" = None):
        self.specs = specs
        self.derivatives = derivatives
        self.pairs = pairs
        self.n_features = specs["atoms/features"].trailing[0]
        self.out: dict[str, list] = {p: [] for p in specs}
        fspec = specs["atoms/features"]
        self.features = np.empty((int(n_atoms),) + fspec.trailing, dtype=fspec.dtype)
        self.n_atoms = 0
        self.n_pairs = 0
        self.info_map = _extra_paths(schema, "info", "structures")
        self.atom_map = _extra_paths(schema, "atom_info", "atoms")

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
            if value is None:
                value = specs[p].empty(n)
            out[p].append(np.asarray(value).reshape(n))
        if self.derivatives:
            pc = np.asarray(r.pair_center, dtype=np.int64)
            pn = np.asarray(r.pair_neighbor)
            df = np.asarray(r.dfeatures)
            if pc.size > 1 and np.any(np.diff(pc) < 0):
                order = np.lexsort((pn, pc))
                pc, pn, df = pc[order], pn[order], df[order]
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


def _extra_paths(schema, key, level):
    from .layout import extra_path

    return {name: extra_path(level, name) for name in sorted(schema.get(key) or {})}


#: the staged arrays of a task, back to back in one file (``meta.json`` holds the index)
STAGED_FILE = "arrays.bin"
_ALIGN = 64


def write_staged(path, task: int, arrays: dict[str, np.ndarray], meta: dict) -> bool:
    """Save one task's arrays in its own directory; False if another run already saved it.

    The arrays go back to back into one file (``arrays.bin``, each 64-byte aligned) and
    ``meta.json`` records each one's dtype, shape and offset under ``"staged"``: one file to
    write and read per task instead of one per array.
    """
    final = task_dir(path, task)
    if (final / "meta.json").is_file():
        return False
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        index = {}
        offset = 0
        with open(tmp / STAGED_FILE, "wb") as f:
            for p, a in arrays.items():
                a = np.ascontiguousarray(a)
                if a.dtype.hasobject:
                    raise StoreError(f"staged array {p} has dtype object")
                pad = -offset % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                index[p] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
                f.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
                offset += a.nbytes
        (tmp / "meta.json").write_text(json.dumps({**meta, "staged": index}, default=str))
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


class StagedTasks:
    """Reads the staged arrays of a store's tasks (one ``arrays.bin`` per task).

    ``cache=True`` keeps every task read (for assembly in one process, where each task's file
    is then read once rather than once per array); small files are read whole, large ones
    memory-mapped so a job needing a few rows does not read the rest.
    """

    MMAP_BYTES = 4 << 20

    def __init__(self, path, cache: bool = False):
        import threading

        self.path = path
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        self._lock = threading.Lock()   # threads sharing a cache read each task once

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
        import threading

        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self, task: int) -> dict[str, np.ndarray]:
        d = task_dir(self.path, task)
        try:
            index = json.loads((d / "meta.json").read_text())["staged"]
            f = d / STAGED_FILE
            size = f.stat().st_size
            blob = (np.memmap(f, dtype=np.uint8, mode="r") if size > self.MMAP_BYTES
                    else np.fromfile(f, dtype=np.uint8))
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"staged result of task {task} in {d} is unreadable: {exc}; "
                             "remove that directory and rerun to recompute the task") from exc
        out = {}
        for p, e in index.items():
            dt = np.dtype(e["dtype"])
            shape = tuple(e["shape"])
            n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            if e["offset"] + n > size:
                raise StoreError(f"staged result of task {task} in {d} is truncated ({p})")
            out[p] = blob[e["offset"]:e["offset"] + n].view(dt).reshape(shape)
        return out

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


class PairStream:
    """A task's ``pairs/dfeatures`` rows, written into its reserved region as they come.

    Rows are cast to the store dtype into a buffer of one chunk, which is encoded and written
    as soon as it is full (:mod:`.chunks`), so the derivative blocks stay in cache between the
    kernel and the file.  ``close()`` writes the last, partly filled chunk (the rest of it is
    fill value, as is every reserved chunk the task does not reach).
    """

    def __init__(self, path, spec: ArraySpec, base: int, capacity: int):
        from .chunks import open_direct

        self.label = f"{spec.path} of {path}"
        self.array_path = Path(path) / spec.path
        self.base, self.capacity = int(base), int(capacity)
        self.spec = spec
        self.direct = open_direct(self.array_path)
        if self.direct is None:
            raise StoreError(f"{self.label}: not a bytes + blosc array; cannot stream into it")
        self.rows = self.direct.rows
        if self.base % self.rows:
            raise StoreError(f"{self.label}: region start {self.base} is not chunk-aligned")
        self.buf = np.empty((self.rows,) + spec.trailing, dtype=spec.dtype) if capacity else None
        self.filled = 0       # rows in buf
        self.flushed = 0      # rows already written (whole chunks)
        self.seconds = 0.0    # time spent encoding and writing

    @property
    def n_rows(self) -> int:
        return self.flushed + self.filled

    def append(self, block) -> None:
        block = np.asarray(block)
        n = block.shape[0]
        if self.n_rows + n > self.capacity:
            raise StoreError(f"{self.label}: more than the {self.capacity} rows reserved")
        k = 0
        while k < n:
            take = min(self.rows - self.filled, n - k)
            self.buf[self.filled:self.filled + take] = block[k:k + take]
            self.filled += take
            k += take
            if self.filled == self.rows:
                self._flush()

    def _flush(self) -> None:
        t = time.perf_counter()
        self.buf[self.filled:] = self.spec.fill
        self.direct.write(self.base + self.flushed, self.buf)
        self.flushed += self.filled
        self.filled = 0
        self.seconds += time.perf_counter() - t

    def close(self) -> int:
        """Write what is left; returns the number of rows written."""
        if self.filled:
            self._flush()
        return self.flushed


def _write_rows(array_path: Path, r0: int, block: np.ndarray) -> None:
    """Rows ``[r0, r0 + len(block))`` of the array at ``array_path``, whose chunks from ``r0``
    to the end of the block's last chunk belong to the caller: encoded and written chunk by
    chunk where the array's codecs allow (:mod:`.chunks`), through Zarr otherwise."""
    from .chunks import open_direct

    direct = open_direct(array_path)
    if direct is not None:
        direct.write(r0, block)
        return
    import zarr

    with quiet_zarr():
        arr = zarr.open_array(str(array_path), mode="r+")
        arr[r0:r0 + block.shape[0]] = block


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


def _array_layout(array_path: Path):
    """(shape, chunk shape) of the Zarr v3 array at ``array_path``, or None if there is none."""
    try:
        meta = json.loads((array_path / "zarr.json").read_text())
        return (list(meta["shape"]), list(meta["chunk_grid"]["configuration"]["chunk_shape"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def create_arrays(path, specs: dict[str, ArraySpec], totals: dict[str, int]) -> None:
    """Create every assembled array with its exact shape; the directly written arrays already
    exist.  An array that already has that shape and chunking (created when the run was
    planned, or by an interrupted assembly whose chunks will all be written again) is kept;
    one with another shape (records were skipped) is replaced."""
    import zarr

    wanted = {}
    for spec in specs.values():
        if spec.path in DIRECT:
            continue
        n = int(totals[spec.level])
        layout_ = [[n, *spec.trailing], [spec.chunk_rows(n), *spec.trailing]]
        if _array_layout(Path(path) / spec.path) != tuple(layout_):
            wanted[spec.path] = n
    if not wanted:
        return
    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        for level in ("structures", "atoms", "pairs"):
            if any(s.level == level for s in specs.values()) and level not in root:
                root.create_group(level)
        for spec in specs.values():
            if spec.path not in wanted:
                continue
            n = wanted[spec.path]
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


def assemble_rows(path, spec: ArraySpec, r0: int, r1: int, bases: dict[str, np.ndarray],
                  counts: dict[str, np.ndarray], staged: StagedTasks | None = None) -> int:
    """Write rows ``[r0, r1)`` of one array from the staged tasks that cover them.

    ``r0`` is a chunk boundary and ``r1`` a chunk boundary or the end of the array, so this job
    is the only writer of the chunks it touches.  Rows no task covers (the unused end of a
    task's pair region) get the fill value.  Returns the number of bytes written (uncompressed).
    ``staged``: where to read the tasks' staged arrays (default: a fresh, uncached reader).
    """
    staged = staged or StagedTasks(path)
    b, c = bases[spec.level], counts[spec.level]
    first = max(int(np.searchsorted(b, r0, side="right")) - 1, 0)
    last = min(int(np.searchsorted(b, r1, side="left")), len(c))
    parts = []
    for t in range(first, last):
        lo, hi = max(r0, int(b[t])), min(r1, int(b[t] + c[t]))
        if hi > lo:
            rows = staged.rows(t, spec, bases)
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
    _write_rows(Path(path) / spec.path, r0, block)
    return int(block.nbytes)


# -- phase 4: finalize -----------------------------------------------------------------------------

def write_skipped(path, skipped: list[tuple[int, str]]) -> None:
    """Every record skipped as bad, as arrays ``skipped/source_index`` (int64) and
    ``skipped/message`` (text), in source order (the root attributes list only the first
    1000).  Written by the driver before :func:`finalize`; nothing when no record was skipped."""
    import zarr

    if not skipped:
        return
    idx = np.array([int(i) for i, _ in skipped], dtype=np.int64)
    msg = np.array([str(m) for _, m in skipped], dtype=object)
    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        g = root.require_group("skipped")
        for name, data, dt, spec in (
                ("source_index", idx, "int64", ArraySpec("skipped/source_index", "int64")),
                ("message", msg, str, ArraySpec("skipped/message", "str", fill=""))):
            arr = g.create_array(name, shape=data.shape, chunks=(max(1, len(data)),), dtype=dt,
                                 compressors=codecs_for(spec), overwrite=True,
                                 dimension_names=["skipped"])
            arr[:] = data


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


__all__ = ["store_lock", "lock_path", "prepare_store", "save_plan", "load_plan", "finished_tasks", "clean_partial_tasks",
           "TaskCollector", "PairStream", "write_staged", "StagedTasks", "load_metas", "task_layout", "create_arrays", "pair_capacities",
           "ensure_direct_arrays",
           "assembly_jobs", "assemble_rows", "write_skipped", "finalize", "base_attrs", "read_root_attrs",
           "quiet_zarr"]
