"""The ``gmp-pipeline`` command: ``featurize``, ``inspect`` and ``verify``.

Errors raised on purpose (:class:`gmp_pipeline.errors.GMPError`) are printed as one clean
``Error: ...`` line with exit code 1; an interrupted run exits with 130 and can be resumed by
rerunning the same command.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import click

from .config import describe_defaults, load_feature_config
from .errors import InputError, StoreError
from .store.verify import store_report, verify_store


def _clean_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from ._signals import run_command  # one Error: line, exit 1 / 130 / 143 (see there)

        return run_command(func, args, kwargs, path=kwargs.get("store"),
                           echo=lambda m: click.echo(m, err=True))
    return wrapper


class _EchoHandler(logging.Handler):
    """Library log records (INFO and up) as plain lines on stderr, like the CLI's own."""

    def emit(self, record):
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _setup_logging() -> None:
    log = logging.getLogger("gmp_pipeline")
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler())
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def make_featurizer(features_file=None):
    """The featurizer of a feature YAML (None: the shipped default set)."""
    from .config import FEATURE_KEYS
    from .features import GMPFeaturizer

    try:
        return GMPFeaturizer(**load_feature_config(features_file))
    except InputError as exc:  # name the file (and the key) the bad value came from
        if features_file is None or str(exc).startswith("feature file"):
            raise
        msg, key = str(exc), next((k for k in FEATURE_KEYS if str(exc).startswith(k)), None)
        where = f"feature file {str(features_file)!r}" + (f", key {key!r}" if key else "")
        raise InputError(f"{where}: {msg[len(key):].lstrip(': ') if key else msg}") from None


