"""Configuration of the cluster layer, kept in dask.config.

Priority, lowest first:

1. dask-jobqueue's own ``jobqueue.yaml`` defaults;
2. ``gmp-pipeline.yaml`` shipped in this package (loaded below with :func:`dask.config.update_defaults`);
3. the usual dask config places (``~/.config/dask/``, ``DASK_CONFIG``) and ``DASK_...``
   environment variables, e.g. ``DASK_JOBQUEUE__SLURM__ACCOUNT=myproj``;
4. a file passed as ``cluster_config`` (``--cluster-config FILE``);
5. explicit arguments of :func:`gmp_pipeline.clusters.start_cluster`.
"""
from __future__ import annotations

import os
from pathlib import Path

import dask
import yaml

from .._signals import keep_signal_handlers
from ..errors import ClusterError

# registers dask-jobqueue's defaults first; its runner module replaces the SIGINT handler by
# `lambda *_: sys.exit()` (Ctrl-C would exit with status 0), which this puts back
with keep_signal_handlers():
    import dask_jobqueue  # noqa: F401

DEFAULTS_FILE = Path(__file__).with_name("gmp-pipeline.yaml")


def _load_defaults() -> dict:
    with open(DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)
    return defaults


DEFAULTS = _load_defaults()


def load_cluster_config(path) -> dict:
    """Read a ``--cluster-config`` YAML file into a dask config mapping.

    The file may be a dask-jobqueue config (top-level ``jobqueue:``), or contain the scheduler
    sections directly (top-level ``slurm:`` / ``pbs:`` ...), which are put under ``jobqueue``.
    Other top-level keys (``distributed:``, ``gmp-pipeline:``) are kept as dask config.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ClusterError(f"cluster config file {str(path)!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ClusterError(f"cluster config file {str(path)!r} is not valid YAML: {exc}") from exc
    return normalize_cluster_config(data, f"cluster config file {str(path)!r}")


def normalize_cluster_config(data, what: str = "cluster config") -> dict:
    """Put top-level scheduler sections (``slurm:`` ...) under ``jobqueue``."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClusterError(f"{what} must hold a mapping at top level, "
                           f"got {type(data).__name__}")
    out: dict = {}
    for key, value in data.items():
        if key in ("slurm", "pbs", "sge", "lsf", "oar", "moab", "htcondor"):
            out.setdefault("jobqueue", {})[key] = value
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- walltime

def parse_walltime(value, kind: str) -> int:
    """Seconds in a walltime as the scheduler *kind* reads it.

    slurm: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``;
    pbs/sge: ``S``, ``M:S``, ``H:M:S``; lsf: ``M``, ``H:M``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # a bare number: minutes for slurm and lsf, seconds for pbs and sge
        return int(value * 60) if kind in ("slurm", "lsf") else int(value)
    text = str(value).strip()
    bad = ClusterError(f"walltime {value!r} is not a valid {kind} walltime "
                       f"(expected e.g. '01:00:00')")
    days = 0
    if kind == "slurm" and "-" in text:
        d, _, text = text.partition("-")
        if not d.isdigit():
            raise bad
        days = int(d)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise bad
    nums = [int(p) for p in parts]
    if kind == "slurm":
        if days:
            # D-H, D-H:M, D-H:M:S
            nums = nums + [0] * (3 - len(nums))
            h, m, s = nums
        elif len(nums) == 1:
            h, m, s = 0, nums[0], 0
        elif len(nums) == 2:
            h, m, s = 0, nums[0], nums[1]
        else:
            h, m, s = nums
    elif kind == "lsf":
        if len(nums) == 3:
            raise bad
        h, m, s = (0, nums[0], 0) if len(nums) == 1 else (nums[0], nums[1], 0)
    else:
        nums = [0] * (3 - len(nums)) + nums
        h, m, s = nums
    return ((days * 24 + h) * 60 + m) * 60 + s


def _seconds(value, what: str) -> int:
    from dask.utils import parse_timedelta

    try:
        return int(parse_timedelta(value, default="s"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{what} {value!r} is not a duration (e.g. '50m', '3000s')") from exc


def worker_lifetime(walltime, lifetime, stagger, kind: str) -> tuple[int, int] | None:
    """(lifetime, stagger) in seconds for ``dask worker --lifetime/--lifetime-stagger``.

    A worker then retires after ``lifetime ± stagger``, which must end before the walltime so
    the batch system never kills a worker in the middle of a task.  ``"auto"`` picks a stagger
    of 5% of the walltime (30 s to 5 min) and leaves a safety margin of 10% (1 to 10 min).
    ``lifetime`` false/"off"/"none" disables it.  Returns None when disabled.
    """
    if lifetime in (False, "off", "none", "false") or (lifetime is None and stagger is None):
        return None
    if walltime is None:
        if lifetime in (None, "auto"):
            return None
        wall = None
    else:
        wall = parse_walltime(walltime, kind)
    if stagger in (None, "auto"):
        stagger_s = int(min(300, max(30, 0.05 * wall))) if wall else 0
    else:
        stagger_s = _seconds(stagger, "lifetime-stagger")
    if lifetime in (None, "auto"):
        margin = int(min(600, max(60, 0.10 * wall)))
        life_s = wall - margin - stagger_s
        if life_s <= 0:
            raise ClusterError(f"walltime {walltime!r} is too short to give workers a lifetime "
                               f"(needs more than {margin + stagger_s} s); set lifetime: off "
                               f"or a longer walltime")
    else:
        life_s = _seconds(lifetime, "lifetime")
    if wall is not None and life_s + stagger_s >= wall:
        raise ClusterError(
            f"worker lifetime {lifetime!r} + lifetime-stagger {stagger!r} "
            f"({life_s + stagger_s} s) must end before walltime {walltime!r} ({wall} s), "
            f"otherwise the batch system kills workers mid-task")
    return life_s, stagger_s


def parse_memory(value, what: str = "memory") -> int:
    """Bytes in a memory string; a ClusterError naming the key when it cannot be read."""
    from dask.utils import parse_bytes

    if value is None:
        raise ClusterError(f"{what} is not set: give the memory per job, e.g. memory: 16GiB")
    try:
        n = parse_bytes(value)
    except (ValueError, TypeError) as exc:
        raise ClusterError(f"{what} {value!r} is not a memory size (use e.g. '16GiB' or '4000MB')"
                           ) from exc
    if n <= 0:
        raise ClusterError(f"{what} {value!r} must be positive")
    return n


def flatten(mapping: dict, prefix: str = "") -> dict:
    """Nested config -> dotted keys, so ``dask.config.set`` merges instead of replacing."""
    out = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
