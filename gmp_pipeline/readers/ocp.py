"""Open Catalyst (OC20/OC22) sources, auto-detected by what ``path`` holds:

(a) legacy LMDBs of pickled torch_geometric ``Data`` objects (one ``.lmdb`` file or a directory of
    ``*.lmdb``), PyG 1.x and 2.x layouts, S2EF and IS2RE fields, decoded without torch through a
    restricted unpickler (:mod:`._torchfree`);
(b) ``.aselmdb`` files (one file or a directory), both JSON dialects;
(c) S2EF raw shards ``N.extxyz[.xz]`` with their ``N.txt[.xz]`` sidecars (one file or a directory).

``format="lmdb" | "aselmdb" | "extxyz"`` overrides the detection.  Units: Angstrom, eV, eV/Angstrom.
Per atom: ``tags`` (int64) and ``fixed`` (bool) are always present; ``info`` keeps ``sid``, ``fid``
(-1 when absent) and every energy the source has (NaN when a record lacks it).
"""
from __future__ import annotations

import bisect
import glob
import json
import lzma
import os
import re
import zlib
from typing import Any, Iterator

import numpy as np

from ..errors import InputError, SourceError
from ..structure import Structure
from . import _torchfree
from ._common import (as_numbers, as_positions, as_scalar, conversion_record, energy_conversion,
                      make_units)
from .base import Reader, register_reader

_NAN = float("nan")


#: LMDB environments opened by this process, keyed by (pid, real path).  py-lmdb allows one
#: environment per file and process, and handles must not cross a fork, hence the pid.
_ENVS: dict[tuple[int, str], Any] = {}


def _open_lmdb(path):
    """The read-only environment of ``path``, opened once per process."""
    key = (os.getpid(), os.path.realpath(os.fspath(path)))
    env = _ENVS.get(key)
    if env is None:
        env = _ENVS[key] = _open_lmdb_new(path)
    return env


def close_environments() -> None:
    """Close every LMDB environment this process opened (e.g. before rewriting a file)."""
    for key in [k for k in _ENVS if k[0] == os.getpid()]:
        _ENVS.pop(key).close()


def _open_lmdb_new(path):
    import lmdb

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SourceError("file not found", path=path)
    try:
        env = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=256)
    except lmdb.Error as exc:
        raise SourceError(f"not a readable LMDB file ({exc})", path=path) from None
    # a truncated file would fault (SIGBUS) when a missing page is touched: check first
    info, stat = env.info(), env.stat()
    need = (info["last_pgno"] + 1) * stat["psize"]
    have = os.path.getsize(path)
    if have < need:
        env.close()
        raise SourceError(f"LMDB file is truncated: {have} bytes, its pages need {need}",
                          path=path)
    return env


def _lmdb_magic_kind(path) -> str:
    """'aselmdb' when the first data value is zlib JSON, else 'lmdb' (pickles)."""
    with _open_lmdb(path).begin() as txn:
        for key in (b"nextid", b"0", b"1"):
            v = txn.get(key)
            if v is not None:
                return "aselmdb" if v[:1] in (b"\x78",) else "lmdb"
    return "lmdb"


def detect_format(path) -> str:
    p = os.fspath(path)
    if os.path.isdir(p):
        names = os.listdir(p)
        if any(n.endswith(".aselmdb") for n in names):
            return "aselmdb"
        if any(n.endswith(".lmdb") for n in names):
            return "lmdb"
        if any(re.search(r"\.extxyz(\.xz)?$", n) for n in names):
            return "extxyz"
        raise SourceError("directory holds no *.lmdb, *.aselmdb or *.extxyz[.xz] files", path=p)
    if not os.path.exists(p):
        raise SourceError("file not found", path=p)
    if p.endswith(".aselmdb"):
        return "aselmdb"
    if re.search(r"\.extxyz(\.xz)?$", p):
        return "extxyz"
    return _lmdb_magic_kind(p)


