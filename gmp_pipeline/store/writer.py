"""Writing a store in race-free phases: prepare, plan, stage (per task), assemble (per shard),
finalize -- the :class:`StoreWriter`.

1. **Prepare** (driver): the root group is created with ``complete: false`` and the run's root
   attributes (:func:`~.layout.root_attrs`), or an existing store is checked against the run's
   fingerprint (resume, or refuse naming what differs).
2. **Plan** (driver): the task plan (structure ranges balanced by atoms, and each task's
   ``pairs/`` region of whole shards) is saved in ``_staging/plan.json`` and every array is
   created with its planned shape.
3. **Stage** (one task per planned range, :func:`gmp_pipeline.pipeline.tasks.run_task`): the task
   streams its ``dfeatures`` rows into its own ``pairs/`` region and saves its other arrays in
   its *own* directory ``_staging/tasks/t0000012`` (:mod:`.staging`), whose appearance marks it
   done.  Its ``meta.json`` holds the task's structure, atom and pair counts -- the pair counting
   pass: pair counts are only known once the neighbour lists are built.
4. **Assemble** (jobs of whole output shards, :func:`assemble_rows`): the global offsets of
   every task are prefix sums of the staged counts; an array whose final shape differs from the
   plan is re-created; each assembly job owns a disjoint row range of whole shards of one array
   and is the only writer of those shard files.
5. **Finalize** (driver): the skipped records are written, root attrs get ``complete: true``
   and the counts, metadata is consolidated once, and ``_staging`` is removed.

No two concurrent writers ever touch the same file: staging directories and ``pairs/`` regions
(whole shards) are per task, assembly jobs own whole shards, metadata is written only by the
driver.  The final layout depends only on the source and the configuration, not on which worker
did what.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import knob
from ..errors import StoreError
from .layout import (DIRECT, FORMAT_NAME, FORMAT_VERSION, GROUP_ENCODING, ArraySpec,
                     codecs_for, create_kwargs, describe_differences, fingerprint,
                     fingerprints_match, quiet_zarr, read_root_attrs)
from .staging import (StagedTasks, clean_partial_tasks, finished_tasks, load_metas, load_plan,
                      save_plan, staging_dir)


def only_skip_bad_records_turned_on(old: dict, attrs: dict) -> bool:
    """Whether this run differs from the store only by ``--skip-bad-records`` now being on
    (a retry of a run that stopped at a bad record)."""
    a = old.get("fingerprint_parts") or {}
    b = attrs.get("fingerprint_parts") or {}
    if not a or not b or a.get("source", {}).get("skip_bad_records") is not False \
            or b.get("source", {}).get("skip_bad_records") is not True:
        return False
    a2 = {**a, "source": {**a["source"], "skip_bad_records": True}}
    return fingerprints_match({"fingerprint": fingerprint(a2), "fingerprint_parts": a2}, attrs)


def refuse_mismatch(path, old: dict, attrs: dict) -> None:
    """Raise the :class:`StoreError` for a store (root attributes ``old``) whose fingerprint
    differs from this run's ``attrs``, naming what differs."""
    diffs = describe_differences(old.get("fingerprint_parts", {}),
                                 attrs.get("fingerprint_parts", {}))
    detail = "; ".join(diffs) if diffs else "fingerprint differs"
    if diffs and all(d.startswith("source_identity.") for d in diffs):
        raise StoreError(f"{path} was written from a source that has changed since "
                         f"(same path and options, other contents: {detail}). Use "
                         "--overwrite to recompute it, or choose another output path.")
    raise StoreError(f"{path} was written with a different configuration ({detail}). "
                     "Use --overwrite to replace it, or choose another output path.")


