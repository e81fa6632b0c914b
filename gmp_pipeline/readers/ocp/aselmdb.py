"""``.aselmdb`` files: ASE database rows as zlib-compressed JSON in LMDB (ids from 1), both JSON
dialects (ASE's encoder, and fairchem's plain lists)."""
from __future__ import annotations

import json
import os
import zlib
from typing import Any

import numpy as np

from ...errors import SourceError
from ...schema import Schema, scalar_dtype
from ...structure import Structure
from .._common import as_numbers, as_positions, as_scalar
from ._base import OCPReader, open_lmdb


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
            with open_lmdb(f).begin() as txn:
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
        if counts is None:      # no size table: every row is decoded, here
            counts = self._counts = self.n_atoms_range(0, len(self))
        return counts.copy()

    def cheap_n_atoms(self):
        """None (an ``.aselmdb`` keeps no table of atom counts) unless this process already
        counted them: the pipeline counts ranges of rows on the cluster instead."""
        self._setup()
        counts = self.__dict__.get("_counts")
        return None if counts is None else counts.copy()

    def n_atoms_range(self, start: int, stop: int) -> np.ndarray:
        """Decode rows ``[start, stop)`` and count their atoms (a bad one counts 0 with
        ``skip_bad_records``)."""
        return self._count_records(
            start, stop, lambda i: np.asarray(self._row(i).get("numbers", [])).size)

    def _make_schema(self) -> tuple[Schema, dict[str, Any]]:
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
                t = scalar_dtype(v)
                if t is not None and k not in info:
                    info[k] = t
        schema = Schema.build(info=info, atom_info={"tags": "int64", "fixed": "bool"},
                              has_energy="energy" in row, has_forces="forces" in row)
        return schema, {"dialect": dialect,
                        "energy_field": "energy" if "energy" in row else None,
                        "energy_kind": "energy as stored in the row (dataset-defined; usually "
                                       "total DFT)"}

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
                if key in schema.info and key not in values:
                    values[key] = v
        if "free_energy" in row:
            values["free_energy"] = as_scalar(row["free_energy"], path=path, record=rid,
                                              field="free_energy") * self._factor
        if "stress" in row:
            values.update(zip(_VOIGT, (_voigt(row["stress"], path=path, record=rid)
                                       * self._factor).tolist()))
        for key, e in schema.info.items():
            dt = e.dtype
            if key in values:
                t = scalar_dtype(values[key]) if not isinstance(values[key], np.generic) else dt
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
                         info=schema.fill_info(values),
                         atom_info={"tags": tags.reshape(-1).astype(np.int64), "fixed": fixed})
