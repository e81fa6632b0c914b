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
from ._rowcache import ChunkCache
from .layout import FORMAT_NAME, FORMAT_VERSION, LEVELS, quiet_zarr, read_root_attrs



def open_store(path, *, allow_incomplete: bool = False, cache_bytes: int | None = None
               ) -> "FeatureStore":
    """Open the store at ``path`` for reading (see :class:`FeatureStore`)."""
    return FeatureStore(path, allow_incomplete=allow_incomplete,
                        cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)


def _is_text(arr) -> bool:
    dt = arr.dtype
    kind = getattr(dt, "kind", None)
    if kind is None:
        try:
            kind = np.dtype(dt.to_native_dtype()).kind
        except Exception:  # noqa: BLE001 - zarr's own string dtype
            return True
    return kind in "USOT"


def _copy(d: dict) -> dict:
    return {k: v.copy() for k, v in d.items()}


#: default byte budget of an open store's chunk cache (see :class:`FeatureStore`)
DEFAULT_CACHE_BYTES = 512 << 20

#: output fields and the array each comes from; ``dfeatures`` also gives ``pair_center`` and
#: ``pair_neighbor``
_CORE = {"energy": "structures/energy", "cell": "structures/cell", "pbc": "structures/pbc",
         "source_index": "structures/source_index", "numbers": "atoms/numbers",
         "positions": "atoms/positions", "forces": "atoms/forces",
         "features": "atoms/features"}


