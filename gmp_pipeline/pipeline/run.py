"""Featurize a source into a ``gmp-features`` store: the one execution path.

>>> from gmp_pipeline.readers import open_reader
>>> from gmp_pipeline.features import GMPFeaturizer
>>> from gmp_pipeline.pipeline import featurize_to_store
>>> reader = open_reader("md17", "ethanol.npz")                      # doctest: +SKIP
>>> featurize_to_store(reader, "ethanol.zarr", GMPFeaturizer(), client=client)  # doctest: +SKIP

The data flows one way: the reader's :class:`~gmp_pipeline.schema.Schema` lays out the store
(:func:`~gmp_pipeline.store.layout.array_specs`), the run is planned (:mod:`.plan`), each
planned range becomes a frozen :class:`~.tasks.TaskSpec` run by :func:`~.tasks.run_task` on an
executor (:mod:`.executors`: the Dask client, or this process), and the
:class:`~gmp_pipeline.store.writer.StoreWriter` assembles the staged results and finalizes the
store (see :mod:`gmp_pipeline.store.writer` for why this is race-free and resumable).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..config import knob
from ..errors import InputError, SourceError, StoreError
from ..schema import Schema
from ..store.layout import array_specs, root_attrs
from ..store.lock import store_lock
from ..store.staging import StagedTasks
from ..store.writer import StoreWriter, assemble_rows
from .counts import atom_counts
from .executors import InProcessExecutor, executor_for
from .plan import plan_tasks
from .tasks import TaskSpec, run_task, warm_worker

logger = logging.getLogger("gmp_pipeline.pipeline")


@dataclass
class RunSummary:
    """What :func:`featurize_to_store` did."""

    store: str
    state: str                      # "new", "resume" or "complete" (nothing to do)
    n_tasks: int = 0
    tasks_skipped: int = 0          # already staged by an earlier (interrupted) run
    tasks_computed: int = 0
    n_structures: int = 0
    n_atoms: int = 0
    n_pairs: int = 0
    plan_seconds: float = 0.0       # counting atoms (when the source has no size table) and
                                    # planning; 0 when the plan of an interrupted run is reused
    count_source: str = ""          # where the atom counts came from: "table" (the reader's
                                    # size table), "counted" (on the executor), "cache" (saved
                                    # in the store by an interrupted run), "" (plan reused)
    warmup_seconds: float = 0.0     # compiling / loading the kernels on the workers
    compute_seconds: float = 0.0    # wall time of the featurization phase (this run)
    assemble_seconds: float = 0.0
    seconds: float = 0.0
    structures_computed: int = 0    # structures featurized by this run
    atoms_computed: int = 0
    skipped_records: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def counted(n: int, word: str) -> str:
    """'1 task', '2 tasks' (for messages)."""
    return f"{n} {word}" if int(n) == 1 else f"{n} {word}s"


def reader_schema(reader) -> Schema:
    """The reader's :class:`Schema`, with the reader's units."""
    return Schema.coerce(reader.schema(), units=dict(getattr(reader, "units", {})))


DERIVATIVE_ATOMS = ("all", "free")


def store_attrs(reader, featurizer, *, derivatives: bool, dtype: str,
                derivative_atoms: str = "all") -> tuple[dict, Schema]:
    """(root attributes, schema) of the store this run writes."""
    from .. import __version__

    schema = reader_schema(reader)
    options = {"derivatives": bool(derivatives), "dtype": dtype}
    if derivative_atoms != "all":       # absent means "all" (stores written before the option)
        options["derivative_atoms"] = derivative_atoms
    attrs = root_attrs(feature_config=featurizer.config(), feature_list=featurizer.feature_list,
                       source=reader.describe(), options=options,
                       schema=schema, version=__version__,
                       source_paths=(reader.source_paths() if hasattr(reader, "source_paths")
                                     else [reader.path] if hasattr(reader, "path") else None))
    return attrs, schema


def _progress(total, initial, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="task", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def featurize_to_store(reader, store, featurizer, *, derivatives: bool = True,
                       dtype: str = "float32", derivative_atoms: str = "all",
                       client=None, chunk_size: int | None = None,
                       overwrite: bool = False, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> RunSummary:
    """Featurize every structure of ``reader`` into the Zarr store at ``store``.

    ``client``: a :class:`distributed.Client`; ``None`` runs every task in this process (the
    serial reference).  An existing store with the same fingerprint is resumed (only missing
    tasks are computed); one with a different fingerprint raises :class:`StoreError` unless
    ``overwrite``.  A second run on the same store while this one holds it raises
    :class:`StoreError` (see :func:`~gmp_pipeline.store.lock.store_lock`).  ``log``: where the
    run's messages go (default: logger ``gmp_pipeline.pipeline`` at INFO).  Returns a
    :class:`RunSummary`.
    """
    log = log or logger.info
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    check_derivative_atoms(derivative_atoms, derivatives, reader)
    check_source(reader, featurizer)
    store = os.path.abspath(os.fspath(store))
    with store_lock(store, log):
        return _run(reader, store, featurizer, derivatives, dtype, executor_for(client),
                    chunk_size, overwrite, progress, log, derivative_atoms)


def check_source(reader, featurizer=None) -> int:
    """The number of structures of ``reader``, after refusing what needs no cluster to see: an
    empty source, and (when the reader knows its elements cheaply, :meth:`Reader.elements`) an
    element the featurizer's pseudopotential lacks.  Otherwise a record with such an element is
    a bad record of its task (skipped with ``skip_bad_records``)."""
    n = len(reader)
    path = getattr(reader, "path", "?")
    if n == 0:
        raise SourceError(f"the {getattr(reader, 'name', 'source')} source holds no structures "
                          "(nothing to featurize)", path=path)
    elements = reader.elements() if hasattr(reader, "elements") else None
    if featurizer is not None and elements:
        from ..readers.base import missing_elements_text

        missing = sorted(int(z) for z in elements if not featurizer.psp.has(int(z)))
        if missing:
            msg = missing_elements_text(missing, f"psp file {featurizer.psp.path}")
            if not getattr(reader, "skip_bad_records", False):
                raise SourceError(msg + " (choose another psp in the feature file, "
                                  "or --skip-bad-records to skip the records holding it)",
                                  path=path)
            logger.warning("%s: %s; the records holding it will be skipped", path, msg)
    return n


def check_derivative_atoms(derivative_atoms: str, derivatives: bool, reader) -> None:
    """Refuse a ``derivative_atoms`` the run cannot honour, before anything is written."""
    if derivative_atoms not in DERIVATIVE_ATOMS:
        raise InputError(f"derivative_atoms must be one of {', '.join(DERIVATIVE_ATOMS)}, got "
                         f"{derivative_atoms!r}")
    if derivative_atoms == "free":
        if not derivatives:
            raise InputError("--derivative-atoms free needs derivatives (it was given with "
                             "--no-derivatives)")
        if "fixed" not in reader_schema(reader).atom_info:
            raise InputError(f"--derivative-atoms free needs a per-atom 'fixed' from the reader; "
                             f"the {getattr(reader, 'name', type(reader).__name__)} reader of "
                             f"{getattr(reader, 'path', '?')} gives none")


def _run(reader, store, featurizer, derivatives, dtype, executor, chunk_size, overwrite,
         progress, log, derivative_atoms="all") -> RunSummary:
    t_start = time.perf_counter()
    attrs, schema = store_attrs(reader, featurizer, derivatives=derivatives, dtype=dtype,
                                derivative_atoms=derivative_atoms)
    writer = StoreWriter(store, array_specs(featurizer.n_features, dtype, derivatives, schema),
                         attrs)
    state = writer.prepare(overwrite=overwrite)
    summary = RunSummary(store=store, state=state)
    if state == "complete":
        counts = writer.counts()
        summary.n_structures = counts.get("n_structures", 0)
        summary.n_atoms = counts.get("n_atoms", 0)
        summary.n_pairs = counts.get("n_pairs", 0)
        log(f"{store} is already complete with this configuration; nothing to do")
        return summary

    # plan (or reuse the plan of the interrupted run, so task ids keep their meaning)
    plan = writer.load_plan()
    if plan is None:
        t_plan = time.perf_counter()
        n_atoms, how = atom_counts(reader, store, executor, log=log,
                                   bar_factory=lambda n, desc: _progress(n, 0, desc, progress))
        summary.count_source = how["source"]
        if n_atoms.size != len(reader):
            raise StoreError(f"reader reports {len(reader)} structures but {n_atoms.size} "
                             "atom counts")
        plan = writer.save_plan(n_atoms, plan_tasks(n_atoms, n_workers=executor.n_workers,
                                                    chunk_size=chunk_size))
        del n_atoms
        summary.plan_seconds = time.perf_counter() - t_plan
    elif chunk_size is not None:
        log("resuming with the task plan of the interrupted run (--chunk-size is ignored)")
    writer.create_planned(plan)
    tasks = [tuple(t) for t in plan["tasks"]]
    todo = writer.pending_tasks(plan)
    summary.n_tasks = len(tasks)
    summary.tasks_skipped = len(tasks) - len(todo)
    if state == "resume":
        log(f"resuming {store}: {summary.tasks_skipped} of {counted(len(tasks), 'task')} "
            f"already done, computing {len(todo)}")
    else:
        log(f"planned {counted(len(tasks), 'task')} over "
            f"{counted(plan['n_structures'], 'structure')} ({counted(plan['n_atoms'], 'atom')})")

    # stage: one frozen spec per task (made as the executor asks for it: a run of a million
    # tasks keeps no list of them), run wherever the executor runs things
    config = featurizer.config()
    pair_base = writer.pair_base(plan)

    def spec(t: int) -> TaskSpec:
        return TaskSpec(store=store, task=t, start=tasks[t][0], stop=tasks[t][1], reader=None,
                        feature_config=config, derivatives=derivatives, dtype=dtype,
                        schema=schema, pair_base=pair_base[t],
                        pair_capacity=pair_base[t + 1] - pair_base[t],
                        derivative_atoms=derivative_atoms)

    t0 = time.perf_counter()
    done = _compute(todo, spec, reader, executor, len(tasks), progress, summary)
    summary.compute_seconds = time.perf_counter() - t0 - summary.warmup_seconds
    if done["stages"]:
        log("worker time summed over tasks: " + ", ".join(f"{k} {v:.2f} s"
                                                         for k, v in done["stages"].items()))
    summary.tasks_computed = done["tasks"]
    summary.structures_computed = done["structures"]
    summary.atoms_computed = done["atoms"]

    # assemble: small stores in this process's threads (a Dask round trip per job would cost
    # more than the work), large ones on the executor
    t1 = time.perf_counter()
    asm = writer.assembly(plan)
    n_kept = sum(int(m["n_structures"]) for m in asm.metas)
    if n_kept == 0:      # never finalize a 0-structure store as complete
        raise SourceError(f"every one of the {counted(plan['n_structures'], 'record')} was "
                          f"skipped as bad (first: {(asm.skipped() or [(0, '?')])[0][1]}); "
                          "no store was finalized", path=getattr(reader, "path", "?"))
    if executor.in_process or asm.nbytes <= int(knob("pipeline.local-assembly-bytes")):
        executor = InProcessExecutor(threads=int(knob("pipeline.local-assembly-threads")))
    staged = StagedTasks(store, cache=True) if executor.in_process else None  # each file read once
    bar = _progress(len(asm.jobs), 0, "assemble", progress and len(asm.jobs) > 1)
    try:
        for _ in executor.map_unordered(assemble_rows, [asm.job_args(j, staged) for j in asm.jobs],
                                        name="assemble"):
            bar.update(1)
    finally:
        bar.close()
    summary.assemble_seconds = time.perf_counter() - t1

    counts = writer.finalize(asm)
    summary.n_structures, summary.n_atoms, summary.n_pairs = (
        counts["n_structures"], counts["n_atoms"], counts["n_pairs"])
    summary.skipped_records = [list(x) for x in asm.skipped()]
    summary.seconds = time.perf_counter() - t_start
    return summary


def _compute(todo: list[int], spec: Callable[[int], TaskSpec], reader, executor, n_tasks: int,
             progress, summary) -> dict:
    """Run the tasks ``todo`` (``spec(t)`` makes the spec of task t); what they did, summed
    (the tasks' metas are on disk, in the staging area: none is kept here)."""
    done = {"tasks": 0, "structures": 0, "atoms": 0, "stages": {}}
    if not todo:
        return done
    t_warm = time.perf_counter()
    first = spec(todo[0])
    executor.run_everywhere(warm_worker, first.feature_config, reader, first.start,
                            first.derivatives)
    summary.warmup_seconds = time.perf_counter() - t_warm
    shared = executor.share(reader, name="reader")   # pickled once, not into every task
    bar = _progress(n_tasks, n_tasks - len(todo), "featurize", progress)
    t0 = time.perf_counter()
    stages = done["stages"]
    try:
        for meta in executor.map_unordered(run_task, ((spec(t), shared) for t in todo),
                                           name="task", ids=todo,
                                           priorities=[-t for t in todo]):
            done["tasks"] += 1
            done["structures"] += int(meta["n_structures"])
            done["atoms"] += int(meta["n_atoms"])
            for k, v in (meta.get("stage_seconds") or {}).items():
                stages[k] = stages.get(k, 0.0) + float(v)
            bar.update(1)
            rate = done["structures"] / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate:.1f} structures/s", refresh=False)
        return done
    finally:
        bar.close()
        del shared


__all__ = ["RunSummary", "check_source", "featurize_to_store", "store_attrs", "reader_schema"]
