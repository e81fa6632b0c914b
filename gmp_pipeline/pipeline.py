"""Featurize a source into a ``gmp-features`` store, on a Dask cluster or in-process.

>>> from gmp_pipeline.readers import open_reader
>>> from gmp_pipeline.features import GMPFeaturizer
>>> from gmp_pipeline.pipeline import featurize_to_store
>>> reader = open_reader("md17", "ethanol.npz")                      # doctest: +SKIP
>>> featurize_to_store(reader, "ethanol.zarr", GMPFeaturizer(), client=client)  # doctest: +SKIP

The run is split into tasks (contiguous structure ranges balanced by atom count, planned from
``reader.n_atoms()``).  Each task is a Dask task that reads its own slice of the source (the reader
is pickled into the task), featurizes it and stages its arrays in its own directory of the store;
then the final arrays are assembled chunk by chunk and the store is marked complete (see
:mod:`gmp_pipeline.store.writer` for why this is race-free and resumable).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import GMPError, InputError, StoreError
from .store.layout import array_specs, fingerprint_parts, normalize_dtype
from .store import writer as W

#: a task holds at most this many atoms unless --chunk-size asks for more
MAX_TASK_ATOMS = 20_000
#: ... and at least this many (tasks much smaller than this are dominated by overhead)
MIN_TASK_ATOMS = 500
#: default number of tasks per worker (several, so fast workers pick up slack)
TASKS_PER_WORKER = 6
#: assembly writing at most this many bytes (uncompressed) runs in the driver's threads: a Dask
#: round trip per job costs more than the work itself for small stores
LOCAL_ASSEMBLY_BYTES = 256 << 20


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
    warmup_seconds: float = 0.0     # compiling / loading the kernels on the workers
    compute_seconds: float = 0.0    # wall time of the featurization phase (this run)
    assemble_seconds: float = 0.0
    seconds: float = 0.0
    structures_computed: int = 0    # structures featurized by this run
    atoms_computed: int = 0
    skipped_records: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# -- planning -----------------------------------------------------------------------------------

def plan_tasks(n_atoms, *, n_workers: int = 1, chunk_size: int | None = None,
               tasks_per_worker: int = TASKS_PER_WORKER) -> list[tuple[int, int]]:
    """Split structures ``0..len(n_atoms)`` into contiguous ranges balanced by atom count.

    ``chunk_size``: about this many structures per task (the atom target is ``chunk_size`` times
    the mean atom count, so tasks stay balanced by atoms), all of one size.  Default:
    ``tasks_per_worker`` tasks per worker, each between ``MIN_TASK_ATOMS`` and
    ``MAX_TASK_ATOMS`` atoms; with several workers the last round of work is cut into tasks of
    a half and then a quarter of that size (run last), so that workers finish close together
    instead of one idling while another runs a whole task.
    """
    n_atoms = np.asarray(n_atoms, dtype=np.int64).reshape(-1)
    n = n_atoms.size
    if n == 0:
        return []
    total = int(n_atoms.sum())
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise InputError(f"chunk size must be at least 1 structure, got {chunk_size}")
        sizes = [1.0] * int(math.ceil(n / int(chunk_size)))
    else:
        target = total / max(1, n_workers * tasks_per_worker)
        target = min(max(target, MIN_TASK_ATOMS), MAX_TASK_ATOMS)
        n_tasks = max(1, min(n, int(round(total / target))))
        sizes = [1.0] * n_tasks
        if n_workers > 1 and n_tasks > n_workers and target >= 2 * MIN_TASK_ATOMS:
            # the last n_workers full tasks become n_workers halves and 2 n_workers quarters
            sizes = [1.0] * (n_tasks - n_workers) + [0.5] * n_workers + [0.25] * (2 * n_workers)
    if len(sizes) >= n:
        return [(i, i + 1) for i in range(n)]
    cum = np.cumsum(n_atoms)
    goals = total * np.cumsum(sizes)[:-1] / sum(sizes)
    idx = np.searchsorted(cum, goals, side="left")
    # choose between ending at structure idx (inclusive) or idx-1, whichever is closer to the goal
    cuts = []
    for g, i in zip(goals, idx):
        i = min(int(i), n - 1)
        below = cum[i - 1] if i > 0 else 0
        cuts.append(i if g - below < cum[i] - g else i + 1)
    bounds = sorted(set([0] + [c for c in cuts if 0 < c < n] + [n]))
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


# -- what runs on a worker ----------------------------------------------------------------------

_FEATURIZERS: dict[str, Any] = {}


def get_featurizer(config: dict):
    """The featurizer for ``config``, built once per process."""
    key = json.dumps(config, sort_keys=True, default=str)
    fz = _FEATURIZERS.get(key)
    if fz is None:
        from .features import GMPFeaturizer

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
            fz.featurize(s, derivatives=derivatives)
    return os.getpid()


def _warm_zarr() -> None:
    import zarr
    from zarr.storage import MemoryStore

    from .store.layout import ArraySpec, codecs_for

    with W.quiet_zarr():
        for spec in (ArraySpec("pairs/dfeatures", "float32", (3, 2)),
                     ArraySpec("atoms/features", "float32", (2,))):
            arr = zarr.create_array(MemoryStore(), shape=(64,) + spec.trailing,
                                    chunks=(16,) + spec.trailing, dtype=spec.dtype,
                                    compressors=codecs_for(spec))
            arr[:] = 1.0
            arr[:]


def run_task(store: str, task: int, start: int, stop: int, reader, config: dict,
             derivatives: bool, dtype: str, schema: dict, pair_base: int = 0,
             pair_capacity: int = 0) -> dict:
    """Featurize structures ``[start, stop)`` and stage them as task ``task`` of ``store``.

    ``pairs/dfeatures`` rows go straight into the store at ``[pair_base, pair_base +
    pair_capacity)``, the chunk-aligned region the plan reserved for this task; everything else
    is staged in the task's own directory, whose appearance marks the task done.
    """
    t0 = time.perf_counter()
    started = time.time()
    fz = get_featurizer(config)
    n_skipped_before = len(reader.skipped)
    structures = list(reader.read(start, stop))
    t_read = time.perf_counter()
    specs = array_specs(fz.n_features, dtype, derivatives, schema)
    pairs = (W.PairStream(store, specs["pairs/dfeatures"], pair_base, pair_capacity)
             if derivatives else None)
    collector = W.TaskCollector(specs, schema, derivatives, sum(len(s) for s in structures),
                                pairs)
    t_feat = 0.0
    result = None
    for s in structures:
        t = time.perf_counter()
        result = fz.featurize(s, derivatives=derivatives)
        t_feat += time.perf_counter() - t
        collector.add(s, result)
    del result
    arrays = collector.finish()
    if pairs is not None:
        pairs.close()
    t_done = time.perf_counter()
    skipped = [(int(i), str(m)) for i, m in reader.skipped[n_skipped_before:]
               if start <= int(i) < stop]
    meta = {"task": task, "start": start, "stop": stop,
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
    W.write_staged(store, task, arrays, meta)
    return meta


# -- the driver ---------------------------------------------------------------------------------

def _normalize_schema(schema: dict) -> dict:
    return {"info": {k: normalize_dtype(v) for k, v in (schema.get("info") or {}).items()},
            "atom_info": {k: normalize_dtype(v)
                          for k, v in (schema.get("atom_info") or {}).items()},
            "has_energy": bool(schema.get("has_energy")),
            "has_forces": bool(schema.get("has_forces"))}


def store_attrs(reader, featurizer, *, derivatives: bool, dtype: str) -> tuple[dict, dict]:
    """(root attributes, normalized schema) of the store this run writes."""
    from . import __version__

    schema = _normalize_schema(reader.schema())
    feature_config = featurizer.config()
    source = reader.describe()
    options = {"derivatives": bool(derivatives), "dtype": dtype}
    parts = fingerprint_parts(feature_config, source, options, __version__)
    attrs = W.base_attrs(feature_config=feature_config, feature_list=featurizer.feature_list,
                         source=source, options=options, units=dict(getattr(reader, "units", {})),
                         schema=schema, parts=parts, version=__version__)
    return attrs, schema


def _n_workers(client) -> int:
    if client is None:
        return 1
    try:
        return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    except TypeError:
        return max(1, len(client.scheduler_info()["workers"]))


def _progress(total, initial, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="task", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def featurize_to_store(reader, store, featurizer, *, derivatives: bool = True,
                       dtype: str = "float32", client=None, chunk_size: int | None = None,
                       overwrite: bool = False, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> RunSummary:
    """Featurize every structure of ``reader`` into the Zarr store at ``store``.

    ``client``: a :class:`distributed.Client`; ``None`` runs every task in this process (the
    serial reference).  An existing store with the same fingerprint is resumed (only missing
    tasks are computed); one with a different fingerprint raises :class:`StoreError` unless
    ``overwrite``.  A second run on the same store while this one holds it raises
    :class:`StoreError` (see :func:`~gmp_pipeline.store.writer.store_lock`).  Returns a
    :class:`RunSummary`.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    store = os.path.abspath(os.fspath(store))
    with W.store_lock(store, log):
        return _featurize_to_store(reader, store, featurizer, derivatives, dtype, client,
                                   chunk_size, overwrite, progress, log)


