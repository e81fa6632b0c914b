"""Planning a run: contiguous structure ranges balanced by atom count (the tasks)."""
from __future__ import annotations

import math

import numpy as np

from ..config import knob
from ..errors import InputError


def plan_tasks(n_atoms, *, n_workers: int = 1, chunk_size: int | None = None,
               tasks_per_worker: int | None = None) -> list[tuple[int, int]]:
    """Split structures ``0..len(n_atoms)`` into contiguous ranges balanced by atom count.

    ``chunk_size``: about this many structures per task (the atom target is ``chunk_size`` times
    the mean atom count, so tasks stay balanced by atoms), all of one size.  Default:
    ``tasks_per_worker`` (knob ``pipeline.tasks-per-worker``) tasks per worker, each between
    knobs ``pipeline.min-task-atoms`` and ``pipeline.max-task-atoms`` atoms; with several
    workers the last round of work is cut into tasks of a half and then a quarter of that size
    (run last), so that workers finish close together instead of one idling while another runs
    a whole task.
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
        per_worker = int(knob("pipeline.tasks-per-worker") if tasks_per_worker is None
                         else tasks_per_worker)
        lo, hi = int(knob("pipeline.min-task-atoms")), int(knob("pipeline.max-task-atoms"))
        target = total / max(1, n_workers * per_worker)
        target = min(max(target, lo), hi)
        n_tasks = max(1, min(n, int(round(total / target))))
        sizes = [1.0] * n_tasks
        if n_workers > 1 and n_tasks > n_workers and target >= 2 * lo:
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


__all__ = ["plan_tasks"]
