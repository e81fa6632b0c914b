"""Anything ``ase.io`` reads (extxyz, traj, xyz, cif, ...) and ASE databases (``.db``, ``.json``).

Units follow ASE's conventions: Angstrom, eV, eV/Angstrom (ASE stores no unit, so this is an
assumption recorded in ``units``).  Energy and forces come from the results stored with each frame
(``energy``/``forces`` of the single-point calculator); ``free_energy`` is kept in ``info``.

Random access: uncompressed ``.xyz``/``.extxyz`` files are indexed once per process (byte offset of
every frame, found by counting lines) so ``read(a, b)`` seeks to frame ``a``; ASE databases are read
by row id; other formats go through ``ase.io.iread(path, index=slice(a, b))``.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from ..errors import SourceError
from ..structure import Structure
from ..schema import Schema, scalar_dtype
from ._common import conversion_record, energy_conversion, make_units, scan_xyz_frames
from .base import Reader

_DB_FORMATS = {"db", "json", "postgresql", "mysql", "aselmdb"}
#: per-atom arrays of ``atoms.arrays`` that are not extras (the structure itself, or ``tags``)
_NOT_EXTRAS = {"numbers", "positions", "tags"}
_ARRAY_DTYPES = {"f": "float64", "i": "int64", "u": "int64", "b": "bool", "U": "str", "S": "str"}


def fixed_mask(atoms) -> np.ndarray:
    """Per-atom bool: True where an ASE ``FixAtoms`` constraint holds the atom."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[np.asarray(c.get_indices(), dtype=np.int64)] = True
    return mask