@register_reader("ocp")
class OCPReader(Reader):
    """Dispatches to the LMDB, aselmdb or S2EF-extxyz reader (see the module docstring).

    Common options: ``format``, ``energy_unit`` (explicit conversion from eV), ``skip_bad_records``.
    """

    _transient = ("_counts",)
    dialect = "?"

    def __new__(cls, path=None, **options):
        if cls is OCPReader:
            kind = options.get("format") or (detect_format(path) if path is not None else None)
            sub = {"lmdb": LegacyLMDBReader, "aselmdb": AseLMDBReader,
                   "extxyz": S2EFExtxyzReader}.get(kind)
            if sub is None:
                raise InputError(f"ocp format {kind!r} is unknown; choose lmdb, aselmdb or "
                                 "extxyz")
            cls = sub
        return super().__new__(cls)

    def __init__(self, path, *, format: str | None = None, energy_unit: str | None = None,
                 skip_bad_records: bool = False, **options: Any):
        super().__init__(path, skip_bad_records=skip_bad_records, format=format,
                         energy_unit=energy_unit, **options)
        self._factor, self._unit = energy_conversion("eV", energy_unit)
        self._files: list[str] | None = None
        self._sizes: list[int] | None = None
        self._starts: list[int] | None = None
        self._schema: dict[str, Any] | None = None

    # -- shared ------------------------------------------------------------------------------
    def _list(self, pattern: str) -> list[str]:
        p = os.fspath(self.path)
        if os.path.isdir(p):
            files = sorted(glob.glob(os.path.join(p, pattern)))
            if not files:
                raise SourceError(f"directory holds no {pattern} files", path=p)
            return files
        if not os.path.exists(p):
            raise SourceError("file not found", path=p)
        return [p]

    def _setup(self) -> None:
        if self._files is None:
            files, sizes = self._scan()
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
            self._files, self._sizes, self._starts = files, sizes, starts

    def _locate(self, i: int) -> tuple[int, int]:
        f = bisect.bisect_right(self._starts, i) - 1
        return f, i - self._starts[f]

    def __len__(self) -> int:
        self._setup()
        return int(self._starts[-1])

    def _env(self, f: int):
        return _open_lmdb(self._files[f])

    @property
    def units(self) -> dict[str, str]:  # type: ignore[override]
        s = self._first_schema()
        return make_units(self._unit, energy_kind=s.get("_energy_kind"), forces=True)

    def schema(self) -> dict[str, Any]:
        s = self._first_schema()
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()
               if not k.startswith("_")}
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        self._setup()
        s = self._first_schema()
        d.update({"format": self.format_name, "dialect": s.get("_dialect", self.dialect),
                  "files": list(self._files), "records_per_file": list(self._sizes),
                  "energy_source_field": s.get("_energy_field"),
                  "energy_conversion": conversion_record("eV", self._unit, self._factor)})
        return d

    def _first_schema(self) -> dict[str, Any]:
        if self._schema is None:
            self._schema = self._make_schema()
        return self._schema

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Structure]:
        start, stop = self._check_range(start, stop)
        schema = self._first_schema()
        for i, rec in self._records(start, stop):
            try:
                yield self._to_structure(i, rec, schema)
            except SourceError as err:
                self._bad_record(i, err)

    @staticmethod
    def _fill_info(schema, values: dict) -> dict:
        fill = {"int64": -1, "float64": _NAN, "str": "", "bool": False}
        return {k: values.get(k, fill[dt]) for k, dt in schema["info"].items()}


