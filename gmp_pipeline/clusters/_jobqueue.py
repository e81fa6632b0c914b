"""Shared machinery for the batch-scheduler clusters (slurm.py, pbs.py, sge.py, lsf.py)."""
from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

import dask
from dask_jobqueue.core import Job

from ..errors import ClusterError
from .config import DEFAULTS, parse_memory, worker_lifetime

logger = logging.getLogger("gmp_pipeline.clusters")

SCHEDULER_PLACEHOLDER = "tcp://<scheduler-address>:8786"

# keys read by gmp-pipeline itself, on top of dask-jobqueue's
OWN_KEYS = {"lifetime", "lifetime-stagger"}
# keys consumed by the cluster rather than the job
CLUSTER_KEYS = {"scheduler-options", "shared-temp-directory"}
# deprecated dask-jobqueue spellings -> current ones
DEPRECATED = {"extra": "worker-extra-args", "job-extra": "job-extra-directives",
              "env-extra": "job-script-prologue", "header-skip": "job-directives-skip"}


class Scheduler:
    """What differs between batch systems: the dask-jobqueue class and the commands."""

    def __init__(self, kind, cluster_cls, title, preflight_cmd, install_hint, status_cmd=None,
                 capacity_cmd=None):
        self.kind = kind
        self.status_cmd = status_cmd    # callable(job ids) -> argv showing why jobs wait
        # callable(queue or None) -> argv printing "<cpus> <memory MB>" per node, or None
        self.capacity_cmd = capacity_cmd
        self.cluster_cls = cluster_cls
        self.title = title
        self.preflight_cmd = preflight_cmd
        self.install_hint = install_hint

    @property
    def job_cls(self):
        return self.cluster_cls.job_cls

    @property
    def submit_command(self) -> str:
        return self.job_cls.submit_command

    # ----------------------------------------------------------------- availability
    def available(self, timeout: float = 15) -> tuple[bool, str]:
        """(True, description) when the submit command exists and the scheduler answers."""
        exe = self.submit_command
        if shutil.which(exe) is None:
            return False, f"{self.title} command {exe!r} not found on PATH"
        if not self.preflight_cmd:
            return True, f"{exe} found"
        try:
            proc = subprocess.run(self.preflight_cmd, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return False, f"{self.title} command {self.preflight_cmd[0]!r} not found on PATH"
        except subprocess.TimeoutExpired:
            return False, (f"{self.title} did not answer `{' '.join(self.preflight_cmd)}` "
                           f"within {timeout:g} s (is the controller running?)")
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            return False, (f"`{' '.join(self.preflight_cmd)}` failed: "
                           f"{msg[-1] if msg else 'exit code %d' % proc.returncode}")
        return True, proc.stdout.strip()

    def preflight(self) -> None:
        exe = self.submit_command
        if shutil.which(exe) is None:
            raise ClusterError(
                f"--cluster {self.kind} needs the {self.title} command {exe!r}, which is not on "
                f"PATH: run gmp-pipeline on a login node of a {self.title} cluster "
                f"({self.install_hint})")
        if dask.config.get("gmp-pipeline.cluster.jobqueue.preflight", True):
            timeout = float(dask.config.get("gmp-pipeline.cluster.jobqueue.preflight-timeout", 30))
            ok, reason = self.available(timeout=timeout)
            if not ok:
                raise ClusterError(f"--cluster {self.kind}: the {self.title} scheduler is not "
                                   f"usable: {reason}")

    # ----------------------------------------------------------------- configuration
    def _accepted_params(self) -> set[str]:
        params = set(inspect.signature(Job.__init__).parameters)
        params |= set(inspect.signature(self.job_cls.__init__).parameters)
        return params - {"self", "scheduler", "name", "base_class_kwargs", "config_name"}

    def _known_keys(self) -> set[str]:
        from dask.config import defaults

        known = set(OWN_KEYS) | CLUSTER_KEYS
        for d in defaults:
            section = d.get("jobqueue", {}).get(self.kind)
            if isinstance(section, dict):
                known |= set(section)
        return known

    def resolve(self, *, workers=None, local_directory=None, interface=None):
        """(job kwargs, cluster-only kwargs), every value taken from dask.config now.

        All keys are resolved here rather than left for dask-jobqueue to read later, because
        adaptive scaling creates jobs long after a ``--cluster-config`` file was applied.
        """
        name = f"jobqueue.{self.kind}"
        cfg = dict(dask.config.get(name, {}) or {})
        # dask.config.refresh() re-applies dask-jobqueue's nulls over our shipped defaults
        # (its merge keeps the first value seen), so fall back to them key by key
        for key, value in (DEFAULTS.get("jobqueue", {}).get(self.kind) or {}).items():
            if cfg.get(key) is None:
                cfg[key] = value
        unknown = sorted(k for k in cfg if k not in self._known_keys())
        if unknown:
            raise ClusterError(f"unknown key(s) {', '.join(map(repr, unknown))} in {name} "
                               f"(dask config / --cluster-config); known keys: "
                               f"{', '.join(sorted(self._known_keys()))}")
        for old, new in DEPRECATED.items():
            if cfg.get(old) is not None:
                if not cfg.get(new):
                    cfg[new] = cfg[old]
                cfg[old] = None
        if cfg.get("project") is not None and "account" in self._accepted_params():
            cfg["account"] = cfg.get("account") or cfg["project"]
            cfg["project"] = None

        if interface is not None:
            cfg["interface"] = interface
        if local_directory is not None:
            cfg["local-directory"] = str(local_directory)
        if workers is not None:
            if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
                raise ClusterError(f"workers must be a positive integer, got {workers!r}")
            cfg["processes"] = workers

        cores, processes = cfg.get("cores"), cfg.get("processes")
        if not isinstance(cores, int) or isinstance(cores, bool) or cores < 1:
            raise ClusterError(f"{name}.cores must be a positive integer (cores per job), "
                               f"got {cores!r}")
        if processes is None:
            processes = cfg["processes"] = cores
        if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
            raise ClusterError(f"{name}.processes must be a positive integer, got {processes!r}")
        if processes > cores:
            raise ClusterError(f"{name}: {processes} worker processes per job need at least "
                               f"as many cores, but cores is {cores}")
        memory = parse_memory(cfg.get("memory"), f"{name}.memory")
        if memory // processes < 256 * 2**20:
            raise ClusterError(f"{name}.memory {cfg.get('memory')!r} leaves less than 256 MiB "
                               f"for each of the {processes} worker processes")

        lifetime = worker_lifetime(cfg.get("walltime"), cfg.get("lifetime", "auto"),
                                   cfg.get("lifetime-stagger", "auto"), self.kind)
        extra = list(cfg.get("worker-extra-args") or [])
        if lifetime is not None and "--lifetime" not in extra:
            life_s, stagger_s = lifetime
            extra += ["--lifetime", f"{life_s}s", "--lifetime-stagger", f"{stagger_s}s"]
        cfg["worker-extra-args"] = extra

        accepted = self._accepted_params()
        job_kwargs = {}
        for key, value in cfg.items():
            if key in OWN_KEYS or key in CLUSTER_KEYS or value is None:
                continue
            param = "job_name" if key == "name" else key.replace("-", "_")
            if param in accepted:
                job_kwargs[param] = value
        job_kwargs.setdefault("python", sys.executable)
        cluster_kwargs = {"scheduler_options": dict(cfg.get("scheduler-options") or {}),
                          "shared_temp_directory": cfg.get("shared-temp-directory")}
        return job_kwargs, cluster_kwargs

    def node_capacity(self, queue=None, timeout: float = 15):
        """(cpus, memory bytes) of the largest node the scheduler reports, or None."""
        if self.capacity_cmd is None:
            return None
        try:
            proc = subprocess.run(self.capacity_cmd(queue), capture_output=True, text=True,
                                  timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return None
        best = None
        for line in proc.stdout.split("\n"):
            parts = line.split()
            if len(parts) < 2:
                continue
            try:
                cpus = int(parts[0].rstrip("+"))
                mem = int(parts[1].rstrip("+")) * 2**20
            except ValueError:
                continue
            if best is None or (cpus, mem) > best:
                best = (cpus, mem)
        return best

    def fit_to_nodes(self, job_kwargs) -> None:
        """Shrink a job that no node could run (it would wait forever) to the largest node.

        SLURM accepts such a job and leaves it pending (reason PartitionConfig), so a run with
        the shipped defaults on a small cluster would hang; this says what it changed instead.
        """
        cap = self.node_capacity(job_kwargs.get("queue"))
        if cap is None:
            return
        cpus, mem = cap
        cores = job_kwargs.get("cores")
        changed = []
        if isinstance(cores, int) and cpus > 0 and cores > cpus:
            job_kwargs["cores"] = cpus
            job_kwargs["processes"] = min(int(job_kwargs.get("processes") or cpus), cpus)
            changed.append(f"cores {cores} -> {cpus}, processes -> {job_kwargs['processes']}")
        memory = job_kwargs.get("memory")
        if memory is not None and mem > 0:
            want = parse_memory(memory, f"jobqueue.{self.kind}.memory")
            if want > mem:
                # whole GiB, rounded down: dask-jobqueue rounds --mem up to the next unit
                job_kwargs["memory"] = f"{max(mem // 2**30, 1)}GiB"
                changed.append(f"memory {memory} -> {job_kwargs['memory']}")
        if changed:
            logger.warning(f"gmp-pipeline: the largest {self.title} node has {cpus} CPUs and "
                           f"{mem // 2**20} MiB; a job as configured could never start, so: "
                           f"{'; '.join(changed)} (set jobqueue.{self.kind} in "
                           "--cluster-config)")

    # ----------------------------------------------------------------- products
    def job_script(self, *, tls=None, **resolve_kwargs) -> str:
        job_kwargs, _ = self.resolve(**resolve_kwargs)
        scheduler = SCHEDULER_PLACEHOLDER
        if _truthy(dask.config.get("gmp-pipeline.cluster.jobqueue.tls", True)
                   if tls is None else tls):
            # the real script names the credential files written for the run
            from distributed.security import Security

            where = "<log-directory>/.dask-jobqueue.worker"
            job_kwargs["security"] = Security(
                tls_ca_file=f"{where}.ca_file.<random>", tls_worker_cert=f"{where}.cert.<random>",
                tls_worker_key=f"{where}.key.<random>", require_encryption=True)
            job_kwargs["protocol"] = "tls://"
            scheduler = scheduler.replace("tcp://", "tls://")
        try:
            job = self.job_cls(scheduler=scheduler, name="<worker-name>", **job_kwargs)
        except (TypeError, ValueError) as exc:
            raise ClusterError(f"invalid {self.title} job settings: {exc}") from exc
        return job.job_script()

    def make_cluster(self, *, min_jobs, max_jobs, quiet=False, log_directory=None, tls=None,
                     **resolve_kwargs):
        """The dask-jobqueue cluster, adaptive between *min_jobs* and *max_jobs* jobs.

        *log_directory*: where the jobs' output files go unless ``log-directory`` is configured
        (the CLI passes one beside the store; dask-jobqueue's default is the working directory).
        *tls* (default: config ``gmp-pipeline.cluster.jobqueue.tls``, true): scheduler, workers
        and client talk TLS with credentials made for this run (``Security.temporary()``), so
        nobody else on the cluster network can connect to the scheduler and run code as you.
        The workers read them from files (mode 0600) in ``shared-temp-directory`` if
        configured, else in *log_directory*, else in a private directory under
        ``~/.cache/gmp-pipeline``; they are removed when the cluster closes.
        """
        job_kwargs, cluster_kwargs = self.resolve(**resolve_kwargs)
        if min_jobs is None:
            min_jobs = int(dask.config.get("gmp-pipeline.cluster.jobqueue.min-jobs", 1))
        if max_jobs is None:
            max_jobs = int(dask.config.get("gmp-pipeline.cluster.jobqueue.max-jobs", 10))
        if min_jobs < 0 or max_jobs < 1 or max_jobs < min_jobs:
            raise ClusterError(f"need 0 <= min_jobs <= max_jobs and max_jobs >= 1, got "
                               f"min_jobs={min_jobs}, max_jobs={max_jobs}")
        self.preflight()
        self.fit_to_nodes(job_kwargs)
        interface = job_kwargs.pop("interface", None)
        if job_kwargs.get("log_directory") is None and log_directory is not None:
            job_kwargs["log_directory"] = _private_dir(log_directory)
        if "dashboard_address" not in cluster_kwargs["scheduler_options"]:
            from .local import dashboard_address

            cluster_kwargs["scheduler_options"]["dashboard_address"] = dashboard_address(
                dask.config.get("gmp-pipeline.cluster.jobqueue.dashboard-address",
                                "127.0.0.1:8787"))
        if tls is None:
            tls = dask.config.get("gmp-pipeline.cluster.jobqueue.tls", True)
        credentials_dir = None
        if _truthy(tls):
            from distributed.security import Security

            try:
                cluster_kwargs["security"] = Security.temporary()
            except ImportError as exc:
                raise ClusterError("TLS for the batch cluster needs the `cryptography` package "
                                   "(pip install cryptography), or set "
                                   "gmp-pipeline.cluster.jobqueue.tls: false") from exc
            if not cluster_kwargs.get("shared_temp_directory"):
                if log_directory is not None:
                    cluster_kwargs["shared_temp_directory"] = _private_dir(log_directory)
                else:
                    import tempfile

                    base = _private_dir(os.path.join(os.path.expanduser("~"), ".cache",
                                                     "gmp-pipeline"))
                    credentials_dir = tempfile.mkdtemp(prefix="tls-", dir=base)
                    cluster_kwargs["shared_temp_directory"] = credentials_dir
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Port .* is already in use")
                cluster = self.cluster_cls(interface=interface, **cluster_kwargs, **job_kwargs)
        except ValueError as exc:
            raise ClusterError(f"could not create the {self.title} cluster: {exc}") from exc
        cluster._gmp_cleanup = functools.partial(_remove_credentials, cluster, credentials_dir)
        try:
            cluster.adapt(minimum_jobs=min_jobs, maximum_jobs=max_jobs)
        except Exception:
            cluster.close()
            raise
        warn_after = dask.config.get("gmp-pipeline.cluster.jobqueue.no-worker-warning", "60s")
        if warn_after:
            from dask.utils import parse_timedelta

            cluster._gmp_watchdog = NoWorkerWatchdog(self, cluster, parse_timedelta(warn_after))
        if not quiet:
            per_job = job_kwargs.get("processes", 1)
            logger.info(f"gmp-pipeline: {self.title} cluster, scheduler "
                        f"{cluster.scheduler_address}, dashboard {cluster.dashboard_link}; "
                        f"adapting between {min_jobs} and {max_jobs} {self.submit_command} "
                        f"jobs of {per_job} worker(s)")
        return cluster


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off", "none")
    return bool(value)


def _private_dir(path) -> str:
    """*path* created if missing (mode 0700 when this creates it); its absolute path."""
    path = os.path.abspath(os.path.expanduser(os.path.expandvars(str(path))))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"cannot create the directory {path}: {exc}") from exc
    return path


def _remove_credentials(cluster, credentials_dir=None) -> None:
    """Delete the TLS credential files dask-jobqueue wrote for the job scripts."""
    for name in list(vars(cluster)):
        if name.startswith("_job_"):
            handle = getattr(cluster, name, None)
            close = getattr(handle, "close", None)
            if close is not None:
                try:
                    close()     # NamedTemporaryFile: closing deletes the file
                except OSError:
                    pass
    if credentials_dir:
        shutil.rmtree(credentials_dir, ignore_errors=True)


class NoWorkerWatchdog:
    """Tell the user (stderr) when no worker has connected for a while, and why jobs wait.

    Batch systems accept jobs they cannot start yet (busy queue) or ever (a job larger than any
    node stays PENDING with reason PartitionConfig / Resources); without this a run just hangs.
    Warns after *after* seconds without any worker, then again at doubling intervals.
    """

    def __init__(self, scheduler: Scheduler, cluster, after: float):
        self.scheduler, self.cluster, self.after = scheduler, cluster, float(after)
        self.gave_up = None     # the reason, once it interrupted the main thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gmp-no-worker-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()

    def _n_workers(self) -> int:
        try:
            return len(self.cluster.scheduler_info.get("workers", {}))
        except Exception:  # noqa: BLE001 - cluster closing
            return 0

    def _job_states(self) -> str:
        ids = [j.job_id for j in list(self.cluster.workers.values())
               if getattr(j, "job_id", None)]
        if not ids:
            return "no job was submitted (see the errors above)"
        if self.scheduler.status_cmd is None:
            return f"jobs {', '.join(ids)}"
        try:
            proc = subprocess.run(self.scheduler.status_cmd(ids), capture_output=True, text=True,
                                  timeout=30, stdin=subprocess.DEVNULL)
            text = (proc.stdout or proc.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"(could not ask: {exc})"
        return f"jobs {', '.join(ids)}: " + ("; ".join(text.splitlines()) or "not listed")

    def _run(self):
        since = time.monotonic()
        wait = self.after
        while not self._stop.wait(2.0):
            if self._n_workers():
                since, wait = time.monotonic(), self.after
                continue
            idle = time.monotonic() - since
            if idle >= wait:
                states = self._job_states()
                logger.warning(f"gmp-pipeline: no Dask worker connected for {idle:.0f} s; "
                               f"{states}")
                if states.startswith("no job was submitted") and wait > self.after:
                    # every submission failed twice over: waiting longer cannot help
                    logger.error(f"gmp-pipeline: giving up: no {self.scheduler.title} job "
                                 f"could be submitted (see the {self.scheduler.submit_command} "
                                 "errors above)")
                    self.gave_up = (f"no {self.scheduler.title} job could be submitted (see "
                                    f"the {self.scheduler.submit_command} errors above)")
                    import _thread

                    _thread.interrupt_main()
                    return
                wait *= 2
