"""The reader protocol and the registry that resolves ``featurize <kind>``.

A reader describes one source dataset.  It must

* be cheap to construct and to pickle: it stores paths and options only and opens files lazily,
  once per process (``__getstate__`` drops open handles);
* know its length and every structure's atom count (:meth:`Reader.n_atoms`) without reading
  positions, so the pipeline can plan tasks balanced by atoms;
* read any index range ``[start, stop)`` independently (:meth:`Reader.read`), yielding
  :class:`~gmp_pipeline.structure.Structure` objects whose ``source_index`` is the position in
  the source;
* record units (:attr:`Reader.units`) and never convert silently;
* declare the extras it yields (:meth:`Reader.schema`) so a store can be laid out before any
  record is read.

Bad records raise :class:`~gmp_pipeline.errors.SourceError` naming the file, the record and the
field.  With ``skip_bad_records=True`` a reader logs and skips them instead and lists them in
:attr:`Reader.skipped`.
"""
from __future__ import annotations

import abc
import logging
from typing import Any, ClassVar, Iterator

import numpy as np

from ..errors import InputError, SourceError
from ..structure import Structure

#: logger used by every reader (skipped records are logged here at WARNING level)
logger = logging.getLogger("gmp_pipeline.readers")

_REGISTRY: dict[str, type["Reader"]] = {}


def register_reader(name: str):
    """Class decorator: make a reader available as ``featurize <name>``."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def reader_names() -> list[str]:
    """Names of every registered reader kind."""
    from . import _load_all  # noqa: F401  (imports the modules, which register themselves)

    return sorted(_REGISTRY)


def get_reader_class(name: str) -> type["Reader"]:
    names = reader_names()
    if name not in _REGISTRY:
        raise InputError(f"source kind {name!r} is unknown; choose one of {', '.join(names)}")
    return _REGISTRY[name]


def open_reader(kind: str, path, **options) -> "Reader":
    """Construct the reader registered as ``kind`` for ``path``."""
    return get_reader_class(kind)(path, **options)


class Reader(abc.ABC):
    """Base class of every source reader (see the module docstring for the contract)."""

    name: ClassVar[str] = "?"
    #: units of the quantities the reader yields, e.g. {"length": "Angstrom", "energy": "eV",
    #: "forces": "eV/Angstrom"}; subclasses set it per instance when it depends on the file.
    units: dict[str, str]

    def __init__(self, path, *, skip_bad_records: bool = False, **options: Any):
        """``options``: the reader's own settings, recorded in :meth:`describe` (and so in a
        store's fingerprint); those given as None (left at their default) are left out."""
        self.path = path
        self.skip_bad_records = bool(skip_bad_records)
        self.options = {k: v for k, v in options.items() if v is not None}
        self.skipped: list[tuple[int, str]] = []

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of structures in the source."""

    @abc.abstractmethod
    def n_atoms(self) -> np.ndarray:
        """(len(self),) int64 atom counts, computed without reading positions where possible."""

    @abc.abstractmethod
    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Structure]:
        """Yield the structures with source index in ``[start, stop)``, in order."""

    def schema(self) -> dict[str, dict[str, Any]]:
        """Extras this reader yields, for laying out a store before reading.

        Returns ``{"info": {name: dtype}, "atom_info": {name: dtype}, "has_energy": bool,
        "has_forces": bool}``.  ``dtype`` is a numpy dtype string; ``"str"`` for text.
        """
        return {"info": {}, "atom_info": {}, "has_energy": False, "has_forces": False}

    def describe(self) -> dict[str, Any]:
        """Provenance: reader name, path and options (JSON-serialisable)."""
        return {"reader": self.name, "path": str(self.path),
                "options": {k: v for k, v in self.options.items()},
                "skip_bad_records": self.skip_bad_records, "units": dict(self.units)}

    def __iter__(self) -> Iterator[Structure]:
        return self.read(0, len(self))

    # -- helpers shared by the readers ------------------------------------------------------------

    #: instance attributes that hold open handles or large caches; dropped when pickling so a
    #: reader ships cheaply to a Dask worker and reopens its files lazily there.
    _transient: ClassVar[tuple[str, ...]] = ()

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in self._transient:
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _bad_record(self, index: int, error: SourceError) -> None:
        """Raise ``error``, or (with ``skip_bad_records``) log it and list record ``index``."""
        if not self.skip_bad_records:
            raise error
        if all(i != index for i, _ in self.skipped):
            self.skipped.append((int(index), str(error)))
            logger.warning("skipping bad record %d of %s: %s", index, self.path, error)

    def _check_range(self, start: int, stop: int | None) -> tuple[int, int]:
        n = len(self)
        stop = n if stop is None else int(stop)
        start = int(start)
        if not (0 <= start <= stop <= n):
            raise InputError(f"index range [{start}, {stop}) is outside 0..{n} of {self.path}")
        return start, stop