class ASEReader(Reader):
    """Frames of any file ASE reads.  ``info``: ``file_name``, ``frame_index`` (``row_id`` for a
    database), ``free_energy`` and the scalar ``atoms.info`` / key-value pairs of the first frame;
    ``atom_info``: ``tags`` (int64), ``fixed`` (bool, from FixAtoms) and every other per-atom
    array of the first frame (``atoms.arrays``, e.g. ``initial_charges`` (N,), ``momenta`` or an
    extxyz vector column (N, 3)) with its trailing shape."""

    name = "ase"

    _transient = ("_db", "_counts")

    def __init__(self, path, *, format: str | None = None, energy_unit: str | None = None,
                 skip_bad_records: bool = False, **options: Any):
        super().__init__(path, skip_bad_records=skip_bad_records, format=format,
                         energy_unit=energy_unit, **options)
        self._format = format
        self._factor, self._unit = energy_conversion("eV", energy_unit)
        self._n: int | None = None
        self._offsets: np.ndarray | None = None
        self._ids: np.ndarray | None = None
        self._schema: dict[str, Any] | None = None

    # -- opening -----------------------------------------------------------------------------
    def _fmt(self) -> str:
        if self._format is None:
            import ase.io.formats

            if not os.path.exists(self.path):
                raise SourceError("file not found", path=self.path)
            try:
                self._format = ase.io.formats.filetype(os.fspath(self.path), guess=True)
            except Exception as exc:
                raise SourceError(f"ASE cannot tell the file format ({exc})",
                                  path=self.path) from None
        return self._format

    def _is_db(self) -> bool:
        return self._fmt() in _DB_FORMATS

    def _connect(self):
        db = self.__dict__.get("_db")
        if db is None:
            import ase.db

            try:
                db = ase.db.connect(os.fspath(self.path), type=self._fmt(), create_indices=False,
                                    use_lock_file=False)
            except TypeError:
                db = ase.db.connect(os.fspath(self.path), type=self._fmt())
            self._db = db
        return db

    def _index(self) -> None:
        if self._n is not None:
            return
        fmt = self._fmt()
        path = os.fspath(self.path)
        if self._is_db():
            try:
                rows = [(row.id, row.natoms) for row in self._connect().select()]
            except Exception as exc:
                raise SourceError(f"cannot read the ASE database ({exc})", path=path) from None
            self._ids = np.asarray([r[0] for r in rows], dtype=np.int64)
            self._counts = np.asarray([r[1] for r in rows], dtype=np.int64)
        elif fmt in ("extxyz", "xyz") and not path.endswith((".gz", ".bz2", ".xz")):
            with open(path, "rb") as f:
                self._offsets, self._counts = scan_xyz_frames(f, path)
        else:
            counts = [len(a) for a in self._iread(0, None)]
            self._counts = np.asarray(counts, dtype=np.int64)
        self._n = len(self._counts)

    def _iread(self, start: int, stop: int | None):
        import ase.io

        try:
            yield from ase.io.iread(os.fspath(self.path), index=slice(start, stop),
                                    format=self._fmt())
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"ASE cannot read the file ({type(exc).__name__}: {exc})",
                              path=self.path, record=start) from None

    # -- protocol ----------------------------------------------------------------------------
    @property
    def units(self) -> dict[str, str]:  # type: ignore[override]
        return make_units(self._unit, energy_kind="total (as stored by the ASE calculator)",
                          forces=True)

    def __len__(self) -> int:
        self._index()
        return self._n

    def n_atoms(self) -> np.ndarray:
        self._index()
        counts = self.__dict__.get("_counts")
        if counts is None:  # unpickled reader: recount
            self._n = None
            self._index()
            counts = self._counts
        return counts.copy()

    def _atoms_range(self, start: int, stop: int) -> Iterator[tuple[int, Any, dict]]:
        """Yield (index, atoms, extra info) for frames start..stop-1."""
        if start >= stop:
            return
        if self._is_db():
            db = self._connect()
            for i in range(start, stop):
                try:
                    row = db.get(id=int(self._ids[i]))
                    atoms = row.toatoms()
                    extra = {"row_id": int(row.id), **dict(row.key_value_pairs)}
                except Exception as exc:
                    self._bad_record(i, SourceError(f"cannot decode row ({exc})", path=self.path,
                                                    record=i, field="row"))
                    continue
                yield i, atoms, extra
            return
        if self._offsets is not None:
            import io

            import ase.io

            ends = list(self._offsets[1:]) + [None]
            with open(self.path, "rb") as f:
                for i in range(start, stop):
                    f.seek(int(self._offsets[i]))
                    raw = f.read() if ends[i] is None else f.read(int(ends[i] - self._offsets[i]))
                    try:
                        atoms = ase.io.read(io.StringIO(raw.decode("utf-8")), index=0,
                                            format=self._fmt())
                    except Exception as exc:
                        self._bad_record(i, SourceError(
                            f"ASE cannot parse the frame ({type(exc).__name__}: {exc})",
                            path=self.path, record=i, field="frame"))
                        continue
                    yield i, atoms, {"frame_index": i}
            return
        for k, atoms in enumerate(self._iread(start, stop)):
            yield start + k, atoms, {"frame_index": start + k}

    def _first_schema(self) -> Schema:
        if self._schema is None:
            info: dict[str, str] = {"file_name": "str"}
            info["row_id" if self._is_db() else "frame_index"] = "int64"
            atom_info: dict[str, Any] = {"tags": "int64", "fixed": "bool"}
            has_e = has_f = False
            if len(self):
                _, atoms, extra = next(self._atoms_range(0, 1))
                res = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
                has_e, has_f = "energy" in res, "forces" in res
                if "free_energy" in res:
                    info["free_energy"] = "float64"
                for k, v in {**atoms.info, **extra}.items():
                    dt = scalar_dtype(v)
                    if dt is not None and k not in info:
                        info[k] = dt
                for k, arr in atoms.arrays.items():
                    dt = _ARRAY_DTYPES.get(np.asarray(arr).dtype.kind)
                    if k in _NOT_EXTRAS or k in atom_info or dt is None or (
                            dt == "str" and np.ndim(arr) != 1):
                        continue
                    atom_info[k] = (dt, tuple(np.shape(arr)[1:]))
            self._schema = Schema.build(info=info, atom_info=atom_info, has_energy=has_e,
                                        has_forces=has_f, units=self.units)
        return self._schema

    def schema(self) -> Schema:
        return self._first_schema()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"format": f"ase.io format {self._fmt()!r}",
                  "energy_conversion": conversion_record("eV", self._unit, self._factor)})
        return d

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Structure]:
        start, stop = self._check_range(start, stop)
        schema = self._first_schema()
        name = os.path.basename(os.fspath(self.path))
        for i, atoms, extra in self._atoms_range(start, stop):
            try:
                yield self._convert(i, atoms, extra, schema, name)
            except SourceError as err:
                self._bad_record(i, err)

    def _convert(self, i, atoms, extra, schema, name) -> Structure:
        res = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        energy = forces = None
        if "energy" in res:
            energy = float(res["energy"]) * self._factor
        if "forces" in res:
            forces = np.asarray(res["forces"], dtype=np.float64)
            if forces.shape != (len(atoms), 3):
                raise SourceError(f"shape {forces.shape} does not match {len(atoms)} atoms",
                                  path=self.path, record=i, field="forces")
            forces = forces * self._factor
        merged = {**atoms.info, **extra, "file_name": name}
        if "free_energy" in res:
            merged["free_energy"] = float(res["free_energy"]) * self._factor
        info = {}
        for k, e in schema.info.items():
            v = merged.get(k, e.fill)
            if scalar_dtype(v) != e.dtype and not (e.dtype == "float64"
                                                   and scalar_dtype(v) == "int64"):
                raise SourceError(f"value {v!r:.60} is not of the declared type {e.dtype}",
                                  path=self.path, record=i, field=k)
            info[k] = float(v) if e.dtype == "float64" else v
        n = len(atoms)
        atom_info = {"tags": np.asarray(atoms.get_tags(), dtype=np.int64),
                     "fixed": fixed_mask(atoms)}
        for k, e in schema.atom_info.items():
            if k in atom_info:
                continue
            if k not in atoms.arrays:
                atom_info[k] = np.full((n,) + e.shape, e.fill,
                                       dtype=object if e.dtype == "str" else e.dtype)
                continue
            arr = np.asarray(atoms.arrays[k])
            if arr.shape != (n,) + e.shape:
                raise SourceError(f"per-atom array of shape {arr.shape}; the first frame's is "
                                  f"{(n,) + e.shape}", path=self.path, record=i, field=k)
            atom_info[k] = arr.astype(str) if e.dtype == "str" else arr.astype(e.dtype)
        return Structure(numbers=atoms.numbers, positions=atoms.positions,
                         cell=np.asarray(atoms.cell[:]), pbc=atoms.pbc, energy=energy,
                         forces=forces, source_index=i, info=info, atom_info=atom_info)
