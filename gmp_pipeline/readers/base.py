"""The reader protocol (the registry that resolves ``featurize <kind>`` is
:mod:`gmp_pipeline.readers`).

A reader describes one source dataset.  It must

* be cheap to construct and to pickle: it stores paths and options only and opens files lazily,
  once per process (``__getstate__`` drops open handles);
* know its length and every structure's atom count (:meth:`Reader.n_atoms`) without reading
  positions, so the pipeline can plan tasks balanced by atoms; a reader whose source has no
  size table returns None from :meth:`Reader.cheap_n_atoms` and counts any range of records
  with :meth:`Reader.n_atoms_range`, which the pipeline runs in parallel on the cluster;
* read any index range ``[start, stop)`` independently (:meth:`Reader.read`), yielding
  :class:`~gmp_pipeline.structure.Structure` objects whose ``source_index`` is the position in
  the source;
* record units (:attr:`Reader.units`) and never convert silently;
* declare what it yields (:meth:`Reader.schema`, a typed :class:`~gmp_pipeline.schema.Schema`:
  every extra with its dtype and shape, whether there are energies and forces) so a store can be
  laid out before any record is read; provenance (which field gave the energy, the file
  dialect, ...) goes to :meth:`Reader.describe`.

Bad records raise :class:`~gmp_pipeline.errors.SourceError` naming the file, the record and the
field.  With ``skip_bad_records=True`` a reader logs and skips them instead and lists them in
:attr:`Reader.skipped`.
"""
from __future__ import annotations

import abc
import difflib
import inspect
import logging
import os
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np

from ..errors import InputError, SourceError
from ..schema import Schema
from ..structure import Structure

#: logger used by every reader (skipped records are logged here at WARNING level)
logger = logging.getLogger("gmp_pipeline.readers")

def missing_elements_text(missing: Iterable[int], where: str) -> str:
    """'element Am (Z=95) has no entry in <where>' (plural for several)."""
    from ..psp import element_symbol

    missing = sorted(int(z) for z in missing)
    names = ", ".join(f"{element_symbol(z)} (Z={z})" for z in missing)
    return (f"element {names} has no entry in {where}" if len(missing) == 1 else
            f"elements {names} have no entry in {where}")