# ---------------------------------------------------------------------------------------------
# (a) legacy LMDB of pickled PyG Data objects

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
            env = _open_lmdb(f)
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

    def _decode(self, i: int) -> tuple[dict, str]:
        f, k = self._locate(i)
        path = self._files[f]
        with self._env(f).begin() as txn:
            raw = txn.get(str(k).encode("ascii"))
        if raw is None:
            raise SourceError("key is missing", path=path, record=k, field="key")
        try:
            return _torchfree.data_attributes(_torchfree.unpickle(bytes(raw)))
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
        self._setup()
        counts = self.__dict__.get("_counts")
        if counts is None:
            counts = self._metadata_natoms()
            if counts is None:
                counts = np.zeros(len(self), dtype=np.int64)
                for i in range(len(self)):
                    try:
                        attrs, _ = self._decode(i)
                        counts[i] = self._natoms(i, attrs)
                    except SourceError as err:
                        self._bad_record(i, err)
            self._counts = counts
        return counts.copy()

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

    def _natoms(self, i, attrs) -> int:
        f, k = self._locate(i)
        if "atomic_numbers" in attrs:
            return int(np.asarray(attrs["atomic_numbers"]).size)
        if "natoms" in attrs:
            return as_scalar(attrs["natoms"], path=self._files[f], record=k, field="natoms",
                             kind="int")
        raise SourceError("missing key", path=self._files[f], record=k, field="atomic_numbers")

    def _make_schema(self) -> dict[str, Any]:
        self._setup()
        attrs, dialect = ({}, self.dialect)
        if len(self):
            attrs, dialect = self._decode(0)
        info = {"file_name": "str", "key": "int64", "sid": "int64", "fid": "int64"}
        for src, name in _LMDB_ENERGIES.items():
            if src in attrs:
                info[name] = "float64"
        atom_info = {"tags": "int64", "fixed": "bool"}
        shapes = {}
        if "pos_relaxed" in attrs:
            atom_info["pos_relaxed"] = "float64"
            shapes["pos_relaxed"] = [3]
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
        s = {"info": info, "atom_info": atom_info, "has_energy": key is not None,
             "has_forces": "force" in attrs or "forces" in attrs, "_dialect": dialect,
             "_energy_field": key, "_energy_kind": kind}
        if shapes:
            s["atom_info_shapes"] = shapes
        return s

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
        ekey = schema["_energy_field"]
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
        if "pos_relaxed" in schema["atom_info"]:
            if "pos_relaxed" in attrs:
                atom_info["pos_relaxed"] = as_positions(attrs["pos_relaxed"], n, path=path,
                                                        record=k, field="pos_relaxed")
            else:
                atom_info["pos_relaxed"] = np.full((n, 3), _NAN)
        return Structure(numbers=numbers, positions=pos, cell=cell.astype(np.float64),
                         pbc=pbc, energy=energy, forces=forces, source_index=i,
                         info=self._fill_info(schema, values), atom_info=atom_info)


# ---------------------------------------------------------------------------------------------
# (b) .aselmdb

def _ase_json_hook(d):
    if "__ndarray__" in d:
        shape, dtype, flat = d["__ndarray__"]
        return np.asarray(flat, dtype=dtype).reshape(shape)
    if "__complex__" in d:
        re_, im = d["__complex__"]
        return complex(re_, im)
    if "__datetime__" in d:
        return d["__datetime__"]
    if d.get("__ase_objtype__") == "cell" and "array" in d:
        return d["array"]
    return d


def _voigt(stress, *, path, record) -> np.ndarray:
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (6,):
        return s
    if s.shape == (3, 3):
        return s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    raise SourceError(f"shape {s.shape} is neither (6,) nor (3, 3)", path=path, record=record,
                      field="stress")


_VOIGT = ("stress_xx", "stress_yy", "stress_zz", "stress_yz", "stress_xz", "stress_xy")


def _scalar_type(v) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int64"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "str"
    return None