def _featurize_to_store(reader, store, featurizer, derivatives, dtype, client, chunk_size,
                        overwrite, progress, log) -> RunSummary:
    t_start = time.perf_counter()
    attrs, schema = store_attrs(reader, featurizer, derivatives=derivatives, dtype=dtype)
    state = W.prepare_store(store, attrs, overwrite=overwrite)
    summary = RunSummary(store=store, state=state)
    if state == "complete":
        a = W.read_root_attrs(store)
        counts = a.get("counts", {})
        summary.n_structures = counts.get("n_structures", 0)
        summary.n_atoms = counts.get("n_atoms", 0)
        summary.n_pairs = counts.get("n_pairs", 0)
        log(f"{store} is already complete with this configuration; nothing to do")
        return summary

    specs = array_specs(featurizer.n_features, dtype, derivatives, schema)
    # plan (or reuse the plan of the interrupted run, so task ids keep their meaning)
    plan = W.load_plan(store)
    if plan is None:
        n_atoms = np.asarray(reader.n_atoms(), dtype=np.int64)
        if n_atoms.size != len(reader):
            raise StoreError(f"reader reports {len(reader)} structures but {n_atoms.size} "
                             "atom counts")
        tasks = plan_tasks(n_atoms, n_workers=_n_workers(client), chunk_size=chunk_size)
        extra = {"n_structures": int(n_atoms.size), "n_atoms": int(n_atoms.sum())}
        if derivatives:
            rows = specs["pairs/dfeatures"].chunk_rows(1 << 62)
            caps = W.pair_capacities(n_atoms, tasks, rows)
            extra["pair_base"] = [int(x) for x in np.concatenate([[0], np.cumsum(caps)])]
        W.save_plan(store, tasks, extra)
        plan = W.load_plan(store)
    elif chunk_size is not None:
        log("resuming with the task plan of the interrupted run (--chunk-size is ignored)")
    tasks = [tuple(t) for t in plan["tasks"]]
    pair_base = plan.get("pair_base") or [0] * (len(tasks) + 1)
    if derivatives:
        W.ensure_direct_arrays(store, specs, pair_base[-1])
    # the other arrays too, with the planned shapes (assembly re-creates any whose shape
    # changed because records were skipped)
    W.create_arrays(store, specs, {"structures": plan["n_structures"], "atoms": plan["n_atoms"],
                                   "pairs": pair_base[-1]})
    W.clean_partial_tasks(store)
    done = W.finished_tasks(store)
    todo = [t for t in range(len(tasks)) if t not in done]
    summary.n_tasks = len(tasks)
    summary.tasks_skipped = len(tasks) - len(todo)
    if state == "resume":
        log(f"resuming {store}: {summary.tasks_skipped} of {len(tasks)} tasks already done, "
            f"computing {len(todo)}")
    else:
        log(f"planned {len(tasks)} tasks over {plan['n_structures']} structures "
            f"({plan['n_atoms']} atoms)")

    config = featurizer.config()
    t0 = time.perf_counter()
    metas_new = _compute(todo, tasks, pair_base, store, reader, config, derivatives, dtype,
                         schema, client, progress, summary)
    summary.compute_seconds = time.perf_counter() - t0 - summary.warmup_seconds
    if metas_new:
        stages: dict[str, float] = {}
        for m in metas_new:
            for k, v in (m.get("stage_seconds") or {}).items():
                stages[k] = stages.get(k, 0.0) + float(v)
        log("worker time summed over tasks: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    summary.tasks_computed = len(metas_new)
    summary.structures_computed = sum(m["n_structures"] for m in metas_new)
    summary.atoms_computed = sum(m["n_atoms"] for m in metas_new)

    # assemble
    t1 = time.perf_counter()
    metas = W.load_metas(store, len(tasks))
    bases, counts_ = W.task_layout(metas, pair_base if derivatives else None)
    totals = {level: int(b[-1]) for level, b in bases.items()}
    W.create_arrays(store, specs, totals)
    jobs = W.assembly_jobs(specs, totals)
    local = client is None or sum((r1 - r0) * specs[p].row_bytes()
                                  for p, r0, r1 in jobs) <= LOCAL_ASSEMBLY_BYTES
    _assemble(jobs, store, specs, bases, counts_, None if local else client, progress)
    n_pairs = int(counts_["pairs"].sum())
    summary.assemble_seconds = time.perf_counter() - t1

    skipped = sorted({(i, m) for meta in metas for i, m in meta.get("skipped", [])})
    counts = {"n_structures": totals["structures"], "n_atoms": totals["atoms"],
              "n_pairs": n_pairs, "pair_rows": totals["pairs"], "n_tasks": len(tasks),
              "n_skipped_records": len(skipped)}
    W.write_skipped(store, skipped)
    W.finalize(store, {"counts": counts,
                       "skipped_records": [[i, m] for i, m in skipped][:1000]})
    summary.n_structures, summary.n_atoms, summary.n_pairs = (
        totals["structures"], totals["atoms"], n_pairs)
    summary.skipped_records = [list(x) for x in skipped]
    summary.seconds = time.perf_counter() - t_start
    return summary


def _compute(todo, tasks, pair_base, store, reader, config, derivatives, dtype, schema, client,
             progress, summary) -> list[dict]:
    metas: list[dict] = []
    if todo:
        t_warm = time.perf_counter()
        first = tasks[todo[0]][0]
        if client is None:
            warm_worker(config, reader, first, derivatives)
        else:
            try:
                client.wait_for_workers(1, timeout=600)
            except Exception as exc:  # noqa: BLE001
                raise GMPError(f"no Dask worker joined within 10 minutes: {exc}") from exc
            client.run(warm_worker, config, reader, first, derivatives)
        summary.warmup_seconds = time.perf_counter() - t_warm
    bar = _progress(len(tasks), len(tasks) - len(todo), "featurize", progress)
    t0 = time.perf_counter()
    n_struct = 0

    def advance(meta):
        nonlocal n_struct
        metas.append(meta)
        n_struct += meta["n_structures"]
        bar.update(1)
        rate = n_struct / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{rate:.1f} structures/s", refresh=False)

    try:
        if not todo:
            return metas
        if client is None:
            for t in todo:
                start, stop = tasks[t]
                advance(run_task(store, t, start, stop, reader, config, derivatives, dtype,
                                 schema, pair_base[t], pair_base[t + 1] - pair_base[t]))
            return metas
        from distributed import as_completed

        token = os.urandom(4).hex()
        futures = [client.submit(run_task, store, t, tasks[t][0], tasks[t][1], reader, config,
                                 derivatives, dtype, schema, pair_base[t],
                                 pair_base[t + 1] - pair_base[t], key=f"gmp-task-{t}-{token}",
                                 pure=False, priority=-t)
                   for t in todo]
        try:
            for fut in as_completed(futures):
                advance(fut.result())
        except BaseException:
            client.cancel(futures)
            raise
        return metas
    finally:
        bar.close()


def _assemble(jobs, store, specs, bases, counts, client, progress) -> None:
    bar = _progress(len(jobs), 0, "assemble", progress and len(jobs) > 1)
    try:
        if client is None:
            # jobs write disjoint chunks, so threads are as safe as processes here
            from concurrent.futures import ThreadPoolExecutor

            staged = W.StagedTasks(store, cache=True)   # each task's file read once
            with ThreadPoolExecutor(max_workers=min(4, max(1, len(jobs)))) as pool:
                for _ in pool.map(lambda job: W.assemble_rows(store, specs[job[0]], job[1],
                                                              job[2], bases, counts, staged),
                                  jobs):
                    bar.update(1)
            return
        from distributed import as_completed

        token = os.urandom(4).hex()
        futures = [client.submit(W.assemble_rows, store, specs[path], r0, r1, bases, counts,
                                 key=f"gmp-assemble-{k}-{token}", pure=False)
                   for k, (path, r0, r1) in enumerate(jobs)]
        try:
            for fut in as_completed(futures):
                fut.result()
                bar.update(1)
        except BaseException:
            client.cancel(futures)
            raise
    finally:
        bar.close()