def _parse_reader_options(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--reader-option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key.strip().replace("-", "_") == "skip_bad_records":
            raise InputError("--reader-option skip_bad_records is not a reader option; use "
                             "--skip-bad-records")
        try:
            import yaml

            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except Exception:  # noqa: BLE001
            out[key.strip().replace("-", "_")] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gmp-pipeline")
@click.option("--debug", is_flag=True,
              help="Show tracebacks and Dask's own log messages (also GMP_PIPELINE_DEBUG=1).")
def main(debug):
    """GMP features and their position derivatives, computed on Dask into a Zarr store.

    \b
    gmp-pipeline featurize md17 ethanol.npz -o ethanol.zarr     compute a store
    gmp-pipeline inspect ethanol.zarr                           what is in it
    gmp-pipeline verify ethanol.zarr --sample 10                recompute and compare
    """
    from ._signals import set_debug

    _setup_logging()
    set_debug(debug)


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source_kind")
@click.argument("path", type=click.Path(path_type=str))
@click.option("-o", "--output", "store", required=True, type=click.Path(path_type=str),
              help="Zarr store to write (a directory, e.g. out.zarr).")
@click.option("--features", "features_file", type=click.Path(dir_okay=False, path_type=str),
              help="YAML feature set (orders, sigmas, psp, overlap_threshold, square). "
                   f"Default: the shipped features-default.yaml ({describe_defaults()}).")
@click.option("--derivatives/--no-derivatives", default=True, show_default=True,
              help="Also store the total derivative of every feature with respect to every "
                   "neighbour position (pairs/dfeatures), needed for force training.")
@click.option("--derivative-atoms", type=click.Choice(["all", "free"]), default="all",
              show_default=True,
              help="With derivatives: store dF_i/dr_j for every atom j (all), or only for free "
                   "atoms j (free: the reader's per-atom 'fixed' is 0, as OC20/OC22 mark "
                   "them), which is all that forces on free atoms need.")
@click.option("--cluster", default="local", show_default=True,
              help="local (a LocalCluster on this machine), slurm, pbs, sge, lsf (batch jobs; "
                   "TLS, job logs in STORE.logs/), or the address of a running Dask scheduler "
                   "(tcp://host:8786).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes (local: default one per core; batch: per job).")
@click.option("--chunk-size", type=click.IntRange(min=1),
              help="About N structures per task. Default: planned from atom counts "
                   "(several tasks per worker, balanced by atoms).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Floating type of features and dfeatures.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store instead of resuming it (a store written with a "
                   "different configuration is otherwise refused).")
@click.option("--skip-bad-records", is_flag=True,
              help="Skip (and list) unreadable source records instead of stopping.")
@click.option("--reader-option", "reader_options", multiple=True, metavar="KEY=VALUE",
              help="Option passed to the reader, e.g. --reader-option energy_unit=eV "
                   "(repeatable).")
@click.option("--cluster-config", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="dask-jobqueue YAML overriding the shipped cluster config "
                   "(slurm/pbs/sge/lsf).")
@click.option("--min-jobs", type=click.IntRange(min=0), help="Batch clusters: fewest jobs.")
@click.option("--max-jobs", type=click.IntRange(min=1), help="Batch clusters: most jobs.")
@click.option("--dry-run", is_flag=True,
              help="Print the batch job script that --cluster slurm|pbs|sge|lsf would submit, "
                   "and exit.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress bars (tasks done/total, structures/s, ETA).")
@_clean_errors
def featurize(source_kind, path, store, features_file, derivatives, derivative_atoms, cluster,
              workers,
              chunk_size, dtype, overwrite, skip_bad_records, reader_options, cluster_config,
              min_jobs, max_jobs, dry_run, progress):
    """Featurize every structure of PATH (a SOURCE_KIND dataset) into the Zarr store -o STORE.

    SOURCE_KIND is one of the registered readers (md17, rmd17, qm9, ocp, ase, ...).  Rerunning
    the same command on an interrupted store computes only the missing tasks.
    """
    from .clusters import check_spec, job_script, start_cluster
    from .pipeline import check_derivative_atoms, check_source, featurize_to_store
    from .pipeline.run import counted
    from .readers import open_reader

    if dry_run:
        click.echo(job_script(cluster, cluster_config, workers=workers))
        return
    check_spec(cluster)  # a bad --cluster is refused before the source is opened
    featurizer = make_featurizer(features_file)
    options = _parse_reader_options(reader_options)
    reader = open_reader(source_kind, os.path.abspath(path), skip_bad_records=skip_bad_records,
                         **options)
    n = check_source(reader, featurizer)  # opens the source: before any store or cluster
    check_derivative_atoms(derivative_atoms, derivatives, reader)   # before any cluster starts
    click.echo(f"source: {source_kind} {os.path.abspath(path)} ({counted(n, 'structure')}); "
               f"{featurizer.n_features} features, derivatives "
               f"{'on' if derivatives else 'off'}, {dtype}", err=True)
    from ._preflight import check_before_cluster  # store lock / configuration, before a cluster

    check_before_cluster(reader, store, featurizer, derivatives=derivatives, dtype=dtype,
                         overwrite=overwrite, derivative_atoms=derivative_atoms)
    t0 = time.perf_counter()
    with start_cluster(cluster, workers=workers, cluster_config=cluster_config,
                       min_jobs=min_jobs, max_jobs=max_jobs, quiet=True,
                       log_directory=os.path.abspath(store) + ".logs") as client:
        n_workers = len(client.scheduler_info().get("workers", {}))
        click.echo(f"Dask dashboard: {client.dashboard_link} ({n_workers} workers)", err=True)
        t_cluster = time.perf_counter() - t0
        summary = featurize_to_store(reader, store, featurizer, derivatives=derivatives,
                                     dtype=dtype, derivative_atoms=derivative_atoms,
                                     client=client, chunk_size=chunk_size,
                                     overwrite=overwrite, progress=progress,
                                     log=lambda m: click.echo(m, err=True))
    if summary.state == "complete":
        return
    run = summary.compute_seconds + summary.assemble_seconds
    rate = summary.structures_computed / run if run > 0 else float("nan")
    arate = summary.atoms_computed / run if run > 0 else float("nan")
    click.echo(f"tasks: {summary.n_tasks} planned, {summary.tasks_computed} computed, "
               f"{summary.tasks_skipped} already done")
    click.echo(f"wrote {summary.store}: {counted(summary.n_structures, 'structure')}, {summary.n_atoms} "
               f"atoms, {summary.n_pairs} pairs")
    click.echo(f"time: cluster {t_cluster:.2f} s, plan {summary.plan_seconds:.2f} s, warmup "
               f"{summary.warmup_seconds:.2f} s, featurize {summary.compute_seconds:.2f} s, "
               f"assemble {summary.assemble_seconds:.2f} s, total "
               f"{time.perf_counter() - t0:.2f} s; {rate:.1f} structures/s, {arate:.0f} atoms/s")
    if summary.skipped_records:
        click.echo(f"skipped {counted(len(summary.skipped_records), 'bad record')}:", err=True)
        for i, msg in summary.skipped_records[:20]:
            click.echo(f"  record {i}: {msg}", err=True)


# -- inspect ------------------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("store", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_clean_errors
def inspect(store, as_json):
    """Counts, feature list, configuration, completeness and sizes on disk of STORE."""
    rep = store_report(store)
    if as_json:
        click.echo(json.dumps(rep, indent=1, default=str))
        return
    a = rep["attrs"]
    counts = a.get("counts", {})
    src = a.get("source", {})
    fc = a.get("feature_config", {})
    opts = a.get("options", {})
    echo = click.echo
    echo(f"store:       {rep['path']}")
    echo(f"format:      {a.get('format')} v{a.get('format_version')} "
         f"(gmp-pipeline {a.get('gmp_pipeline_version')})")
    if a.get("complete"):
        echo("complete:    yes")
    else:
        prog = rep.get("progress")
        extra = (f" ({prog['tasks_done']} of {prog['tasks_planned']} tasks done; rerun the same "
                 "featurize command to finish)") if prog else ""
        echo(f"complete:    NO{extra}")
    echo(f"source:      {src.get('reader')} {src.get('path')}"
         + (f" options {src.get('options')}" if src.get("options") else ""))
    echo(f"units:       {a.get('units')}")
    if counts:
        echo(f"counts:      {counts.get('n_structures')} structures, {counts.get('n_atoms')} "
             f"atoms, {counts.get('n_pairs')} pairs, {counts.get('n_tasks')} tasks, "
             f"{counts.get('n_skipped_records', 0)} skipped records")
    echo(f"features:    {len(a.get('feature_list', []))} (orders {fc.get('orders')}, sigmas "
         f"{fc.get('sigmas')}, psp {fc.get('psp')}, overlap_threshold "
         f"{fc.get('overlap_threshold')}, square {fc.get('square')})")
    echo(f"psp sha256:  {fc.get('psp_sha256')}")
    echo("feature list: " + ", ".join(f"({o},{s:g})" for o, s in a.get("feature_list", [])))
    echo(f"derivatives: {opts.get('derivatives')}   dtype: {opts.get('dtype')}")
    echo(f"fingerprint: {a.get('fingerprint')}")
    extras = a.get("extras", {})
    if extras.get("info") or extras.get("atom_info"):
        echo(f"extras:      structures {sorted(extras.get('info', {}))}, atoms "
             f"{sorted(extras.get('atom_info', {}))}")
    if rep["arrays"]:
        echo("arrays:")
        echo(f"  {'path':<26} {'shape':<20} {'dtype':<8} {'chunk rows':>10} {'size':>10} "
             f"{'on disk':>10}")
        for arr in rep["arrays"]:
            echo(f"  {arr['path']:<26} {str(tuple(arr['shape'])):<20} {arr['dtype']:<8} "
                 f"{arr['chunks'][0]:>10} {_human(arr['bytes']):>10} "
                 f"{_human(arr['bytes_on_disk']):>10}")
    echo(f"on disk:     {_human(rep['bytes_on_disk'])} ({rep['bytes_on_disk']} bytes)")
    if counts.get("n_atoms"):
        echo(f"per atom:    {rep['bytes_on_disk'] / counts['n_atoms']:.0f} bytes"
             + (f"; per pair: {rep['bytes_on_disk'] / counts['n_pairs']:.0f} bytes"
                if counts.get("n_pairs") else ""))


# -- verify -------------------------------------------------------------------------------------

@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("store", type=click.Path(path_type=str))
@click.option("--sample", default=5, show_default=True, type=click.IntRange(min=0),
              help="Number of random structures to recompute in-process and compare.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the sample.")
@click.option("--checksums/--no-checksums", default=True, show_default=True,
              help="Decode every chunk of every array (one chunk in memory at a time), which "
                   "checks its crc32c checksum: flipped bytes are reported with the array.")
@_clean_errors
def verify(store, sample, seed, checksums):
    """Check STORE's indexes and recompute a random sample of structures from the source."""
    problems = verify_store(store, sample=sample, seed=seed, checksums=checksums)
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        raise StoreError(f"{store}: {len(problems)} problem(s) found")
    for note in getattr(problems, "notes", []):
        click.echo(f"note: {note}", err=True)
    n = getattr(problems, "checked", sample)
    chunks = getattr(problems, "chunks_checked", 0)
    click.echo(f"verify: OK ({n} structure{'' if n == 1 else 's'} recomputed and matched; "
               f"indexes consistent" + (f"; {chunks} chunks decoded, checksums good)"
                                        if chunks else ")"))


if __name__ == "__main__":  # pragma: no cover
    main()
