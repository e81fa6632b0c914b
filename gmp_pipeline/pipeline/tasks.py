"""What runs on a worker: one frozen :class:`TaskSpec` in, its staged arrays and ``meta`` out.

A task reads its own slice of the source (the reader is shipped to each worker once, beside the
specs), featurizes each structure, streams the ``pairs/dfeatures`` rows into its reserved region
of the store and stages everything else in its own directory (:mod:`gmp_pipeline.store.staging`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..schema import Schema
from ..store.layout import ArraySpec, array_specs, codecs_for, quiet_zarr
from ..store.staging import PairStream, TaskCollector, write_staged


@dataclass(frozen=True)
class TaskSpec:
    """Everything one task needs, shipped to the worker as one object.

    ``store``: absolute path; ``task``: its id in the plan; ``[start, stop)``: structure range;
    ``reader``: the source reader, or None when the run ships it to the workers once and
    passes it beside the spec (``run_task(spec, shared_reader)``: the pipeline does, since a
    reader pickled into every spec made the driver's memory grow with the source);
    ``feature_config``: ``GMPFeaturizer.config()``;
    ``pair_base`` / ``pair_capacity``: the chunk-aligned rows of ``pairs/dfeatures`` reserved
    for it (0 without derivatives); ``derivative_atoms``: ``"all"`` or ``"free"`` (only the
    pairs whose neighbour is a free atom are stored).
    """

    store: str
    task: int
    start: int
    stop: int
    reader: Any
    feature_config: dict
    derivatives: bool
    dtype: str
    schema: Schema
    pair_base: int = 0
    pair_capacity: int = 0
    derivative_atoms: str = "all"


_FEATURIZERS: dict[str, Any] = {}


def get_featurizer(config: dict):
    """The featurizer for ``config``, built once per process."""
    key = json.dumps(config, sort_keys=True, default=str)
    fz = _FEATURIZERS.get(key)
    if fz is None:
        from ..features import GMPFeaturizer

        fz = _FEATURIZERS[key] = GMPFeaturizer.from_config(config)
    return fz


def warm_worker(config: dict, reader=None, index: int | None = None,
                derivatives: bool = True) -> int:
    """Prepare this process for tasks (run on every worker before fanning out).

    Builds the featurizer and compiles its kernels (or loads them from numba's cache), imports
    zarr and runs its codecs once, and reads and featurizes structure ``index`` of ``reader``
    so that the reader's modules and every kernel specialisation the run needs are loaded
    before the first task is timed.
    """
    fz = get_featurizer(config)
    fz.warmup()
    _warm_zarr()
    if reader is not None and index is not None:
        for s in reader.read(index, index + 1):
            if (all(fz.psp.has(int(z)) for z in s.numbers) and np.all(np.isfinite(s.positions))
                    and np.all(np.isfinite(s.cell))):  # else the task reports the record
                fz.featurize(s, derivatives=derivatives)
    return os.getpid()


def _warm_zarr() -> None:
    import zarr
    from zarr.storage import MemoryStore

    with quiet_zarr():
        for spec in (ArraySpec("pairs/dfeatures", "float32", (3, 2)),
                     ArraySpec("atoms/features", "float32", (2,))):
            arr = zarr.create_array(MemoryStore(), shape=(64,) + spec.trailing,
                                    chunks=(16,) + spec.trailing, dtype=spec.dtype,
                                    compressors=codecs_for(spec))
            arr[:] = 1.0
            arr[:]


def task_reader(shared):
    """This task's own copy of a reader shared by the tasks of a process (the one the run
    shipped once, :meth:`~.executors.DaskExecutor.share`): the state a pickled copy would have
    (open handles and caches dropped, an empty ``skipped``), made without pickling, so tasks
    running in threads of one worker never share a file position or a list of skipped
    records, and the index the copy refers to stays shared."""
    reader = object.__new__(type(shared))
    reader.__setstate__(shared.__getstate__())
    reader.skipped = []
    return reader


def run_task(spec: TaskSpec, shared_reader=None) -> dict:
    """Featurize structures ``[spec.start, spec.stop)`` and stage them as task ``spec.task``.

    ``shared_reader``: the reader, when ``spec.reader`` is None (the run ships the reader to
    the workers once rather than inside every spec).

    ``pairs/dfeatures`` rows go straight into the store at ``[pair_base, pair_base +
    pair_capacity)``, the chunk-aligned region the plan reserved for this task; everything else
    is staged in the task's own directory, whose appearance marks the task done.  Returns the
    task's ``meta`` (counts, skipped records, timings).
    """
    t0 = time.perf_counter()
    started = time.time()
    reader = spec.reader if shared_reader is None else task_reader(shared_reader)
    start, stop = spec.start, spec.stop
    fz = get_featurizer(spec.feature_config)
    n_skipped_before = len(reader.skipped)
    structures = list(reader.read(start, stop))
    if hasattr(reader, "drop_missing_elements"):   # an element the psp lacks: a bad record
        structures = reader.drop_missing_elements(structures, fz.psp.has,
                                                  f"psp file {fz.psp.path}")
    if hasattr(reader, "drop_nonfinite"):          # NaN/inf positions or cell: a bad record
        structures = reader.drop_nonfinite(structures)
    t_read = time.perf_counter()
    specs = array_specs(fz.n_features, spec.dtype, spec.derivatives, spec.schema)
    pairs = (PairStream(spec.store, specs["pairs/dfeatures"], spec.pair_base, spec.pair_capacity)
             if spec.derivatives else None)
    collector = TaskCollector(specs, spec.schema, spec.derivatives,
                              sum(len(s) for s in structures), pairs, spec.derivative_atoms)
    t_feat = 0.0
    result = None
    for s in structures:
        t = time.perf_counter()
        result = fz.featurize(s, derivatives=spec.derivatives)
        t_feat += time.perf_counter() - t
        collector.add(s, result)
    del result
    arrays = collector.finish()
    if pairs is not None:
        pairs.close()
    t_done = time.perf_counter()
    skipped = [(int(i), str(m)) for i, m in reader.skipped[n_skipped_before:]
               if start <= int(i) < stop]
    meta = {"task": spec.task, "start": start, "stop": stop,
            "n_structures": len(structures),
            "n_atoms": collector.n_atoms, "n_pairs": collector.n_pairs,
            "skipped": skipped, "pid": os.getpid()}
    write_pairs = pairs.seconds if pairs is not None else 0.0
    meta["seconds"] = t_done - t0
    meta["interval"] = [started, time.time()]   # wall clock, for the run's timeline
    meta["stage_seconds"] = {"read": t_read - t0, "featurize": t_feat,
                             "collect": t_done - t_read - t_feat - write_pairs,
                             "write_pairs": write_pairs}
    if pairs is not None:
        meta["stage_seconds"]["encode_pairs"] = pairs.direct.encode_seconds
    write_staged(spec.store, spec.task, arrays, meta)
    return meta


__all__ = ["TaskSpec", "run_task", "warm_worker", "get_featurizer"]
