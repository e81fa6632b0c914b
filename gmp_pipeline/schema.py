"""What a reader yields, declared before any record is read: the typed :class:`Schema`.

A reader's :meth:`~gmp_pipeline.readers.base.Reader.schema` returns a :class:`Schema`; the store
layout (:func:`gmp_pipeline.store.layout.array_specs`) turns every :class:`Extra` of it into one
array with the extra's dtype and trailing shape, so whatever a reader declares reaches the store
as declared.  Provenance (which source field gave the energy, the file dialect, ...) is not part
of the schema: it belongs in the reader's ``describe()``.

>>> s = Schema.build(info={"sid": "int64"}, atom_info={"tags": "int64",
...                  "pos_relaxed": ("float64", (3,))}, has_energy=True)
>>> s.atom_info["pos_relaxed"].shape
(3,)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import InputError

_DEFAULT_FILL = {"b": False, "i": -1, "u": 0, "f": float("nan"), "U": "", "O": ""}


def normalize_dtype(dt) -> str:
    """A schema dtype as a numpy dtype name, or ``"str"`` for text."""
    text = str(dt)
    if text in ("str", "object", "O", "string") or text.lstrip("<>|=").startswith("U"):
        return "str"
    return np.dtype(text).name


def fill_for(dtype: str):
    """The value of a row nobody wrote (and of an extra a record lacks): NaN, -1, False, ""."""
    if dtype == "str":
        return ""
    return _DEFAULT_FILL.get(np.dtype(dtype).kind, 0)


@dataclass(frozen=True)
class Extra:
    """One extra a reader yields: per structure (``Structure.info``) or per atom
    (``Structure.atom_info``), with its numpy ``dtype`` name (``"str"`` for text) and the
    ``shape`` of one value (``()`` a scalar per structure/atom, ``(3,)`` a vector per atom)."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))
        if self.dtype == "str" and self.shape:
            raise InputError(f"extra {self.name!r}: text extras must be scalars")

    @property
    def fill(self):
        return fill_for(self.dtype)


def _extras(spec) -> Mapping[str, Extra]:
    out = {}
    for name, v in sorted((spec or {}).items()):
        if isinstance(v, Extra):
            out[name] = v
        elif isinstance(v, (tuple, list)):
            out[name] = Extra(name, v[0], tuple(v[1]) if len(v) > 1 else ())
        else:
            out[name] = Extra(name, v)
    return out


@dataclass(frozen=True)
class Schema:
    """Everything a store needs to know of a source before reading it.

    ``info`` / ``atom_info``: the extras by name (sorted; plain dicts, so a schema pickles --
    treat them as read-only); ``has_energy`` / ``has_forces``:
    whether records carry ``Structure.energy`` / ``Structure.forces``; ``units``: units of the
    quantities yielded (``length``, ``energy``, ``forces``, and ``energy_kind``).
    """

    info: Mapping[str, Extra] = field(default_factory=dict)
    atom_info: Mapping[str, Extra] = field(default_factory=dict)
    has_energy: bool = False
    has_forces: bool = False
    units: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, *, info=None, atom_info=None, has_energy: bool = False,
              has_forces: bool = False, units=None) -> "Schema":
        """A schema from ``{name: dtype}`` or ``{name: (dtype, shape)}`` mappings."""
        return cls(info=_extras(info), atom_info=_extras(atom_info),
                   has_energy=bool(has_energy), has_forces=bool(has_forces),
                   units=dict(units or {}))

    @classmethod
    def coerce(cls, obj: Any, units=None) -> "Schema":
        """``obj`` as a Schema: a Schema (given ``units`` fill in missing ones) or the dict form
        ``{"info": {name: dtype}, "atom_info": ..., "atom_info_shapes": {name: shape},
        "has_energy": ..., "has_forces": ...}`` (keys starting with ``_`` are ignored)."""
        if isinstance(obj, Schema):
            if units is not None and not obj.units:
                return cls(obj.info, obj.atom_info, obj.has_energy, obj.has_forces,
                           dict(units))
            return obj
        obj = obj or {}
        shapes = obj.get("atom_info_shapes") or {}
        atom = {k: (v, tuple(shapes.get(k, ()))) for k, v in (obj.get("atom_info") or {}).items()}
        return cls.build(info=obj.get("info"), atom_info=atom, has_energy=obj.get("has_energy"),
                         has_forces=obj.get("has_forces"), units=units)

    def with_units(self, units) -> "Schema":
        return Schema(self.info, self.atom_info, self.has_energy, self.has_forces,
                      dict(units or {}))

    def fill_info(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` restricted to the declared ``info`` extras, the fill value for those
        missing."""
        return {k: values.get(k, e.fill) for k, e in self.info.items()}

    def as_dict(self) -> dict:
        """JSON form (dtype, and shape where not scalar), e.g. for ``describe()`` or tests."""
        def enc(m):
            return {k: (e.dtype if not e.shape else [e.dtype, list(e.shape)]) for k, e in m.items()}

        return {"info": enc(self.info), "atom_info": enc(self.atom_info),
                "has_energy": self.has_energy, "has_forces": self.has_forces,
                "units": dict(self.units)}


def scalar_dtype(value) -> str | None:
    """The schema dtype of one scalar value (Python or numpy), None for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int64"
    if isinstance(value, (float, np.floating)):
        return "float64"
    if isinstance(value, str):
        return "str"
    return None


__all__ = ["Extra", "Schema", "normalize_dtype", "fill_for", "scalar_dtype"]
