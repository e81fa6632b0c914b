"""The atom count of every structure, for planning: cheap from a size table, else on the cluster.

A reader with a size table (fairchem's ``metadata.npz`` next to an OC20 LMDB, the arrays of an
MD17 npz, an ASE database's ``natoms`` column, the QM9 index) answers
:meth:`~gmp_pipeline.readers.base.Reader.cheap_n_atoms` directly.  A source without one (a
legacy OC20 LMDB as downloaded, an ``.aselmdb``) has to decode every record to count its atoms:
0.3 ms a record, hours at 100 M records if the driver did it.  Here that work is cut into
ranges of records and fanned out over the run's executor, where each task calls
:meth:`~gmp_pipeline.readers.base.Reader.n_atoms_range` and saves its counts in the store's
staging area (``_staging/counts/``), so an interrupted run that is resumed counts only the
ranges not saved yet.  Once every range is in, the counts are joined into
``_staging/n_atoms.npy`` (kept until the store is finalized).

Only the driver reads the joined file; the tasks return nothing but their range, so the driver
never holds more than the one ``(n,)`` array of counts.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import StoreError
from ..store.staging import staging_dir

logger = logging.getLogger("gmp_pipeline.pipeline")

#: the joined counts of every structure, in the store's staging area
COUNTS_FILE = "n_atoms.npy"
#: the saved ranges of an unfinished count
COUNTS_DIR = "counts"
#: most records one counting task decodes (config ``gmp-pipeline.pipeline.count-task-records``)
COUNT_TASK_RECORDS = 20_000
#: fewest records of a counting task (a Dask round trip costs more than a few records)
MIN_COUNT_TASK_RECORDS = 500


def counts_path(store) -> Path:
    return staging_dir(store) / COUNTS_FILE


def _range_file(store, start: int, stop: int) -> Path:
    return staging_dir(store) / COUNTS_DIR / f"r{start:012d}-{stop:012d}.npy"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``arr`` saved at ``path`` under a temporary name, renamed into place (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)


def _load_counts(path: Path, n: int) -> np.ndarray | None:
    """The counts saved at ``path`` if they are ``n`` non-negative integers, else None."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.shape != (n,) or arr.dtype.kind not in "iu" or (n and int(arr.min()) < 0):
        return None
    return arr.astype(np.int64, copy=False)


def count_range(reader, store: str, start: int, stop: int) -> tuple[int, int, int]:
    """Count the atoms of records ``[start, stop)`` (on a worker) and save them in the store's
    staging area; returns ``(start, stop, atoms)``.  A range saved by an earlier run is not
    counted again."""
    from .tasks import task_reader

    reader = task_reader(reader)   # shared by the tasks of a process: a copy of its own
    path = _range_file(store, start, stop)
    done = _load_counts(path, stop - start)
    if done is not None:
        return start, stop, int(done.sum())
    counts = np.asarray(reader.n_atoms_range(start, stop))
    if counts.shape != (stop - start,):
        raise StoreError(f"the reader counted {counts.shape} atom counts for records "
                         f"[{start}, {stop}) of {getattr(reader, 'path', '?')}")
    counts = counts.astype(np.int32 if counts.size == 0 or counts.max() < 2**31 else np.int64)
    _save_npy(path, counts)
    return start, stop, int(counts.sum(dtype=np.int64))


def count_ranges(n: int, n_workers: int, per_task: int | None = None) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ranges for counting: at most ``per_task`` records each (default
    :data:`COUNT_TASK_RECORDS`), and at least four ranges per worker while each keeps
    :data:`MIN_COUNT_TASK_RECORDS`."""
    if per_task is None:
        import dask

        per_task = int(dask.config.get("gmp-pipeline.pipeline.count-task-records",
                                       COUNT_TASK_RECORDS))
    per_task = max(1, int(per_task))
    size = min(per_task, max(MIN_COUNT_TASK_RECORDS, math.ceil(n / max(1, 4 * n_workers))))
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def atom_counts(reader, store: str, executor, *, progress: bool = False,
                log: Callable[[str], None] | None = None,
                bar_factory=None) -> tuple[np.ndarray, dict]:
    """``(counts, info)``: the ``(len(reader),)`` int64 atom counts and how they were obtained
    (``info["source"]``: ``"table"`` (the reader's size table), ``"cache"`` (counted by an
    earlier run of this store) or ``"counted"`` (now, on ``executor``); ``info["seconds"]``,
    ``info["tasks"]``, ``info["ranges_reused"]``)."""
    log = log or logger.info
    t0 = time.perf_counter()
    n = len(reader)
    cheap = reader.cheap_n_atoms() if hasattr(reader, "cheap_n_atoms") else reader.n_atoms()
    if cheap is not None:
        return np.asarray(cheap, dtype=np.int64), {"source": "table",
                                                   "seconds": time.perf_counter() - t0}
    final = counts_path(store)
    cached = _load_counts(final, n)
    if cached is not None:
        log(f"atom counts of the {n} records taken from {final} (counted by an earlier run)")
        return cached, {"source": "cache", "seconds": time.perf_counter() - t0}
    ranges = count_ranges(n, executor.n_workers)
    reused = sum(1 for a, b in ranges if _range_file(store, a, b).is_file())
    where = "in this process" if executor.in_process else f"on {executor.n_workers} workers"
    log(f"counting the atoms of {n} records {where} (the source has no size table): "
        f"{len(ranges)} task{'' if len(ranges) == 1 else 's'}"
        + (f", {reused} already counted by an earlier run" if reused else ""))
    bar = bar_factory(len(ranges), "count atoms") if bar_factory else None
    try:
        shared = executor.share(reader, name="reader")
        for _ in executor.map_unordered(count_range, [(shared, store, a, b) for a, b in ranges],
                                        name="count"):
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    counts = np.empty(n, dtype=np.int64)
    for a, b in ranges:
        part = _load_counts(_range_file(store, a, b), b - a)
        if part is None:
            raise StoreError(f"the atom counts of records [{a}, {b}) were not saved in "
                             f"{staging_dir(store) / COUNTS_DIR}")
        counts[a:b] = part
    _save_npy(final, counts)
    shutil.rmtree(staging_dir(store) / COUNTS_DIR, ignore_errors=True)
    seconds = time.perf_counter() - t0
    log(f"counted {int(counts.sum())} atoms in {n} records in {seconds:.1f} s; saved in {final}")
    return counts, {"source": "counted", "seconds": seconds, "tasks": len(ranges),
                    "ranges_reused": reused}


__all__ = ["atom_counts", "count_range", "count_ranges", "counts_path", "COUNTS_FILE"]