def existing_store_state(path, attrs: dict | None, *, overwrite: bool = False) -> str:
    """What is at ``path`` for a run with root attributes ``attrs``, without changing anything.

    Returns ``"absent"`` (nothing there, or an empty directory), ``"replace"`` (a store that
    ``overwrite`` replaces), ``"complete"``, ``"resume"`` (same fingerprint, not complete) or
    ``"retry"`` (the same run retried with ``--skip-bad-records``).  Raises
    :class:`StoreError` for a path that holds something else or a store written with another
    configuration (naming what differs).  ``attrs=None`` stops after the checks that need no
    configuration.
    """
    path = Path(path)
    if not path.exists():
        return "absent"
    if not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory")
    old = read_root_attrs(path)
    if old is None:
        if any(path.iterdir()):
            raise StoreError(f"{path} exists and is not a Zarr store; refusing to touch it "
                             "(choose another output path or remove it yourself)")
        return "absent"
    if overwrite:
        return "replace"
    if old.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is a Zarr store but not a {FORMAT_NAME} store; use "
                         "--overwrite to replace it")
    version = old.get("format_version")
    if version != FORMAT_VERSION:
        state = "complete" if old.get("complete") else "incomplete"
        raise StoreError(
            f"{path} is a {state} {FORMAT_NAME} store of format version {version} (written by "
            f"gmp-pipeline {old.get('gmp_pipeline_version', '?')}); this gmp-pipeline writes "
            f"format version {FORMAT_VERSION} and cannot resume or add to it. It stays "
            "readable with open_store; rerun with --overwrite to recompute it in format "
            f"version {FORMAT_VERSION}, or choose another output path.")
    if attrs is None:
        return "resume"
    if not fingerprints_match(old, attrs):
        if not only_skip_bad_records_turned_on(old, attrs):
            refuse_mismatch(path, old, attrs)
        return "retry"
    return "complete" if old.get("complete") else "resume"


def _remove_store(path: Path, attempts: int = 5) -> None:
    """``rm -r`` a store being overwritten.  A task of an earlier run that failed may still be
    finishing on a shared cluster and create a shard file while the tree is removed
    ("Directory not empty"): retried a few times, then refused naming the path."""
    import errno

    for k in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or k == attempts - 1:
                raise StoreError(f"cannot remove {path} to overwrite it ({exc}); is another "
                                 "run, or a task of an earlier one, still writing into it?"
                                 ) from exc
            time.sleep(0.2 * (k + 1))


def prepare_store(path, attrs: dict, *, overwrite: bool = False) -> str:
    """Create the store, or check an existing one against ``attrs["fingerprint"]``
    (:func:`existing_store_state`).

    Returns ``"new"``, ``"resume"`` (same fingerprint, not complete) or ``"complete"``.
    """
    path = Path(path)
    state = existing_store_state(path, attrs, overwrite=overwrite)
    if state == "replace":
        _remove_store(path)
    elif state == "retry":
        # the same run retried with --skip-bad-records: without it no finished task can have
        # skipped a record, so they all stand; the store takes this run's fingerprint
        import zarr

        with quiet_zarr():
            zarr.open_group(str(path), mode="r+", use_consolidated=False).attrs.update(
                {k: attrs[k] for k in ("fingerprint", "fingerprint_parts", "source")})
        if (read_root_attrs(path) or {}).get("complete"):
            return "complete"
        state = "resume"
    if state == "complete":
        return "complete"
    if state == "resume":
        staging_dir(path).mkdir(parents=True, exist_ok=True)
        return "resume"
    import zarr

    with quiet_zarr():
        zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs)
    (staging_dir(path) / "tasks").mkdir(parents=True, exist_ok=True)
    return "new"