class AseLMDBReader(OCPReader):
    """``.aselmdb`` (ASE database rows as zlib-compressed JSON in LMDB, ids from 1).
    ``info``: ``file_name``, ``row_id``, ``unique_id``, ``sid``, ``fid``, ``free_energy``,
    ``stress_xx`` ... ``stress_xy`` (Voigt, eV/Angstrom^3, when present) and the scalar
    ``key_value_pairs``/``data`` entries of the first row; ``atom_info``: ``tags``, ``fixed``
    (from FixAtoms constraints)."""

    format_name = ".aselmdb (ASE database in LMDB)"

    def _scan(self):
        files = self._list("*.aselmdb")
        self._ids, sizes = [], []
        for f in files:
            with _open_lmdb(f).begin() as txn:
                nextid = self._json(txn.get(b"nextid"), f, "nextid", "nextid")
                deleted = txn.get(b"deleted_ids")
                deleted = set() if deleted is None else set(
                    self._json(deleted, f, "deleted_ids", "deleted_ids"))
            if not isinstance(nextid, int) or nextid < 1:
                raise SourceError(f"nextid {nextid!r} is not a positive integer", path=f,
                                  record="nextid", field="nextid")
            # row ids 1..nextid-1 minus deleted ones; stored only when some were deleted
            self._ids.append(None if not deleted else np.asarray(
                [i for i in range(1, nextid) if i not in deleted], dtype=np.int64))
            sizes.append(nextid - 1 if not deleted else len(self._ids[-1]))
        return files, sizes

    def _row_id(self, f: int, k: int) -> int:
        ids = self._ids[f]
        return k + 1 if ids is None else int(ids[k])

    @staticmethod
    def _json(raw, path, record, field):
        if raw is None:
            raise SourceError("missing key", path=path, record=record, field=field)
        try:
            return json.loads(zlib.decompress(bytes(raw)).decode("utf-8"),
                              object_hook=_ase_json_hook)
        except (zlib.error, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise SourceError(f"undecodable value ({type(exc).__name__}: {exc})", path=path,
                              record=record, field=field) from None

    def _row(self, i: int) -> dict:
        f, k = self._locate(i)
        row_id = self._row_id(f, k)
        with self._env(f).begin() as txn:
            raw = txn.get(str(row_id).encode("ascii"))
        row = self._json(raw, self._files[f], row_id, "row")
        if not isinstance(row, dict):
            raise SourceError("row is not a JSON object", path=self._files[f], record=row_id,
                              field="row")
        return row

    def _records(self, start, stop):
        for i in range(start, stop):
            try:
                row = self._row(i)
            except SourceError as err:
                self._bad_record(i, err)
                continue
            yield i, row

    def n_atoms(self) -> np.ndarray:
        self._setup()
        counts = self.__dict__.get("_counts")
        if counts is None:
            counts = np.zeros(len(self), dtype=np.int64)
            for i in range(len(self)):
                try:
                    row = self._row(i)
                    counts[i] = np.asarray(row.get("numbers", [])).size
                except SourceError as err:
                    self._bad_record(i, err)
            self._counts = counts
        return counts.copy()

    def _make_schema(self) -> dict[str, Any]:
        self._setup()
        row = self._row(0) if len(self) else {}
        plain = isinstance(row.get("numbers"), list) or isinstance(row.get("positions"), list)
        dialect = ("plain-list JSON (fairchem LMDBDatabase / orjson dialect)" if plain
                   else "ASE JSON encoder (ase-db-backends dialect)")
        info = {"file_name": "str", "row_id": "int64", "unique_id": "str", "sid": "int64",
                "fid": "int64"}
        if "free_energy" in row:
            info["free_energy"] = "float64"
        if "stress" in row:
            info.update({v: "float64" for v in _VOIGT})
        for src in ("key_value_pairs", "data"):
            for k, v in (row.get(src) or {}).items():
                t = _scalar_type(v)
                if t is not None and k not in info:
                    info[k] = t
        return {"info": info, "atom_info": {"tags": "int64", "fixed": "bool"},
                "has_energy": "energy" in row, "has_forces": "forces" in row,
                "_dialect": dialect, "_energy_field": "energy" if "energy" in row else None,
                "_energy_kind": "energy as stored in the row (dataset-defined; usually total DFT)"}

    def _to_structure(self, i, row, schema) -> Structure:
        f, k = self._locate(i)
        path, rid = self._files[f], self._row_id(f, k)
        for need in ("numbers", "positions"):
            if need not in row:
                raise SourceError("missing key", path=path, record=rid, field=need)
        numbers = as_numbers(row["numbers"], path=path, record=rid, field="numbers")
        n = numbers.size
        pos = as_positions(row["positions"], n, path=path, record=rid, field="positions")
        cell = np.asarray(row.get("cell", np.zeros((3, 3))))
        if cell.dtype.kind not in "fiu" or cell.size != 9:
            raise SourceError(f"cell {cell!r:.60} is not 3x3 numbers", path=path, record=rid,
                              field="cell")
        pbc = np.asarray(row.get("pbc", [False] * 3), dtype=bool).reshape(-1)
        energy = forces = None
        if "energy" in row:
            energy = as_scalar(row["energy"], path=path, record=rid, field="energy") * self._factor
        if "forces" in row:
            forces = as_positions(row["forces"], n, path=path, record=rid,
                                  field="forces") * self._factor
        values: dict[str, Any] = {"file_name": os.path.basename(path), "row_id": rid,
                                  "unique_id": str(row.get("unique_id", ""))}
        for src in ("key_value_pairs", "data"):
            for key, v in (row.get(src) or {}).items():
                if key in schema["info"] and key not in values:
                    values[key] = v
        if "free_energy" in row:
            values["free_energy"] = as_scalar(row["free_energy"], path=path, record=rid,
                                              field="free_energy") * self._factor
        if "stress" in row:
            values.update(zip(_VOIGT, (_voigt(row["stress"], path=path, record=rid)
                                       * self._factor).tolist()))
        for key, dt in schema["info"].items():
            if key in values:
                t = _scalar_type(values[key]) if not isinstance(values[key], np.generic) else dt
                if t != dt and not (dt == "float64" and t == "int64"):
                    raise SourceError(f"value {values[key]!r:.60} is not {dt}", path=path,
                                      record=rid, field=key)
        tags = np.asarray(row.get("tags", np.zeros(n)))
        if tags.size != n:
            raise SourceError(f"{tags.size} tags for {n} atoms", path=path, record=rid,
                              field="tags")
        fixed = np.zeros(n, dtype=bool)
        for c in row.get("constraints") or []:
            if isinstance(c, dict) and c.get("name") == "FixAtoms":
                kw = c.get("kwargs", {})
                idx = np.asarray(kw.get("indices", []), dtype=np.int64).reshape(-1)
                if "mask" in kw:
                    idx = np.flatnonzero(np.asarray(kw["mask"], dtype=bool))
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    raise SourceError(f"FixAtoms index out of range for {n} atoms", path=path,
                                      record=rid, field="constraints")
                fixed[idx] = True
        return Structure(numbers=numbers, positions=pos, cell=cell.astype(np.float64), pbc=pbc,
                         energy=energy, forces=forces, source_index=i,
                         info=self._fill_info(schema, values),
                         atom_info={"tags": tags.reshape(-1).astype(np.int64), "fixed": fixed})


# ---------------------------------------------------------------------------------------------
# (c) S2EF raw shards

_KV = re.compile(r'(\w+)=("([^"]*)"|\S+)')
_TXT = re.compile(r"^random(\d+),frame(\d+),(\S+)$")


def _open_text(path):
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _numeric_stem(path):
    stem = os.path.basename(path).split(".")[0]
    return (0, int(stem), path) if stem.isdigit() else (1, 0, path)


class S2EFExtxyzReader(OCPReader):
    """OC20 S2EF raw shards.  ``Structure.energy`` is the DFT total ``energy`` of the frame
    (``energy_target="referenced"`` gives ``energy - reference_energy`` instead, recorded in
    ``units["energy_kind"]``).  ``info``: ``file_name``, ``frame``, ``sid``, ``fid``,
    ``energy``, ``free_energy``, ``reference_energy`` (NaN / -1 when absent);
    ``atom_info``: ``tags``, ``fixed`` (= not move_mask).  Frames whose shard has no ``.txt``
    get sid = fid = -1 unless ``require_txt=True``."""

    format_name = "OC20 S2EF extxyz + txt shards"
    dialect = "extended XYZ (OC20 S2EF columns)"
    _transient = ("_counts", "_stream")

    def __init__(self, path, *, energy_target: str = "total", require_txt: bool = False,
                 **options):
        if energy_target not in ("total", "referenced"):
            raise InputError(f"energy_target {energy_target!r}: choose total or referenced")
        options.update(energy_target=energy_target, require_txt=bool(require_txt))
        super().__init__(path, **options)
        self._target = energy_target
        self._require_txt = bool(require_txt)

    def _scan(self):
        p = os.fspath(self.path)
        if os.path.isdir(p):
            files = [f for f in glob.glob(os.path.join(p, "*.extxyz*"))
                     if re.search(r"\.extxyz(\.xz)?$", f)]
            files.sort(key=_numeric_stem)
            if not files:
                raise SourceError("directory holds no *.extxyz[.xz] files", path=p)
        else:
            if not os.path.exists(p):
                raise SourceError("file not found", path=p)
            files = [p]
        self._txt, sizes, counts = [], [], []
        for f in files:
            base = re.sub(r"\.extxyz(\.xz)?$", "", f)
            txt = next((t for t in (base + ".txt.xz", base + ".txt") if os.path.exists(t)), None)
            if txt is None and self._require_txt:
                raise SourceError("no matching .txt/.txt.xz sidecar", path=f, field="txt")
            c = self._count_frames(f)
            if txt is not None:
                nlines = len(self._read_txt(txt))
                if nlines != len(c):
                    raise SourceError(f"shard has {len(c)} frames but its sidecar {txt} has "
                                      f"{nlines} lines (truncated shard?)", path=f,
                                      record=min(len(c), nlines), field="txt")
            self._txt.append(txt)
            sizes.append(len(c))
            counts.append(c)
        self._counts = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, int)
        return files, sizes

    def _count_frames(self, path) -> np.ndarray:
        counts = []
        try:
            with _open_text(path) as f:
                frame = 0
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        n = int(line)
                    except ValueError:
                        raise SourceError(f"expected an atom count, got {line[:60]!r}",
                                          path=path, record=frame, field="natoms") from None
                    for k in range(n + 1):
                        if not f.readline():
                            raise SourceError(f"file ends inside the frame ({max(k - 1, 0)} of "
                                              f"{n} atom lines)", path=path, record=frame,
                                              field="atoms")
                    counts.append(n)
                    frame += 1
        except (EOFError, lzma.LZMAError, OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"truncated or corrupt file ({type(exc).__name__}: {exc})",
                              path=path, record=len(counts), field="file") from None
        return np.asarray(counts, dtype=np.int64)

    @staticmethod
    def _read_txt(path) -> list[tuple[int, int, float]]:
        out = []
        try:
            with _open_text(path) as f:
                for lineno, line in enumerate(f):
                    line = line.strip()
                    if not line:
                        continue
                    m = _TXT.match(line)
                    if m is None:
                        raise SourceError(f"line {line[:60]!r} is not random<sid>,frame<fid>,"
                                          "<reference_energy>", path=path, record=lineno,
                                          field="txt")
                    try:
                        ref = float(m.group(3))
                    except ValueError:
                        raise SourceError(f"non-numeric reference energy {m.group(3)!r}",
                                          path=path, record=lineno,
                                          field="reference_energy") from None
                    out.append((int(m.group(1)), int(m.group(2)), ref))
        except (EOFError, lzma.LZMAError, OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"truncated or corrupt file ({type(exc).__name__}: {exc})",
                              path=path, field="txt") from None
        return out

    def n_atoms(self) -> np.ndarray:
        self._setup()
        counts = self.__dict__.get("_counts")
        if counts is None:
            self._files = None
            self._setup()
            counts = self._counts
        return counts.copy()

    def _make_schema(self) -> dict[str, Any]:
        info = {"file_name": "str", "frame": "int64", "sid": "int64", "fid": "int64",
                "energy": "float64", "free_energy": "float64", "reference_energy": "float64"}
        kind = ("total (DFT energy of the frame)" if self._target == "total" else
                "referenced (energy - reference_energy from the .txt sidecar)")
        return {"info": info, "atom_info": {"tags": "int64", "fixed": "bool"},
                "has_energy": True, "has_forces": True, "_dialect": self.dialect,
                "_energy_field": "energy" if self._target == "total" else
                "energy - reference_energy", "_energy_kind": kind}

    def _frame_lines(self, f: int, first: int, last: int):
        """Yield (frame in shard, lines) for frames first..last-1 of shard f, continuing an open
        stream when possible."""
        stream = self.__dict__.get("_stream")
        if stream is None or stream[0] != f or stream[2] > first:
            if stream is not None:
                stream[1].close()
            stream = [f, _open_text(self._files[f]), 0]
            self._stream = stream
        fh = stream[1]
        path = self._files[f]
        try:
            while stream[2] < last:
                line = fh.readline()
                if not line:
                    raise SourceError("file ends early", path=path, record=stream[2],
                                      field="natoms")
                if not line.strip():
                    continue
                n = int(line)
                lines = [fh.readline() for _ in range(n + 1)]
                j = stream[2]
                stream[2] += 1
                if j >= first:
                    yield j, lines
        except (EOFError, lzma.LZMAError, OSError, ValueError, UnicodeDecodeError) as exc:
            self.__dict__.pop("_stream", None)
            raise SourceError(f"truncated or corrupt file ({type(exc).__name__}: {exc})",
                              path=path, record=stream[2], field="file") from None

    def _records(self, start, stop):
        i = start
        while i < stop:
            f, k = self._locate(i)
            last = min(stop - self._starts[f], self._sizes[f])
            txt = self._read_txt(self._txt[f]) if self._txt[f] is not None else None
            for j, lines in self._frame_lines(f, k, last):
                yield self._starts[f] + j, (f, j, lines, None if txt is None else txt[j])
            i = self._starts[f] + last

    def _to_structure(self, i, rec, schema) -> Structure:
        f, j, lines, meta = rec
        path = self._files[f]
        n = len(lines) - 1
        header = {m.group(1): (m.group(3) if m.group(3) is not None else m.group(2))
                  for m in _KV.finditer(lines[0])}
        props = header.get("Properties", "species:S:1:pos:R:3").split(":")
        if len(props) % 3:
            raise SourceError(f"Properties {header.get('Properties')!r} is malformed",
                              path=path, record=j, field="Properties")
        cols, c0 = {}, 0
        for name, typ, cnt in zip(props[0::3], props[1::3], props[2::3]):
            cols[name] = (c0, int(cnt), typ)
            c0 += int(cnt)
        for need in ("species", "pos"):
            if need not in cols:
                raise SourceError("missing column", path=path, record=j, field=need)
        rows = [ln.split() for ln in lines[1:]]
        for a, r in enumerate(rows):
            if len(r) != c0:
                raise SourceError(f"atom line {a} has {len(r)} columns, Properties declare {c0}"
                                  " (truncated frame?)", path=path, record=j, field="atoms")
        from ase.data import atomic_numbers as _Z

        s0 = cols["species"][0]
        try:
            numbers = np.asarray([_Z[r[s0]] for r in rows], dtype=np.int64)
        except KeyError as exc:
            raise SourceError(f"unknown element {exc.args[0]!r}", path=path, record=j,
                              field="species") from None

        def block(name, dtype=np.float64):
            c, cnt, _ = cols[name]
            try:
                return np.asarray([r[c:c + cnt] for r in rows], dtype=dtype)
            except ValueError as exc:
                raise SourceError(f"non-numeric value ({exc})", path=path, record=j,
                                  field=name) from None

        pos = as_positions(block("pos"), n, path=path, record=j, field="pos")
        forces = None
        if "forces" in cols:
            forces = as_positions(block("forces"), n, path=path, record=j,
                                  field="forces") * self._factor
        tags = block("tags", np.int64).reshape(-1) if "tags" in cols else np.zeros(n, np.int64)
        if "move_mask" in cols:
            c = cols["move_mask"][0]
            fixed = np.asarray([r[c] in ("F", "False", "0") for r in rows], dtype=bool)
        else:
            fixed = np.zeros(n, dtype=bool)
        cell = np.zeros((3, 3))
        if "Lattice" in header:
            try:
                cell = np.asarray(header["Lattice"].split(), dtype=np.float64).reshape(3, 3)
            except ValueError:
                raise SourceError(f"Lattice {header['Lattice']!r:.80} is not 9 numbers",
                                  path=path, record=j, field="Lattice") from None
        pbc_txt = header.get("pbc", "T T T" if "Lattice" in header else "F F F").split()
        pbc = np.asarray([t in ("T", "True", "1") for t in pbc_txt], dtype=bool)
        values: dict[str, Any] = {"file_name": os.path.basename(path), "frame": j}
        for key in ("energy", "free_energy"):
            if key in header:
                try:
                    values[key] = float(header[key]) * self._factor
                except ValueError:
                    raise SourceError(f"non-numeric value {header[key]!r}", path=path, record=j,
                                      field=key) from None
        if meta is not None:
            values["sid"], values["fid"] = meta[0], meta[1]
            values["reference_energy"] = meta[2] * self._factor
        if "energy" not in values:
            raise SourceError("missing key", path=path, record=j, field="energy")
        energy = values["energy"]
        if self._target == "referenced":
            if meta is None:
                raise SourceError("energy_target='referenced' needs the .txt sidecar",
                                  path=path, record=j, field="reference_energy")
            energy = values["energy"] - values["reference_energy"]
        return Structure(numbers=numbers, positions=pos, cell=cell, pbc=pbc, energy=energy,
                         forces=forces, source_index=i, info=self._fill_info(schema, values),
                         atom_info={"tags": tags, "fixed": fixed})