class Reader(abc.ABC):
    """Base class of every source reader (see the module docstring for the contract)."""

    #: the kind this reader is registered as (``featurize <name>``)
    name: ClassVar[str] = "?"
    #: units of the quantities the reader yields, e.g. {"length": "Angstrom", "energy": "eV",
    #: "forces": "eV/Angstrom"}; subclasses set it per instance when it depends on the file.
    units: dict[str, str]

    @classmethod
    def open(cls, path, **options) -> "Reader":
        """The reader for ``path``; a reader kind covering several formats (``ocp``) returns
        the reader of the format it detects."""
        return cls(path, **options)

    def __init__(self, path, *, skip_bad_records: bool = False, **options: Any):
        """``options``: the reader's own settings, recorded in :meth:`describe` (and so in a
        store's fingerprint); those given as None (left at their default) are left out."""
        self._check_options(options)
        self.path = path
        self.skip_bad_records = bool(skip_bad_records)
        self.options = {k: v for k, v in options.items() if v is not None}
        self.skipped: list[tuple[int, str]] = []

    @classmethod
    def option_names(cls) -> list[str]:
        """The options this reader accepts: the keyword parameters of ``__init__`` along the
        class hierarchy (so a subclass declares an option just by naming it)."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and \
                        p.name not in ("self", "path"):
                    names.add(p.name)
        return sorted(names)

    def _check_options(self, options: dict[str, Any]) -> None:
        """Refuse options no ``__init__`` of this reader declares (a misspelt option would
        otherwise be recorded and silently ignored)."""
        valid = self.option_names()
        unknown = [k for k in options if k not in valid]
        if not unknown:
            return
        key = unknown[0]
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = getattr(self, "format_name", None)
        reader = f"the {self.name} reader" + (f" ({what})" if what and self.name == "ocp" else "")
        raise InputError(f"unknown reader option {key!r} for {reader}{hint}; valid options: "
                         f"{', '.join(valid)}")

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of structures in the source."""

    @abc.abstractmethod
    def n_atoms(self) -> np.ndarray:
        """(len(self),) int64 atom counts, computed without reading positions where possible."""

    def cheap_n_atoms(self) -> np.ndarray | None:
        """The atom counts when a size table gives them without decoding every record, else
        None (then the pipeline counts them with :meth:`n_atoms_range` in parallel tasks on the
        cluster, :mod:`gmp_pipeline.pipeline.counts`).  Default: :meth:`n_atoms`, for the
        readers whose counts always come from an index or a header."""
        return self.n_atoms()

    def n_atoms_range(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) int64 atom counts of records ``[start, stop)``; called in a worker
        task (on an unpickled reader) when :meth:`cheap_n_atoms` is None.  A bad record counts
        0 atoms with ``skip_bad_records`` (its task reports it when featurizing), else raises
        :class:`~gmp_pipeline.errors.SourceError`.  Default: a slice of :meth:`n_atoms`."""
        start, stop = self._check_range(start, stop)
        return np.asarray(self.n_atoms(), dtype=np.int64)[start:stop]

    @abc.abstractmethod
    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Structure]:
        """Yield the structures with source index in ``[start, stop)``, in order."""

    def schema(self) -> Schema:
        """What this reader yields, for laying out a store before reading (see
        :class:`~gmp_pipeline.schema.Schema`); its ``units`` are :attr:`units`."""
        return Schema.build(units=self.units)

    def describe(self) -> dict[str, Any]:
        """Provenance: reader name, path and options (JSON-serialisable)."""
        return {"reader": self.name, "path": str(self.path),
                "options": {k: v for k, v in self.options.items()},
                "skip_bad_records": self.skip_bad_records, "units": dict(self.units)}

    def elements(self) -> set[int] | None:
        """The atomic numbers present in the source when they are known cheaply (without reading
        every record), else None; lets a run refuse a pseudopotential that lacks one of them
        before anything starts."""
        return None

    def source_paths(self) -> list[str]:
        """The files and directories the source is read from (its path and any option naming
        an existing path, e.g. a split or an exclusion list), for the store's fingerprint."""
        paths = [os.fspath(self.path)]
        for value in self.options.values():
            if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
                paths.append(os.fspath(value))
        return paths

    def record_path(self, structure: Structure) -> str:
        """The file a structure came from: the reader's path, or the member ``file_name`` of a
        directory or archive source."""
        path = os.fspath(self.path)
        name = structure.info.get("file_name") if structure.info else None
        if isinstance(name, str) and name and os.path.basename(path) != name:
            return os.path.join(path, name)
        return path

    def drop_missing_elements(self, structures: Iterable[Structure],
                              known: Callable[[int], bool], where: str) -> list[Structure]:
        """``structures`` without those holding an element ``known(z)`` refuses: each of those
        is a bad record (raised, or with ``skip_bad_records`` logged, listed and dropped) naming
        the file, the record and the element; ``where`` names what lacks it (the psp file)."""
        kept = []
        for s in structures:
            missing = sorted({int(z) for z in np.unique(s.numbers) if not known(int(z))})
            if missing:
                self._bad_record(s.source_index, SourceError(
                    missing_elements_text(missing, where), path=self.record_path(s),
                    record=s.source_index, field="numbers"))
                continue
            kept.append(s)
        return kept

    def drop_nonfinite(self, structures: Iterable[Structure]) -> list[Structure]:
        """``structures`` without those whose positions or cell are not finite: each of those
        is a bad record (raised, or with ``skip_bad_records`` logged, listed and dropped) naming
        the file, the record and the field."""
        kept = []
        for s in structures:
            bad = None
            pos = np.asarray(s.positions)
            if not np.all(np.isfinite(pos)):
                a = int(np.flatnonzero(~np.all(np.isfinite(pos), axis=1))[0])
                bad = ("positions", f"atom {a} has a non-finite position {pos[a].tolist()}")
            elif not np.all(np.isfinite(np.asarray(s.cell))):
                bad = ("cell", f"non-finite cell {np.asarray(s.cell).tolist()}")
            if bad:
                self._bad_record(s.source_index, SourceError(
                    bad[1], path=self.record_path(s), record=s.source_index, field=bad[0]))
                continue
            kept.append(s)
        return kept

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