def pair_capacities(n_atoms, tasks, shard_rows: int) -> np.ndarray:
    """Rows of ``pairs/dfeatures`` reserved for each task: an upper bound of its pair count
    (a structure of n atoms has at most n * n distinct (centre, neighbour) pairs) rounded up to
    whole shards, so every task owns whole shard files and starts on a shard boundary (shards
    it does not reach have no file)."""
    bound = pair_bounds(n_atoms, tasks)
    return -(-bound // shard_rows) * shard_rows


def pair_bounds(n_atoms, tasks) -> np.ndarray:
    """An upper bound of each task's pair count: n * n per structure of n atoms (a structure
    has at most that many distinct (centre, neighbour) pairs)."""
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    sq = np.concatenate([[0], np.cumsum(n_atoms * n_atoms)])
    return np.array([sq[b] - sq[a] for a, b in tasks], dtype=np.int64)


def pair_shard_rows(spec: ArraySpec, n_atoms, tasks) -> int:
    """Rows per shard of ``pairs/dfeatures`` for a plan: :meth:`ArraySpec.shard_rows` (knob
    ``store.shard-bytes``), but no more whole chunks than the largest task's region needs, so a
    task of fewer pairs than a full shard owns one shard that it (nearly) fills rather than a
    mostly empty one (whose unused rows every scan of ``pairs/`` would pass over)."""
    inner = spec.chunk_rows(1 << 62)
    full = spec.shard_rows(1 << 62)
    bound = pair_bounds(n_atoms, tasks)
    largest = int(bound.max()) if bound.size else 1
    return int(min(full, max(inner, -(-largest // inner) * inner)))


def ensure_direct_arrays(path, specs: dict[str, ArraySpec], pair_rows: int,
                         shard_rows: int | None = None) -> None:
    """Create the arrays tasks write directly (``pairs/dfeatures``), once, before any task,
    with ``shard_rows`` rows per shard (default: :meth:`ArraySpec.shard_rows` of a full
    shard)."""
    import zarr

    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        for spec in specs.values():
            if spec.path not in DIRECT:
                continue
            if spec.level not in root:
                root.create_group(spec.level, attributes=GROUP_ENCODING[spec.level])
            if spec.path in root:
                continue
            kw = create_kwargs(spec, 1 << 62)     # shards of the full size, whatever the length
            kw["shape"] = (int(pair_rows),) + spec.trailing
            if shard_rows:
                kw["shards"] = (int(shard_rows),) + spec.trailing
            root.create_array(spec.path, **kw)


def _write_rows(array_path: Path, r0: int, block: np.ndarray) -> None:
    """Rows ``[r0, r0 + len(block))`` of the (text) array at ``array_path``, whose shards from
    ``r0`` to the end of the block's last shard belong to the caller, through Zarr."""
    import zarr

    with quiet_zarr():
        arr = zarr.open_array(str(array_path), mode="r+")
        arr[r0:r0 + block.shape[0]] = block


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
    """(shape, shard shape, inner chunk shape) of the sharded Zarr v3 array at ``array_path``,
    or None if there is none (or it is not sharded)."""
    try:
        meta = json.loads((array_path / "zarr.json").read_text())
        (codec,) = meta["codecs"]
        return (list(meta["shape"]), list(meta["chunk_grid"]["configuration"]["chunk_shape"]),
                list(codec["configuration"]["chunk_shape"]))
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
        layout_ = ([n, *spec.trailing], [spec.shard_rows(n), *spec.trailing],
                   [spec.chunk_rows(n), *spec.trailing])
        if _array_layout(Path(path) / spec.path) != layout_:
            wanted[spec.path] = n
    if not wanted:
        return
    with quiet_zarr():
        root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        for level in ("structures", "atoms", "pairs"):
            if any(s.level == level for s in specs.values()) and level not in root:
                root.create_group(level, attributes=GROUP_ENCODING.get(level, {}))
        for spec in specs.values():
            if spec.path not in wanted:
                continue
            root.create_array(spec.path, **create_kwargs(spec, wanted[spec.path]),
                              overwrite=True)


def assembly_jobs(specs: dict[str, ArraySpec], totals: dict[str, int],
                  job_bytes: int | None = None) -> list[tuple[str, int, int]]:
    """Disjoint (array path, row start, row stop) ranges, each a whole number of shards of about
    ``job_bytes`` (default: knob ``store.assembly-job-bytes``) uncompressed, at least one."""
    job_bytes = int(knob("store.assembly-job-bytes") if job_bytes is None else job_bytes)
    jobs = []
    for spec in specs.values():
        if spec.path in DIRECT:
            continue
        n = int(totals[spec.level])
        if n == 0:
            continue
        rows = spec.shard_rows(n)
        per_job = rows * max(1, job_bytes // max(1, rows * spec.row_bytes()))
        for r0 in range(0, n, per_job):
            jobs.append((spec.path, r0, min(n, r0 + per_job)))
    return jobs


def assemble_rows(path, spec: ArraySpec, r0: int, r1: int, bases: dict[str, np.ndarray],
                  counts: dict[str, np.ndarray], staged: StagedTasks | None = None) -> int:
    """Write rows ``[r0, r1)`` of one array from the staged tasks that cover them.

    ``r0`` is a shard boundary and ``r1`` a shard boundary or the end of the array, so this job
    is the only writer of the shard files it touches.  Rows no task covers (the unused end of a
    task's pair region) get the fill value (chunks holding nothing else are not stored).  The
    rows are streamed chunk by chunk into the shard files (:class:`~.chunks.ShardStream`), so
    a job holds one inner chunk, not a shard; text arrays are written through Zarr.  Returns
    the number of bytes written (uncompressed).  ``staged``: where to read the tasks' staged
    arrays (default: a fresh, uncached reader).
    """
    from .chunks import open_direct

    staged = staged or StagedTasks(path)
    b, c = bases[spec.level], counts[spec.level]
    first = max(int(np.searchsorted(b, r0, side="right")) - 1, 0)
    last = min(int(np.searchsorted(b, r1, side="left")), len(c))
    parts = []
    for t in range(first, last):
        lo, hi = max(r0, int(b[t])), min(r1, int(b[t] + c[t]))
        if hi > lo:
            rows = staged.rows(t, spec, bases)
            parts.append((lo, rows[lo - int(b[t]):hi - int(b[t])]))
    covered = sum(p.shape[0] for _, p in parts)
    if spec.level != "pairs" and covered != r1 - r0:
        raise StoreError(f"staged rows of {spec.path} [{r0}, {r1}) are incomplete "
                         f"({covered} rows found)")
    array_path = Path(path) / spec.path
    direct = None if spec.is_str else open_direct(array_path)
    if direct is None:
        block = spec.empty(r1 - r0)
        for lo, p in parts:
            block[lo - r0:lo - r0 + p.shape[0]] = np.asarray(p)
        _write_rows(array_path, r0, block.astype(object) if spec.is_str else block)
        return int(block.nbytes)
    stream = direct.stream(r0)
    for lo, p in parts:
        stream.skip_to(lo)
        stream.append(p)
    stream.skip_to(r1)
    stream.close()
    return (r1 - r0) * spec.row_bytes()


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
            n = max(1, len(data))
            arr = g.create_array(name, shape=data.shape, chunks=(n,), shards=(n,), dtype=dt,
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


class StoreWriter:
    """The driver's side of writing one store: ``prepare``, ``plan``, ``assembly``, ``finalize``
    (the tasks' side, staging, is in :mod:`.staging`).  ``specs``: every array of the store
    (:func:`~.layout.array_specs`); ``attrs``: the root attributes of this run."""

    def __init__(self, path, specs: dict[str, ArraySpec], attrs: dict):
        self.path = str(path)
        self.specs = specs
        self.attrs = attrs
        self.derivatives = "pairs/dfeatures" in specs

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, *, overwrite: bool = False) -> str:
        """``"new"``, ``"resume"`` or ``"complete"`` (see :func:`prepare_store`)."""
        return prepare_store(self.path, self.attrs, overwrite=overwrite)

    def counts(self) -> dict:
        """The counts a complete store recorded when it was finalized."""
        return (read_root_attrs(self.path) or {}).get("counts", {})

    # -- plan ---------------------------------------------------------------------------------
    def load_plan(self) -> dict | None:
        return load_plan(self.path)

    def save_plan(self, n_atoms, tasks: list[tuple[int, int]]) -> dict:
        """Save the plan of ``tasks`` over structures of ``n_atoms`` atoms; with derivatives each
        task gets a region of whole ``pairs/dfeatures`` shards (``pair_base``; the shard size
        ``pair_shard_rows`` of :func:`pair_shard_rows` is part of the plan)."""
        n_atoms = np.asarray(n_atoms, dtype=np.int64)
        extra = {"n_structures": int(n_atoms.size), "n_atoms": int(n_atoms.sum())}
        if self.derivatives:
            rows = pair_shard_rows(self.specs["pairs/dfeatures"], n_atoms, tasks)
            caps = pair_capacities(n_atoms, tasks, rows)
            extra["pair_shard_rows"] = int(rows)
            extra["pair_base"] = [int(x) for x in np.concatenate([[0], np.cumsum(caps)])]
        save_plan(self.path, tasks, extra)
        return load_plan(self.path)

    @staticmethod
    def pair_base(plan: dict) -> list[int]:
        return plan.get("pair_base") or [0] * (len(plan["tasks"]) + 1)

    def create_planned(self, plan: dict) -> None:
        """Every array with its planned shape (the directly written ones first); assembly
        re-creates any whose shape changed because records were skipped."""
        pair_base = self.pair_base(plan)
        if self.derivatives:
            ensure_direct_arrays(self.path, self.specs, pair_base[-1],
                                 plan.get("pair_shard_rows"))
        create_arrays(self.path, self.specs, {"structures": plan["n_structures"],
                                              "atoms": plan["n_atoms"], "pairs": pair_base[-1]})

    def pending_tasks(self, plan: dict) -> list[int]:
        """Ids of the planned tasks not staged yet (removing what killed tasks left behind)."""
        clean_partial_tasks(self.path)
        done = finished_tasks(self.path)
        return [t for t in range(len(plan["tasks"])) if t not in done]

    # -- assemble -----------------------------------------------------------------------------
    def assembly(self, plan: dict) -> "Assembly":
        """The assembly of the staged tasks: arrays re-created with their final shapes, and the
        jobs (disjoint whole-shard row ranges) that fill them."""
        metas = load_metas(self.path, len(plan["tasks"]))
        bases, counts = task_layout(metas, self.pair_base(plan) if self.derivatives else None)
        totals = {level: int(b[-1]) for level, b in bases.items()}
        create_arrays(self.path, self.specs, totals)
        jobs = assembly_jobs(self.specs, totals)
        nbytes = sum((r1 - r0) * self.specs[p].row_bytes() for p, r0, r1 in jobs)
        return Assembly(self.path, self.specs, metas, bases, counts, totals, jobs, nbytes)

    # -- finalize -----------------------------------------------------------------------------
    def finalize(self, asm: "Assembly") -> dict:
        """Write the skipped records and mark the store complete; returns its counts."""
        skipped = asm.skipped()
        counts = {"n_structures": asm.totals["structures"], "n_atoms": asm.totals["atoms"],
                  "n_pairs": asm.n_pairs, "pair_rows": asm.totals["pairs"],
                  "n_tasks": len(asm.metas), "n_skipped_records": len(skipped)}
        write_skipped(self.path, skipped)
        finalize(self.path, {"counts": counts,
                             "skipped_records": [[i, m] for i, m in skipped][:1000]})
        return counts


class Assembly:
    """What :meth:`StoreWriter.assembly` planned: ``jobs`` to run with :meth:`run_job`."""

    def __init__(self, path, specs, metas, bases, counts, totals, jobs, nbytes):
        self.path, self.specs, self.metas = path, specs, metas
        self.bases, self.counts, self.totals = bases, counts, totals
        self.jobs, self.nbytes = jobs, int(nbytes)
        self.n_pairs = int(counts["pairs"].sum())

    def job_args(self, job, staged: StagedTasks | None = None) -> tuple:
        """Arguments of :func:`assemble_rows` for ``job``."""
        path, r0, r1 = job
        return (self.path, self.specs[path], r0, r1, self.bases, self.counts, staged)

    def skipped(self) -> list[tuple[int, str]]:
        return sorted({(int(i), str(m)) for meta in self.metas
                       for i, m in meta.get("skipped", [])})


# re-exported for callers of the previous single-module writer
__all__ = ["StoreWriter", "Assembly", "prepare_store", "pair_capacities", "pair_bounds",
           "pair_shard_rows", "ensure_direct_arrays",
           "task_layout", "create_arrays", "assembly_jobs", "assemble_rows", "write_skipped",
           "finalize", "finished_tasks", "load_plan", "read_root_attrs", "quiet_zarr"]
