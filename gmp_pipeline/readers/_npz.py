"""The shared frame-npz reader (MD17, rMD17), on the memory-mapped npz access of
:mod:`gmp_pipeline.npzfile`.

Members stored without compression (the sGDML/rMD17 downloads) are memory-mapped: reading
frames ``[a, b)`` touches only those bytes.  Deflated members are loaded whole once per process
(recorded in ``describe()``).
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterator

import numpy as np

from ..errors import SourceError
from ..npzfile import NpzArrays
from ..schema import Schema
from ..structure import Structure
from ._common import (MOLECULE_CELL, MOLECULE_PBC, as_numbers, conversion_record,
                      energy_conversion, make_units, normalize_energy_unit)
from .base import Reader

_CHUNK = 512  # frames converted per step while streaming


_E_UNITS = {"kcal/mol": "kcal/mol", "ev": "eV", "ha": "Hartree", "hartree": "Hartree",
            "au": "Hartree", "kj/mol": "kJ/mol", "mev": "meV"}
_R_UNITS = {"ang", "angstrom", "a", "å"}


class FrameNpzReader(Reader):
    """Shared logic of the MD17 and rMD17 readers: M frames of one molecule in one npz."""

    # names of the members, set by subclasses
    key_R: str
    key_z: str
    key_E: str
    key_F: str
    #: extracts the molecule name from a file stem when the npz has no ``name`` key
    stem_pattern = re.compile(r"^(?:md17_)?(.+?)(?:_dft)?$")
    default_energy_unit = "kcal/mol"
    energy_kind = "total"
    _transient = ("_npz",)

    def __init__(self, path, *, energy_unit: str | None = None, molecule: str | None = None,
                 skip_bad_records: bool = False, **options: Any):
        super().__init__(path, skip_bad_records=skip_bad_records, energy_unit=energy_unit,
                         molecule=molecule, **options)
        if energy_unit is not None:
            normalize_energy_unit(energy_unit)  # fail early on an unknown unit
        self._energy_unit_req = energy_unit
        self._molecule = molecule
        self._shape: tuple[int, int] | None = None  # (M, N), read once and pickled with the reader
        self._meta: dict[str, Any] | None = None

    # -- lazy opening ----------------------------------------------------------------------------
    def _open(self) -> NpzArrays:
        npz = self.__dict__.get("_npz")
        if npz is None:
            npz = NpzArrays(self.path)
            self._npz = npz
            if self._shape is None:
                self._validate(npz)
        return npz

    def _validate(self, npz: NpzArrays) -> None:
        p = self.path
        for key in (self.key_R, self.key_z, self.key_E, self.key_F):
            if key not in npz:
                raise SourceError(f"missing key (the file has {sorted(npz.keys())})", path=p,
                                  field=key)
        shp = {k: npz.header(k)[0] for k in (self.key_R, self.key_z, self.key_E, self.key_F)}
        dts = {k: npz.header(k)[1] for k in shp}
        for k, dt in dts.items():
            if dt.kind not in "fiu":
                raise SourceError(f"non-numeric dtype {dt}", path=p, field=k)
        R, z, E, F = (shp[self.key_R], shp[self.key_z], shp[self.key_E], shp[self.key_F])
        if len(R) != 3 or R[2] != 3:
            raise SourceError(f"shape {R} is not (M, N, 3)", path=p, field=self.key_R)
        M, N = R[0], R[1]
        if tuple(z) != (N,):
            raise SourceError(f"shape {z} does not match {N} atoms per frame of "
                              f"{self.key_R!r} {R}", path=p, field=self.key_z)
        if tuple(E) not in ((M,), (M, 1)):
            raise SourceError(f"shape {E} does not match {M} frames", path=p, field=self.key_E)
        if tuple(F) != (M, N, 3):
            raise SourceError(f"shape {F} does not match {self.key_R!r} {R}", path=p,
                              field=self.key_F)
        self._extra_validate(npz, M, N)
        self._numbers = as_numbers(npz.array(self.key_z), path=p, record=None, field=self.key_z)
        meta = {k: npz.text(k) for k in ("name", "theory", "type", "md5", "r_unit", "e_unit",
                                         "code_version")}
        meta = {k: v for k, v in meta.items() if v is not None}
        src_unit = self.default_energy_unit
        if "e_unit" in meta:
            src_unit = _E_UNITS.get(meta["e_unit"].strip().lower())
            if src_unit is None:
                raise SourceError(f"unknown energy unit {meta['e_unit']!r}", path=p,
                                  field="e_unit")
        if "r_unit" in meta and meta["r_unit"].strip().lower() not in _R_UNITS:
            raise SourceError(f"length unit {meta['r_unit']!r} is not Angstrom (no silent "
                              "conversion)", path=p, field="r_unit")
        self._cell, self._pbc = MOLECULE_CELL, MOLECULE_PBC
        if "lattice" in npz:
            lat = np.asarray(npz.array("lattice"), dtype=np.float64)
            if lat.shape != (3, 3):
                raise SourceError(f"shape {lat.shape} is not (3, 3)", path=p, field="lattice")
            self._cell, self._pbc = lat.T.copy(), np.ones(3, dtype=bool)  # sGDML: columns
        self._source_unit = src_unit
        self._factor, self._unit = energy_conversion(src_unit, self._energy_unit_req)
        self._compressed = sorted(k for k in (self.key_R, self.key_E, self.key_F)
                                  if npz.compressed(k))
        self._meta = meta
        self._shape = (M, N)

    def _extra_validate(self, npz: NpzArrays, M: int, N: int) -> None:
        """Hook for subclasses (rMD17 extra keys)."""

    # -- protocol ------------------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._shape is None:
            self._open()

    @property
    def units(self) -> dict[str, str]:  # type: ignore[override]
        self._ensure()
        return make_units(self._unit, energy_kind=self.energy_kind, forces=True)

    @property
    def molecule(self) -> str:
        self._ensure()
        if self._molecule is not None:
            return self._molecule
        if self._meta.get("name"):
            return self._meta["name"]
        stem = os.path.splitext(os.path.basename(str(self.path)))[0]
        m = self.stem_pattern.match(stem)
        return m.group(1) if m else stem

    def _frames(self) -> np.ndarray | None:
        """Frame rows of the npz in reader order, or None for all frames (subclass hook)."""
        return None

    def __len__(self) -> int:
        self._ensure()
        rows = self._frames()
        return self._shape[0] if rows is None else len(rows)

    def n_atoms(self) -> np.ndarray:
        self._ensure()
        return np.full(len(self), self._shape[1], dtype=np.int64)

    def elements(self) -> set[int]:
        self._ensure()
        return {int(z) for z in self._numbers}

    def schema(self) -> Schema:
        return Schema.build(info={"molecule": "str", "frame_index": "int64",
                                  **self._extra_info_schema()},
                            atom_info=self._atom_info_schema(), has_energy=True, has_forces=True,
                            units=self.units)

    def _extra_info_schema(self) -> dict[str, str]:
        return {}

    def _atom_info_schema(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        self._ensure()
        d = super().describe()
        d.update({"format": self.format_name, "molecule": self.molecule,
                  "metadata": dict(self._meta), "n_frames_in_file": self._shape[0],
                  "energy_conversion": conversion_record(self._source_unit, self._unit,
                                                         self._factor),
                  "deflated_members_loaded_whole": self._compressed})
        return d

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Structure]:
        npz = self._open()
        start, stop = self._check_range(start, stop)
        rows = self._frames()
        R, E, F = npz.array(self.key_R), npz.array(self.key_E), npz.array(self.key_F)
        extras = self._extra_arrays(npz)
        molecule, factor = self.molecule, self._factor
        for a in range(start, stop, _CHUNK):
            b = min(a + _CHUNK, stop)
            sel = slice(a, b) if rows is None else rows[a:b]
            pos = np.asarray(R[sel], dtype=np.float64)
            ene = np.asarray(E[sel], dtype=np.float64).reshape(-1)
            frc = np.asarray(F[sel], dtype=np.float64)
            ext = {k: np.asarray(v[sel]) for k, v in extras.items()}
            frame_ids = np.arange(a, b) if rows is None else rows[a:b]
            if factor != 1.0:
                ene = ene * factor
                frc = frc * factor
            ok_pos = np.isfinite(pos).all(axis=(1, 2))
            ok_e = np.isfinite(ene)
            ok_f = np.isfinite(frc).all(axis=(1, 2))
            for j in range(b - a):
                i = a + j
                if not (ok_pos[j] and ok_e[j] and ok_f[j]):
                    field = (self.key_R if not ok_pos[j] else
                             self.key_E if not ok_e[j] else self.key_F)
                    self._bad_record(i, SourceError("non-finite value", path=self.path,
                                                    record=int(frame_ids[j]), field=field))
                    continue
                info = {"molecule": molecule, "frame_index": int(frame_ids[j])}
                info.update(self._extra_info(ext, j, factor))
                yield Structure(numbers=self._numbers, positions=pos[j], cell=self._cell,
                                pbc=self._pbc, energy=float(ene[j]), forces=frc[j],
                                source_index=i, info=info)

    def _extra_arrays(self, npz: NpzArrays) -> dict[str, np.ndarray]:
        return {}

    def _extra_info(self, ext: dict[str, np.ndarray], j: int, factor: float) -> dict[str, Any]:
        return {}