class FeatureStore:
    """A complete ``gmp-features`` store opened for reading.

    ``len(store)`` structures; ``store[i]`` a dict of numpy arrays (see the module docstring);
    ``store.get_batch(indices, fields=...)`` the same for many structures;
    ``store.torch_dataset()`` a :class:`torch.utils.data.Dataset` view; ``store.fields`` the
    field names a structure dict can have.  ``store.attrs`` is the root metadata
    (feature_config, source, units, counts, ...); ``store.root`` the zarr group.

    Reading is built for training loops: the per-structure index arrays (``n_atoms``,
    ``atom_start``) are held in memory once per open store, only the fields asked for are read,
    and every decoded chunk is kept in a cache of ``cache_bytes`` (default 512 MiB; 0 turns it
    off) so that random and shuffled access decode each chunk about once.  Text extras (QM9
    SMILES, frequencies, ...) are only read when named in ``fields``.

    An incomplete store (a run that was interrupted) is refused unless ``allow_incomplete``;
    then it holds exactly the structures of the tasks that finished (``len()`` says how many,
    ``finished_tasks`` how many tasks), in plan order: their ``source_index`` says which
    records they are.
    """

    def __init__(self, path, *, allow_incomplete: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = os.path.abspath(os.fspath(path))
        self.allow_incomplete = bool(allow_incomplete)
        self.cache_bytes = int(cache_bytes)
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
        self.finished_tasks = None
        if not self.complete:
            # before assembly only the finished tasks' staged results hold the structures
            from ._staged_view import staged_arrays

            view = staged_arrays(self.path, self._arrays.get("pairs/dfeatures"))
            if view is not None:
                staged, self.finished_tasks = view
                self._arrays.update(staged)
        if "structures/n_atoms" not in self._arrays:
            raise StoreError(f"{self.path} has no arrays yet (its run stopped before assembly)")
        self._n_atoms = np.asarray(self._arrays["structures/n_atoms"][:], dtype=np.int64)
        self._atom_start = np.asarray(self._arrays["structures/atom_start"][:], dtype=np.int64)
        self.has_derivatives = "pairs/dfeatures" in self._arrays
        extras = self.attrs.get("extras", {})
        self._extras = {**extras.get("info", {}), **extras.get("atom_info", {})}
        self._sources = {k: p for k, p in _CORE.items() if p in self._arrays}
        self._sources.update({k: p for k, p in self._extras.items() if p in self._arrays})
        self._text = {k for k, p in self._sources.items() if _is_text(self._arrays[p])}
        self._cache = ChunkCache(self.cache_bytes)

    def __getstate__(self):
        return {"path": self.path, "allow_incomplete": self.allow_incomplete,
                "cache_bytes": self.cache_bytes, "attrs": self.attrs}

    def __setstate__(self, state):
        state.setdefault("cache_bytes", DEFAULT_CACHE_BYTES)
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
    def derivative_atoms(self) -> str:
        """``"all"``: the pairs hold dF_i/dr_j for every neighbour j; ``"free"``: only for free
        atoms j (per-atom ``fixed`` == 0), so forces come out right on free atoms only."""
        return str(self.attrs.get("options", {}).get("derivative_atoms", "all"))

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def fields(self) -> list[str]:
        """Every field a structure dict can have (``index`` is always there; ``forces`` is NaN
        when the source has none; ``dfeatures`` comes with ``pair_center``/``pair_neighbor``)."""
        names = ["index"] + list(self._sources)
        if "forces" not in names:
            names.append("forces")
        if self.has_derivatives:
            names += ["pair_center", "pair_neighbor", "dfeatures"]
        return names

    @property
    def text_fields(self) -> list[str]:
        """The text extras, read only when named in ``fields``."""
        return sorted(self._text)

    def n_atoms(self) -> np.ndarray:
        """(len(store),) atom counts."""
        return self._n_atoms.copy()

    def atom_start(self) -> np.ndarray:
        """(len(store),) first row of each structure in ``atoms/*``."""
        return self._atom_start.copy()

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

    def _resolve_fields(self, fields) -> tuple[list[str], bool]:
        """(source fields to read, whether to read the derivative pairs)."""
        if fields is None:
            wanted = [k for k in self._sources if k not in self._text]
            return wanted + (["forces"] if "forces" not in wanted else []), self.has_derivatives
        if isinstance(fields, str):
            if fields == "all":
                names = list(self._sources)
                return names + (["forces"] if "forces" not in names else []), \
                    self.has_derivatives
            fields = [fields]
        fields = list(fields)
        known = set(self.fields)
        unknown = [f for f in fields if f not in known]
        if unknown:
            raise StoreError(f"{self.path}: no field {', '.join(map(repr, unknown))}; this store "
                             f"has {', '.join(self.fields)}")
        deriv = any(f in ("dfeatures", "pair_center", "pair_neighbor") for f in fields)
        return [f for f in fields if f in self._sources or f == "forces"], deriv

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        if isinstance(i, slice):
            return self.get_batch(range(*i.indices(len(self))))
        return self.get_batch([i])[0]

    def __iter__(self):
        for lo in range(0, len(self), 256):
            yield from self.get_batch(range(lo, min(lo + 256, len(self))))

    def read_columns(self, indices: Iterable[int], fields=None, *, copy: bool = True):
        """The batch read under :meth:`get_batch`, as columns (for adapters that convert a
        whole batch at once, such as the torch dataset).

        Returns ``(uniq, inverse, columns)``: the sorted distinct structure indices, the
        position in ``uniq`` of every requested index, and ``{field: value}`` where a
        structure-level field is an array with one row per entry of ``uniq`` and an atom- or
        pair-level field is a list of per-structure arrays (``uniq`` order).  ``copy=False``
        lets those be read-only views of cached chunks, for a caller that copies them at once.
        """
        idx = np.fromiter((self._index(i) for i in indices), dtype=np.int64)
        names, deriv = self._resolve_fields(fields)
        uniq, inverse = np.unique(idx, return_inverse=True)
        arrs, cache = self._arrays, self._cache
        n_at = self._n_atoms[uniq]
        a0 = self._atom_start[uniq]
        a1 = a0 + n_at
        cols: dict = {"index": uniq.copy()}
        for name in names:
            path = self._sources.get(name)
            if path is None:            # forces of a source without forces
                cols[name] = [np.full((int(n), 3), np.nan) for n in n_at]
            elif path.startswith("structures/"):
                cols[name] = cache.take(path, arrs[path], uniq)
            else:
                arr = arrs[path]
                cols[name] = [cache.rows(path, arr, int(a), int(b), copy)
                              for a, b in zip(a0, a1)]
        if deriv:
            ps, pc = arrs["atoms/pair_start"], arrs["atoms/pair_count"]
            nb, df = arrs["pairs/neighbor"], arrs["pairs/dfeatures"]
            centers, neighbors, dfeats = [], [], []
            for a, b, n in zip(a0, a1, n_at):
                a, b, n = int(a), int(b), int(n)
                count = cache.rows("atoms/pair_count", pc, a, b)
                if n:
                    p0 = int(cache.rows("atoms/pair_start", ps, a, a + 1)[0])
                    p1 = p0 + int(count.sum())
                else:
                    p0 = p1 = 0
                centers.append(np.repeat(np.arange(n, dtype=np.int64), count))
                neighbors.append(cache.rows("pairs/neighbor", nb, p0, p1, False)
                                 .astype(np.int64))
                dfeats.append(cache.rows("pairs/dfeatures", df, p0, p1, copy))
            cols["pair_center"], cols["pair_neighbor"] = centers, neighbors
            cols["dfeatures"] = dfeats
        if self.cache_bytes <= 0:
            cache.clear()
        return uniq, inverse, cols

    def get_batch(self, indices: Iterable[int], fields=None) -> list[dict[str, np.ndarray]]:
        """Structure dicts for ``indices`` (any order, repeats allowed).

        ``fields``: the names to include (see :attr:`fields`), ``"all"`` for every field, or
        None (default) for every field except the text extras.  ``index`` is always included.
        """
        uniq, inverse, cols = self.read_columns(indices, fields)
        if not uniq.size:
            return []
        index = cols.pop("index")
        out_unique = []
        keys = list(cols)
        for k in range(uniq.size):
            d: dict[str, np.ndarray] = {"index": np.asarray(int(index[k]))}
            for key in keys:
                d[key] = cols[key][k]
            out_unique.append(d)
        if inverse.size == uniq.size and np.all(np.diff(inverse) > 0):
            return out_unique
        seen: set[int] = set()
        out = []
        for k in inverse.tolist():      # a repeated index gets its own copy
            out.append(_copy(out_unique[k]) if k in seen else out_unique[k])
            seen.add(k)
        return out

    # -- torch --------------------------------------------------------------------------------
    def torch_dataset(self, indices: Sequence[int] | None = None, *, dtype=None, fields=None):
        """A :class:`torch.utils.data.Dataset` over this store (``indices``: a subset;
        ``fields``: as for :meth:`get_batch`).

        Use with :func:`collate_energy_forces`, and for shuffled epochs with
        :class:`~gmp_pipeline.store.ChunkShuffleSampler`.  Raises ImportError when torch is
        missing.
        """
        from .torch import make_torch_dataset

        return make_torch_dataset(self, indices, dtype=dtype, fields=fields)
