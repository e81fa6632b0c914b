"""An incomplete store read as it stands: the structures of the tasks that have finished.

Until a run's assembly, a store's structure- and atom-level arrays exist only as the tasks'
staged results (``_staging/tasks/t*/arrays.npz``); the derivative rows are already in
``pairs/dfeatures``, each task's in its own region.  :func:`staged_arrays` presents exactly
the finished tasks, in plan order, as arrays the reader can slice like the assembled ones.
"""
from __future__ import annotations

import numpy as np

from .staging import StagedTasks, finished_tasks, load_plan


class PieceArray:
    """Rows of several arrays laid end to end, at given row offsets, with ``fill`` between
    them: read by slices like a zarr array (``shape``, ``chunks``, ``dtype``, ``[a:b]``)."""

    CHUNK_ROWS = 1 << 16

    def __init__(self, pieces: list[tuple[int, np.ndarray]], n_rows: int, fill, like=None):
        self.pieces = [(int(b), p) for b, p in pieces if p.shape[0]]
        self.bases = np.array([b for b, _ in self.pieces], dtype=np.int64)
        ref = self.pieces[0][1] if self.pieces else like
        self.dtype = ref.dtype
        self.shape = (int(n_rows),) + tuple(ref.shape[1:])
        self.chunks = (self.CHUNK_ROWS,) + tuple(ref.shape[1:])
        self.fill = fill

    def __getitem__(self, sl):
        if not isinstance(sl, slice):
            raise TypeError("PieceArray takes row slices")
        a, b, _ = sl.indices(self.shape[0])
        out = np.full((max(0, b - a),) + self.shape[1:], self.fill, dtype=self.dtype)
        k = max(int(np.searchsorted(self.bases, a, side="right")) - 1, 0)
        while k < len(self.pieces) and self.pieces[k][0] < b:
            base, p = self.pieces[k]
            lo, hi = max(a, base), min(b, base + p.shape[0])
            if hi > lo:
                out[lo - a:hi - a] = p[lo - base:hi - base]
            k += 1
        return out


def staged_arrays(path, dfeatures_array=None) -> tuple[dict, int] | None:
    """({array path: PieceArray}, number of finished tasks) for the finished tasks of the
    incomplete store at ``path``, or None when it has no plan.  ``dfeatures_array``: the store's
    ``pairs/dfeatures`` (its rows stay where the tasks wrote them; ``atoms/pair_start`` and
    ``pairs/neighbor`` are laid out to match)."""
    plan = load_plan(path)
    if plan is None:
        return None
    done = sorted(finished_tasks(path))
    staged = StagedTasks(path)
    tasks = [staged.arrays(t) for t in done]
    pair_base = plan.get("pair_base") or [0] * (len(plan["tasks"]) + 1)
    pieces: dict[str, list] = {}
    like: dict[str, np.ndarray] = {}
    n_struct = n_atoms = 0
    for t, arrays in zip(done, tasks):
        for p, a in arrays.items():
            like.setdefault(p, a[:0])
        ns = int(arrays["structures/n_atoms"].shape[0])
        counts = arrays["structures/n_atoms"].astype(np.int64)
        na = int(counts.sum())
        start = np.zeros(ns, dtype=np.int64)
        np.cumsum(counts[:-1], out=start[1:])
        pieces.setdefault("structures/atom_start", []).append((n_struct, start + n_atoms))
        for p, a in arrays.items():
            level = p.split("/", 1)[0]
            if level == "structures":
                pieces.setdefault(p, []).append((n_struct, a))
            elif level == "atoms":
                pieces.setdefault(p, []).append((n_atoms, a))
            elif p == "pairs/neighbor":
                pieces.setdefault(p, []).append((int(pair_base[t]), a))
        if "atoms/pair_count" in arrays:
            pc = arrays["atoms/pair_count"].astype(np.int64)
            ps = np.zeros(pc.size, dtype=np.int64)
            np.cumsum(pc[:-1], out=ps[1:])
            pieces.setdefault("atoms/pair_start", []).append((n_atoms, ps + int(pair_base[t])))
        n_struct += ns
        n_atoms += na
    like.setdefault("structures/atom_start", np.zeros(0, dtype=np.int64))
    like.setdefault("atoms/pair_start", np.zeros(0, dtype=np.int64))
    out = {}
    for p, parts in pieces.items():
        level = p.split("/", 1)[0]
        n = {"structures": n_struct, "atoms": n_atoms}.get(level)
        if n is None:               # pairs/neighbor: as long as pairs/dfeatures
            n = dfeatures_array.shape[0] if dfeatures_array is not None else pair_base[-1]
        fill = -1 if p == "pairs/neighbor" else 0
        out[p] = PieceArray(parts, n, fill, like.get(p))
    return out, len(done)
