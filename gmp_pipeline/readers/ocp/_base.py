"""What the three OCP formats share: the reader base class (which picks the format's reader,
:meth:`OCPReader.open`), LMDB environments opened once per process, and format detection."""
from __future__ import annotations

import bisect
import glob
import importlib
import os
import re
from typing import Any, Iterator

import numpy as np

from ...errors import InputError, SourceError
from ...schema import Schema
from ...structure import Structure
from .._common import conversion_record, energy_conversion, make_units
from ..base import Reader

#: format name -> "module:Class" of its reader
FORMATS = {"lmdb": "gmp_pipeline.readers.ocp.pyg_lmdb:LegacyLMDBReader",
           "aselmdb": "gmp_pipeline.readers.ocp.aselmdb:AseLMDBReader",
           "extxyz": "gmp_pipeline.readers.ocp.s2ef:S2EFExtxyzReader"}

#: LMDB environments opened by this process, keyed by (pid, real path).  py-lmdb allows one
#: environment per file and process, and handles must not cross a fork, hence the pid.
_ENVS: dict[tuple[int, str], Any] = {}


def open_lmdb(path):
    """The read-only environment of ``path``, opened once per process."""
    key = (os.getpid(), os.path.realpath(os.fspath(path)))
    env = _ENVS.get(key)
    if env is None:
        env = _ENVS[key] = _open_lmdb_new(path)
    return env


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
    with open_lmdb(path).begin() as txn:
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


class OCPReader(Reader):
    """Dispatches to the LMDB, aselmdb or S2EF-extxyz reader (see the module docstring).

    Common options: ``format``, ``energy_unit`` (explicit conversion from eV), ``skip_bad_records``.
    """

    _transient = ("_counts", "_envs")
    dialect = "?"

    name = "ocp"

    def _count_records(self, start: int, stop: int, count_one) -> np.ndarray:
        """``count_one(i)`` (the atoms of record i) for records ``[start, stop)``; a record whose
        decoding fails is a bad record and counts 0 with ``skip_bad_records``."""
        self._setup()
        start, stop = self._check_range(start, stop)
        counts = np.zeros(stop - start, dtype=np.int64)
        for i in range(start, stop):
            try:
                counts[i - start] = count_one(i)
            except SourceError as err:
                self._bad_record(i, err)
        return counts

    @classmethod
    def open(cls, path, **options) -> "OCPReader":
        """The reader of the format ``path`` holds (or ``format=`` names)."""
        if cls is not OCPReader:
            return cls(path, **options)
        kind = options.get("format") or detect_format(path)
        target = FORMATS.get(kind)
        if target is None:
            raise InputError(f"ocp format {kind!r} is unknown; choose lmdb, aselmdb or "
                             "extxyz")
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(path, **options)

    def __init__(self, path, *, format: str | None = None, energy_unit: str | None = None,
                 skip_bad_records: bool = False, **options: Any):
        super().__init__(path, skip_bad_records=skip_bad_records, format=format,
                         energy_unit=energy_unit, **options)
        self._factor, self._unit = energy_conversion("eV", energy_unit)
        self._files: list[str] | None = None
        self._sizes: list[int] | None = None
        self._starts: list[int] | None = None
        self._schema: Schema | None = None
        self._prov: dict[str, Any] = {}   # dialect, energy_field, energy_kind (for describe)

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
        """The LMDB environment of file ``f``, looked up once per reader and process (the
        process-wide lookup resolves the real path: two system calls a record)."""
        envs = self.__dict__.get("_envs")
        pid = os.getpid()
        if envs is None or envs[0] != pid:
            envs = self._envs = (pid, {})
        env = envs[1].get(f)
        if env is None:
            env = envs[1][f] = open_lmdb(self._files[f])
        return env

    @property
    def units(self) -> dict[str, str]:  # type: ignore[override]
        self._first_schema()
        return make_units(self._unit, energy_kind=self._prov.get("energy_kind"), forces=True)

    def schema(self) -> Schema:
        return self._first_schema().with_units(self.units)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        self._setup()
        self._first_schema()
        d.update({"format": self.format_name, "dialect": self._prov.get("dialect", self.dialect),
                  "files": list(self._files), "records_per_file": list(self._sizes),
                  "energy_source_field": self._prov.get("energy_field"),
                  "energy_conversion": conversion_record("eV", self._unit, self._factor)})
        return d

    def _first_schema(self) -> Schema:
        """The schema (from the first record), and the provenance beside it in ``_prov``."""
        if self._schema is None:
            self._schema, self._prov = self._make_schema()
        return self._schema

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Structure]:
        start, stop = self._check_range(start, stop)
        schema = self._first_schema()
        for i, rec in self._records(start, stop):
            try:
                yield self._to_structure(i, rec, schema)
            except SourceError as err:
                self._bad_record(i, err)
