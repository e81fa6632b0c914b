"""OC20/OC22 LMDBs of pickled torch_geometric ``Data`` objects (PyG 1.x and 2.x layouts, S2EF and
IS2RE/IS2RS fields), decoded without torch (:mod:`._torchfree`)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ...errors import InputError, SourceError
from ...schema import Schema
from ...structure import Structure
from .._common import as_numbers, as_positions, as_scalar
from . import _torchfree
from ._base import OCPReader, open_lmdb

_NAN = float("nan")

# source attribute -> info field
_LMDB_ENERGIES = {"y": "energy", "energy": "energy", "y_init": "energy_init",
                  "y_relaxed": "energy_relaxed"}


class LegacyLMDBReader(OCPReader):
    """OC20/OC22 LMDB (pickled PyG Data).  ``energy_key``: source attribute used as
    ``Structure.energy`` (default: ``energy``, else ``y``, else ``y_relaxed``); ``energy_kind``:
    what that energy is when the file cannot say (S2EF ``y`` is referenced when the LMDB was built
    with ``--ref-energy``, else total).  ``info``: ``sid``, ``fid``, ``energy`` (y/energy),
    ``energy_init`` (y_init), ``energy_relaxed`` (y_relaxed), ``file_name``, ``key``;
    ``atom_info``: ``tags``, ``fixed``, ``pos_relaxed`` ((N, 3), IS2RS files only)."""

    format_name = "OC20/OC22 LMDB of pickled torch_geometric Data"

    def __init__(self, path, *, energy_key: str | None = None, energy_kind: str | None = None,
                 **options):
        if energy_key is not None and energy_key not in _LMDB_ENERGIES:
            raise InputError(f"energy_key {energy_key!r}: choose one of "
                             f"{', '.join(_LMDB_ENERGIES)}")
        super().__init__(path, energy_key=energy_key, energy_kind=energy_kind, **options)
        self._energy_key = energy_key
        self._energy_kind = energy_kind

    def _scan(self):
        files = self._list("*.lmdb")
        sizes = []
        for f in files:
            env = open_lmdb(f)
            with env.begin() as txn:
                raw = txn.get(b"length")
                if raw is not None:
                    try:
                        value = _torchfree.unpickle(bytes(raw))
                    except Exception as exc:
                        raise SourceError(f"undecodable length entry ({exc})", path=f,
                                          record="length", field="length") from None
                    n = as_scalar(value, path=f, record="length", field="length", kind="int")
                else:
                    n = env.stat()["entries"]
                if n > 0 and txn.get(str(n - 1).encode()) is None:
                    raise SourceError(f"has {n} entries but no key {n - 1!r} (keys must be "
                                      f"0..{n - 1})", path=f, record=n - 1, field="key")
            sizes.append(int(n))
        return files, sizes

    def _decode(self, i: int, shapes_only: bool = False) -> tuple[dict, str]:
        """(attributes, dialect) of record ``i``; ``shapes_only``: tensors as their
        :class:`~._torchfree.TensorShape` (not read), enough to count atoms."""
        f, k = self._locate(i)
        path = self._files[f]
        with self._env(f).begin() as txn:
            raw = txn.get(str(k).encode("ascii"))
        if raw is None:
            raise SourceError("key is missing", path=path, record=k, field="key")
        decode = _torchfree.unpickle_shapes if shapes_only else _torchfree.unpickle
        try:
            return _torchfree.data_attributes(decode(bytes(raw)))
        except _torchfree.RefusedGlobal as exc:
            raise SourceError(str(exc), path=path, record=k,
                              field=f"pickle global {exc.module}.{exc.name}") from None
        except Exception as exc:  # any unpickling failure: truncated, corrupt, inconsistent
            raise SourceError(f"undecodable pickle ({type(exc).__name__}: {exc})", path=path,
                              record=k, field="pickle") from None

    def _records(self, start, stop):
        for i in range(start, stop):
            try:
                attrs, dialect = self._decode(i)
            except SourceError as err:
                self._bad_record(i, err)
                continue
            yield i, (attrs, dialect)

    def n_atoms(self) -> np.ndarray:
        counts = self.cheap_n_atoms()
        if counts is None:      # no size table: every record is decoded, here
            self._counts = self.n_atoms_range(0, len(self))
            counts = self._counts.copy()
        return counts

    def cheap_n_atoms(self):
        """From fairchem's ``metadata.npz`` (or counts this process already made), else None:
        a legacy LMDB as downloaded has no size table, so every record must be decoded."""
        self._setup()
        counts = self.__dict__.get("_counts")
        if counts is None:
            counts = self._metadata_natoms()
            if counts is None:
                return None
            self._counts = counts
        return counts.copy()

    def n_atoms_range(self, start: int, stop: int) -> np.ndarray:
        """Decode records ``[start, stop)`` and count their atoms (a bad one counts 0 with
        ``skip_bad_records``)."""
        def count_one(i):
            n = self._natoms(i, self._decode(i, shapes_only=True)[0])
            if n is None:                       # natoms only as a tensor: read it
                n = self._natoms(i, self._decode(i)[0])
            return n

        return self._count_records(start, stop, count_one)

    def _metadata_natoms(self):
        """natoms from fairchem's ``metadata.npz`` next to the LMDB files, when it fits."""
        base = self.path if os.path.isdir(self.path) else None
        if base is None:
            return None
        meta = os.path.join(base, "metadata.npz")
        if not os.path.exists(meta):
            return None
        try:
            with np.load(meta, allow_pickle=False) as z:
                nat = np.asarray(z["natoms"], dtype=np.int64)
        except Exception:
            return None
        return nat if nat.shape == (len(self),) else None

    def _natoms(self, i, attrs) -> int | None:
        """The atom count of record ``i`` from its attributes (None if only a tensor not read,
        :meth:`_decode` with ``shapes_only``, would tell)."""
        f, k = self._locate(i)
        if "atomic_numbers" in attrs:
            z = attrs["atomic_numbers"]
            return z.size if isinstance(z, _torchfree.TensorShape) else int(np.asarray(z).size)
        if "natoms" in attrs:
            if isinstance(attrs["natoms"], _torchfree.TensorShape):
                return None
            return as_scalar(attrs["natoms"], path=self._files[f], record=k, field="natoms",
                             kind="int")
        raise SourceError("missing key", path=self._files[f], record=k, field="atomic_numbers")

    def _make_schema(self) -> tuple[Schema, dict[str, Any]]:
        self._setup()
        attrs, dialect = ({}, self.dialect)
        if len(self):
            attrs, dialect = self._decode(0)
        info = {"file_name": "str", "key": "int64", "sid": "int64", "fid": "int64"}
        for src, name in _LMDB_ENERGIES.items():
            if src in attrs:
                info[name] = "float64"
        atom_info: dict[str, Any] = {"tags": "int64", "fixed": "bool"}
        if "pos_relaxed" in attrs:
            atom_info["pos_relaxed"] = ("float64", (3,))
        key = self._energy_key
        if key is None:
            key = next((k for k in ("energy", "y", "y_relaxed") if k in attrs), None)
        kind = self._energy_kind
        if kind is None and key is not None:
            if "oc22" in attrs:
                kind = "total (OC22)"
            elif key in ("y", "energy"):
                kind = ("s2ef: referenced if the LMDB was built with --ref-energy, else total "
                        "(not recorded in the file)")
            elif key == "y_relaxed":
                kind = "relaxed (IS2RE, OC20 referenced/adsorption)"
            else:
                kind = "initial (IS2RE, OC20 referenced/adsorption)"
        schema = Schema.build(info=info, atom_info=atom_info, has_energy=key is not None,
                              has_forces="force" in attrs or "forces" in attrs)
        return schema, {"dialect": dialect, "energy_field": key, "energy_kind": kind}

    def _to_structure(self, i, rec, schema) -> Structure:
        attrs, _dialect = rec
        f, k = self._locate(i)
        path = self._files[f]
        for need in ("atomic_numbers", "pos"):
            if need not in attrs:
                raise SourceError("missing key", path=path, record=k, field=need)
        numbers = as_numbers(attrs["atomic_numbers"], path=path, record=k,
                             field="atomic_numbers")
        n = numbers.size
        pos = as_positions(attrs["pos"], n, path=path, record=k, field="pos")
        if "natoms" in attrs:
            na = as_scalar(attrs["natoms"], path=path, record=k, field="natoms", kind="int")
            if na != n:
                raise SourceError(f"natoms {na} does not match {n} atomic numbers", path=path,
                                  record=k, field="natoms")
        if "cell" not in attrs:
            raise SourceError("missing key", path=path, record=k, field="cell")
        cell = np.asarray(attrs["cell"])
        if cell.dtype.kind not in "fiu" or cell.size != 9:
            raise SourceError(f"cell of shape {cell.shape} / dtype {cell.dtype} is not 3x3",
                              path=path, record=k, field="cell")
        pbc = np.asarray(attrs.get("pbc", [True, True, True]), dtype=bool).reshape(-1)
        if pbc.size != 3:
            raise SourceError(f"pbc of shape {pbc.shape}", path=path, record=k, field="pbc")
        forces = None
        fkey = "forces" if "forces" in attrs else ("force" if "force" in attrs else None)
        if fkey is not None:
            forces = as_positions(attrs[fkey], n, path=path, record=k, field=fkey) * self._factor
        values: dict[str, Any] = {"file_name": os.path.basename(path), "key": k}
        for name in ("sid", "fid"):
            if name in attrs:
                values[name] = as_scalar(attrs[name], path=path, record=k, field=name,
                                         kind="int")
        for src, name in _LMDB_ENERGIES.items():
            if src in attrs:
                values[name] = as_scalar(attrs[src], path=path, record=k, field=src) * self._factor
        energy = None
        ekey = self._prov["energy_field"]
        if ekey is not None:
            if ekey not in attrs:
                raise SourceError("missing key (the energy target)", path=path, record=k,
                                  field=ekey)
            energy = values[_LMDB_ENERGIES[ekey]]
        atom_info = {}
        for name, default in (("tags", -1), ("fixed", 0)):
            if name in attrs:
                arr = np.asarray(attrs[name])
                if arr.dtype.kind not in "fiub" or arr.size != n:
                    raise SourceError(f"shape {arr.shape} / dtype {arr.dtype} does not match {n} "
                                      "atoms", path=path, record=k, field=name)
                arr = arr.reshape(-1)
            else:
                arr = np.full(n, default)
            atom_info[name] = arr.astype(bool) if name == "fixed" else arr.astype(np.int64)
        if "pos_relaxed" in schema.atom_info:
            if "pos_relaxed" in attrs:
                atom_info["pos_relaxed"] = as_positions(attrs["pos_relaxed"], n, path=path,
                                                        record=k, field="pos_relaxed")
            else:
                atom_info["pos_relaxed"] = np.full((n, 3), _NAN)
        return Structure(numbers=numbers, positions=pos, cell=cell.astype(np.float64),
                         pbc=pbc, energy=energy, forces=forces, source_index=i,
                         info=schema.fill_info(values), atom_info=atom_info)
