"""Reading a ``gmp-features`` store from training code.

>>> store = open_store("ethanol.zarr")                    # doctest: +SKIP
>>> len(store), store.feature_list[:2]                    # doctest: +SKIP
>>> s = store[0]            # dict of numpy arrays for structure 0
>>> batch = store.get_batch([3, 1, 4])                    # one read per touched chunk
>>> ds = store.torch_dataset()                 # needs torch (see :mod:`.torch`)    # doctest: +SKIP

Every structure dict has ``features`` (n, M), ``numbers`` (n,), ``positions`` (n, 3), ``forces``
(n, 3; NaN when the source has none), ``energy`` (0-d; NaN when absent), ``cell`` (3, 3), ``pbc``
(3,), ``source_index`` (0-d) and, for a store written with derivatives, ``pair_center`` and
``pair_neighbor`` (p,) structure-local atom indices and ``dfeatures`` (p, 3, M) with
``dfeatures[k, x, m] = d features[pair_center[k], m] / d positions[pair_neighbor[k], x]``.
Source extras (``tags``, ``sid``, QM9 properties, ...) are included under their source names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import StoreError
from .layout import FORMAT_NAME, FORMAT_VERSION, LEVELS, quiet_zarr, read_root_attrs

_STRUCT_KEYS = {"energy": "structures/energy", "cell": "structures/cell",
                "pbc": "structures/pbc", "source_index": "structures/source_index"}
_ATOM_KEYS = {"numbers": "atoms/numbers", "positions": "atoms/positions",
              "forces": "atoms/forces", "features": "atoms/features"}


def open_store(path, *, allow_incomplete: bool = False) -> "FeatureStore":
    """Open the store at ``path`` for reading (see :class:`FeatureStore`)."""
    return FeatureStore(path, allow_incomplete=allow_incomplete)


def _merge_ranges(ranges: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for a, b in sorted((a, b) for a, b in ranges if b > a):
        if spans and a - spans[-1][1] <= gap:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return [(a, b) for a, b in spans]


def _read_ranges(arr, ranges: Sequence[tuple[int, int]], gap: int) -> list[np.ndarray]:
    """``[arr[a:b] for a, b in ranges]``, reading each merged span of nearby ranges once."""
    spans = _merge_ranges(ranges, gap)
    blocks = [np.asarray(arr[a:b]) for a, b in spans]
    starts = np.array([a for a, _ in spans], dtype=np.int64)
    out = []
    for a, b in ranges:
        if b <= a:
            out.append(np.zeros((0,) + tuple(arr.shape[1:]), dtype=blocks[0].dtype
                                if blocks else arr.dtype.to_native_dtype()
                                if hasattr(arr.dtype, "to_native_dtype") else np.float64))
            continue
        k = int(np.searchsorted(starts, a, side="right")) - 1
        out.append(blocks[k][a - starts[k]:b - starts[k]])
    return out


class FeatureStore:
    """A complete ``gmp-features`` store opened for reading.

    ``len(store)`` structures; ``store[i]`` a dict of numpy arrays (see the module docstring);
    ``store.get_batch(indices)`` the same for many structures, reading each touched chunk once;
    ``store.torch_dataset()`` a :class:`torch.utils.data.Dataset` view.  ``store.attrs`` is the
    root metadata (feature_config, source, units, counts, ...); ``store.root`` the zarr group.

    An incomplete store (a run that was interrupted) is refused unless ``allow_incomplete``.
    """

    def __init__(self, path, *, allow_incomplete: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.allow_incomplete = bool(allow_incomplete)
        attrs = read_root_attrs(self.path) if Path(self.path).is_dir() else None
        if attrs is None:
            raise StoreError(f"{self.path} is not a Zarr v3 store (no zarr.json)")
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path} is not a {FORMAT_NAME} store "
                             f"(format {attrs.get('format')!r})")
        if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise StoreError(f"{self.path} has format_version {attrs.get('format_version')}; "
                             f"this gmp-pipeline reads up to {FORMAT_VERSION} (upgrade it)")
        if not attrs.get("complete") and not allow_incomplete:
            raise StoreError(f"{self.path} is incomplete (its run was interrupted or failed); "
                             "rerun the same featurize command to finish it, or pass "
                             "allow_incomplete=True to read what is there")
        self.attrs = attrs
        self._open()

    def _open(self):
        import zarr

        with quiet_zarr():
            self.root = zarr.open_group(self.path, mode="r")
            self._arrays = {}
            for level in LEVELS:
                if level in self.root:
                    for name, arr in self.root[level].arrays():
                        self._arrays[f"{level}/{name}"] = arr
        if "structures/n_atoms" not in self._arrays:
            raise StoreError(f"{self.path} has no arrays yet (its run stopped before assembly)")
        self._n_atoms = np.asarray(self._arrays["structures/n_atoms"][:], dtype=np.int64)
        self._atom_start = np.asarray(self._arrays["structures/atom_start"][:], dtype=np.int64)
        self.has_derivatives = "pairs/dfeatures" in self._arrays
        extras = self.attrs.get("extras", {})
        self._extras = {**extras.get("info", {}), **extras.get("atom_info", {})}

    def __getstate__(self):
        return {"path": self.path, "allow_incomplete": self.allow_incomplete,
                "attrs": self.attrs}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    # -- metadata -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._n_atoms.size)

    def __repr__(self) -> str:
        c = self.attrs.get("counts", {})
        return (f"FeatureStore({self.path!r}, {len(self)} structures, {c.get('n_atoms')} atoms, "
                f"{self.n_features} features, derivatives={self.has_derivatives})")

    @property
    def feature_list(self) -> list[tuple[int, float]]:
        return [(int(o), float(s)) for o, s in self.attrs["feature_list"]]

    @property
    def n_features(self) -> int:
        return len(self.attrs["feature_list"])

    @property
    def feature_config(self) -> dict:
        return dict(self.attrs["feature_config"])

    @property
    def units(self) -> dict:
        return dict(self.attrs.get("units", {}))

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def n_atoms(self) -> np.ndarray:
        """(len(store),) atom counts."""
        return self._n_atoms.copy()

    def array(self, path: str):
        """The zarr array at ``path`` (e.g. ``"atoms/features"``)."""
        return self._arrays[path]

    # -- access -------------------------------------------------------------------------------
    def _index(self, i) -> int:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"structure index {i} out of range for a store of {n}")
        return i

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        if isinstance(i, slice):
            return self.get_batch(range(*i.indices(len(self))))
        return self.get_batch([i])[0]

    def __iter__(self):
        for lo in range(0, len(self), 256):
            yield from self.get_batch(range(lo, min(lo + 256, len(self))))

    def get_batch(self, indices: Iterable[int]) -> list[dict[str, np.ndarray]]:
        """Structure dicts for ``indices`` (any order, repeats allowed), reading each touched
        chunk once."""
        idx = [self._index(i) for i in indices]
        if not idx:
            return []
        arrs = self._arrays
        uniq = np.unique(idx)
        where = {int(s): k for k, s in enumerate(uniq)}
        # structure-level rows: one orthogonal read per array
        srows = {}
        for key, path in _STRUCT_KEYS.items():
            srows[key] = np.asarray(arrs[path].oindex[uniq])
        for name, path in self._extras.items():
            if path.startswith("structures/") and path in arrs:
                srows[name] = np.asarray(arrs[path].oindex[uniq])
        # atom-level rows
        aranges = [(int(self._atom_start[s]), int(self._atom_start[s] + self._n_atoms[s]))
                   for s in uniq]
        arows = {}
        for key, path in _ATOM_KEYS.items():
            if path in arrs:
                arows[key] = _read_ranges(arrs[path], aranges, arrs[path].chunks[0])
        for name, path in self._extras.items():
            if path.startswith("atoms/") and path in arrs:
                arows[name] = _read_ranges(arrs[path], aranges, arrs[path].chunks[0])
        if self.has_derivatives:
            pstart = _read_ranges(arrs["atoms/pair_start"], aranges,
                                  arrs["atoms/pair_start"].chunks[0])
            pcount = _read_ranges(arrs["atoms/pair_count"], aranges,
                                  arrs["atoms/pair_count"].chunks[0])
            pranges = [(int(ps[0]), int(ps[0] + pc.sum())) if ps.size else (0, 0)
                       for ps, pc in zip(pstart, pcount)]
            neigh = _read_ranges(arrs["pairs/neighbor"], pranges, arrs["pairs/neighbor"].chunks[0])
            dfeat = _read_ranges(arrs["pairs/dfeatures"], pranges,
                                 arrs["pairs/dfeatures"].chunks[0])
        out_unique = []
        for k, s in enumerate(uniq):
            n = int(self._n_atoms[s])
            d: dict[str, np.ndarray] = {"index": np.asarray(int(s))}
            for key, vals in srows.items():
                d[key] = vals[k]
            for key, vals in arows.items():
                d[key] = vals[k]
            if "forces" not in d:
                d["forces"] = np.full((n, 3), np.nan)
            if self.has_derivatives:
                d["pair_center"] = np.repeat(np.arange(n, dtype=np.int64), pcount[k])
                d["pair_neighbor"] = neigh[k].astype(np.int64)
                d["dfeatures"] = dfeat[k]
            out_unique.append(d)
        return [out_unique[where[i]] for i in idx]

    # -- torch --------------------------------------------------------------------------------
    def torch_dataset(self, indices: Sequence[int] | None = None, *, dtype=None):
        """A :class:`torch.utils.data.Dataset` over this store (``indices``: a subset).

        Use with :func:`collate_energy_forces`.  Raises ImportError when torch is missing.
        """
        from .torch import make_torch_dataset

        return make_torch_dataset(self, indices, dtype=dtype)
