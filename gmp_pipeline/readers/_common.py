"""Small helpers shared by the reader modules: explicit unit conversion, value checks and
(ext)xyz frame scanning."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError, SourceError

#: energy units a reader can convert to, as eV per unit.  Constants are ASE's defaults
#: (CODATA 2014): 1 Hartree = 27.211386024367243 eV, 1 kcal/mol = 0.04336410390059322 eV.
EV_PER_UNIT: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "Hartree": 27.211386024367243,
    "kcal/mol": 0.04336410390059322,
    "kJ/mol": 0.010364269574711572,
}
_ALIASES = {"ev": "eV", "mev": "meV", "hartree": "Hartree", "ha": "Hartree",
            "kcal/mol": "kcal/mol", "kcal_mol": "kcal/mol", "kj/mol": "kJ/mol"}
CONSTANTS_NAME = "ASE defaults (CODATA 2014)"


def normalize_energy_unit(unit: str) -> str:
    key = _ALIASES.get(str(unit).strip().lower())
    if key is None:
        raise InputError(f"energy_unit {unit!r} is unknown; choose one of {', '.join(EV_PER_UNIT)}")
    return key


def energy_conversion(source_unit: str, target_unit: str | None) -> tuple[float, str]:
    """(factor, unit): multiply source energies (and forces) by factor to get ``unit``.

    ``target_unit=None`` means no conversion (factor exactly 1.0, unit unchanged).
    """
    if target_unit is None:
        return 1.0, source_unit
    target = normalize_energy_unit(target_unit)
    if target == source_unit:
        return 1.0, source_unit
    return EV_PER_UNIT[source_unit] / EV_PER_UNIT[target], target


def make_units(energy_unit: str | None, *, energy_kind: str | None, forces: bool,
               length: str = "Angstrom") -> dict[str, str]:
    units = {"length": length}
    if energy_unit is not None:
        units["energy"] = energy_unit
        if forces:
            units["forces"] = f"{energy_unit}/{length}"
    if energy_kind is not None:
        units["energy_kind"] = energy_kind
    return units


def conversion_record(source_unit: str, unit: str, factor: float) -> dict[str, Any]:
    return {"from": source_unit, "to": unit, "factor": factor,
            "constants": CONSTANTS_NAME if factor != 1.0 else None}


def as_positions(value, n: int, *, path, record, field="positions") -> np.ndarray:
    """Validate and cast an (n, 3) array to float64."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - defensive
        raise SourceError(f"cannot convert to an array ({exc})", path=path, record=record,
                          field=field) from None
    if arr.dtype.kind not in "fiu":
        raise SourceError(f"non-numeric values (dtype {arr.dtype})", path=path, record=record,
                          field=field)
    if arr.shape != (n, 3):
        raise SourceError(f"shape {arr.shape} does not match {n} atoms (expected ({n}, 3))",
                          path=path, record=record, field=field)
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise SourceError("contains non-finite values", path=path, record=record, field=field)
    return arr


def as_numbers(value, *, path, record, field="numbers") -> np.ndarray:
    """Validate atomic numbers (any numeric dtype holding integers 1..118) and cast to int64."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise SourceError(f"non-numeric values (dtype {arr.dtype})", path=path, record=record,
                          field=field)
    arr = arr.reshape(-1)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))][0]
            raise SourceError(f"atomic number {bad!r} is not an integer", path=path,
                              record=record, field=field)
    out = arr.astype(np.int64)
    if out.size and (out.min() < 1 or out.max() > 118):
        bad = out[(out < 1) | (out > 118)][0]
        raise SourceError(f"atomic number {bad} is outside 1..118", path=path, record=record,
                          field=field)
    return out


def as_scalar(value, *, path, record, field, kind: str = "float"):
    """A Python float/int from a number, numpy scalar, or 0-d/1-element array."""
    try:
        arr = np.asarray(value)
    except Exception:  # pragma: no cover
        arr = np.asarray(object())
    if arr.dtype.kind not in "fiub" or arr.size != 1:
        raise SourceError(f"expected one number, got {value!r:.80}", path=path, record=record,
                          field=field)
    item = arr.reshape(-1)[0]
    if kind == "int":
        if arr.dtype.kind == "f" and item != np.round(item):
            raise SourceError(f"expected an integer, got {item!r}", path=path, record=record,
                              field=field)
        return int(item)
    return float(item)


def scan_xyz_frames(f, path) -> tuple[np.ndarray, np.ndarray]:
    """(offset, atom count) of every frame of an (ext)xyz stream ``f`` opened in binary mode
    (a plain or an ``lzma`` file): offsets are positions in the (decompressed) stream."""
    offsets, counts = [], []
    pos = 0
    record = 0
    while True:
        line = f.readline()
        if not line:
            break
        if not line.strip():
            pos += len(line)
            continue
        try:
            n = int(line.split()[0])
        except ValueError:
            raise SourceError(f"expected an atom count, got {line[:60]!r}", path=path,
                              record=record, field="natoms") from None
        offsets.append(pos)
        counts.append(n)
        pos += len(line)
        for k in range(n + 1):
            line = f.readline()
            if not line:
                raise SourceError(f"file ends inside the frame (after {max(k - 1, 0)} of {n} "
                                  "atom lines)", path=path, record=record, field="atoms")
            pos += len(line)
        record += 1
    return np.asarray(offsets, dtype=np.int64), np.asarray(counts, dtype=np.int64)


MOLECULE_CELL = np.zeros((3, 3))
MOLECULE_PBC = np.zeros(3, dtype=bool)
