"""QM9 ``dsgdb9nsd_*.xyz`` files: a directory of them, or the ``dsgdb9nsd.xyz.tar.bz2`` archive
read in place (compression auto-detected, never extracted to disk).

Each file: N; ``gdb <index>`` + 15 properties; N atom lines (symbol, x, y, z in Angstrom, Mulliken
charge in e); harmonic frequencies (3N-6, or 3N-5 for linear molecules, cm^-1); two SMILES; two
InChI.  Mathematica exponents (``7.9254*^-6``) are accepted in every numeric field.

``Structure.energy`` is one header property (``energy_key``, default ``U0``) in Hartree, or in
``energy_unit`` when that explicit conversion is requested; all 15 properties are also kept in
``info`` in their original units (``describe()["property_units"]``).  No forces (equilibrium
geometries).  Molecules: cell zeros, pbc False.

Order: gdb-index order, for a directory and for an archive whatever its member order.  ``exclude_uncharacterized=True`` drops the 3,054 molecules listed in
``uncharacterized.txt`` (``uncharacterized=`` path, else the file next to ``path``); ``source_index``
is then the position among the kept molecules and ``info["gdb_index"]`` the QM9 index.

The archive is decompressed ONCE per run, when the index is first needed (``len()``,
``n_atoms()``, or pickling), into a scratch directory the reader owns and removes when closed,
collected or at exit (``_qm9_archive``; ``scratch_dir=`` chooses where); every ``read(a, b)``, in
any process and any order, then reads its members by offset.  Files are parsed in batches by
``_qm9_text.parse_batch``; a batch that does not fit the grammar is parsed file by file by
:func:`parse_qm9_text`, whose errors name the file, the record and the field.
"""
from __future__ import annotations

import os
import re
from itertools import islice
from typing import Any, Iterator

import numpy as np

from ..errors import InputError, SourceError
from ..structure import Structure
from ._common import (MOLECULE_CELL, MOLECULE_PBC, conversion_record, energy_conversion,
                      make_units)
from ..schema import Schema
from . import _qm9_archive as _arch
from ._qm9_text import NotParsed, parse_batch
from .base import Reader, logger

_BATCH = 512  # files parsed together

PROPERTIES = ("A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H",
              "G", "Cv")
PROPERTY_UNITS = {"A": "GHz", "B": "GHz", "C": "GHz", "mu": "Debye", "alpha": "Bohr^3",
                  "homo": "Hartree", "lumo": "Hartree", "gap": "Hartree", "r2": "Bohr^2",
                  "zpve": "Hartree", "U0": "Hartree", "U": "Hartree", "H": "Hartree",
                  "G": "Hartree", "Cv": "cal/(mol K)"}
_ENERGY_KEYS = tuple(k for k, u in PROPERTY_UNITS.items() if u == "Hartree")
_NAME = re.compile(r"(?:^|/)dsgdb9nsd_(\d+)\.xyz$")
_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def _num(text: str, *, path, record, field) -> float:
    try:
        return float(text.replace("*^", "e"))
    except ValueError:
        raise SourceError(f"non-numeric value {text!r}", path=path, record=record,
                          field=field) from None


def parse_qm9_text(text: str, *, path, record) -> dict[str, Any]:
    """Parse one dsgdb9nsd file into numbers, positions, charges and info fields."""
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise SourceError("empty file", path=path, record=record, field="natoms")
    try:
        n = int(lines[0].split()[0])
    except ValueError:
        raise SourceError(f"atom count {lines[0][:40]!r} is not an integer", path=path,
                          record=record, field="natoms") from None
    if n < 1:
        raise SourceError(f"atom count {n} is not positive", path=path, record=record,
                          field="natoms")
    if len(lines) < n + 5:
        where = "atoms" if len(lines) < n + 2 else "frequencies/SMILES/InChI"
        raise SourceError(f"file has {len(lines)} lines, expected {n + 5} for {n} atoms "
                          "(truncated?)", path=path, record=record, field=where)
    head = lines[1].split()
    if len(head) != 17 or head[0] != "gdb":
        raise SourceError(f"property line has {len(head)} fields (expected 'gdb', index and 15 "
                          f"values): {lines[1][:60]!r}", path=path, record=record,
                          field="properties")
    try:
        gdb = int(head[1])
    except ValueError:
        raise SourceError(f"molecule index {head[1]!r} is not an integer", path=path,
                          record=record, field="index") from None
    info: dict[str, Any] = {"gdb_index": gdb}
    for name, tok in zip(PROPERTIES, head[2:]):
        info[name] = _num(tok, path=path, record=record, field=name)
    numbers = np.empty(n, dtype=np.int64)
    xyzq = np.empty((n, 4), dtype=np.float64)
    for k in range(n):
        tok = lines[2 + k].split()
        if len(tok) != 5:
            raise SourceError(f"atom line {k} has {len(tok)} fields, expected 5: "
                              f"{lines[2 + k][:60]!r}", path=path, record=record,
                              field="atoms")
        z = _Z.get(tok[0])
        if z is None:
            raise SourceError(f"unknown element {tok[0]!r} in atom line {k}", path=path,
                              record=record, field="symbol")
        numbers[k] = z
        for c in range(4):
            xyzq[k, c] = _num(tok[1 + c], path=path, record=record,
                              field="charges" if c == 3 else "positions")
    freqs = lines[n + 2].split()
    for tok in freqs:
        _num(tok, path=path, record=record, field="frequencies")
    if n >= 2 and len(freqs) not in (3 * n - 6, 3 * n - 5):
        raise SourceError(f"{len(freqs)} frequencies for {n} atoms (expected {3 * n - 6} or, "
                          f"for a linear molecule, {3 * n - 5})", path=path, record=record,
                          field="frequencies")
    smiles = lines[n + 3].strip().split("\t")
    inchi = lines[n + 4].strip().split("\t")
    if len(smiles) != 2 or len(inchi) != 2:
        raise SourceError("expected two tab-separated SMILES and two InChI strings", path=path,
                          record=record, field="smiles" if len(smiles) != 2 else "inchi")
    info.update({"n_frequencies": len(freqs),
                 "frequencies": " ".join(f.replace("*^", "e") for f in freqs),
                 "linear": len(freqs) == 3 * n - 5 and n > 2,
                 "smiles_gdb": smiles[0].strip(), "smiles_relaxed": smiles[1].strip(),
                 "inchi_gdb": inchi[0].strip(), "inchi_relaxed": inchi[1].strip()})
    return {"numbers": numbers, "positions": np.ascontiguousarray(xyzq[:, :3]),
            "charges": xyzq[:, 3].copy(), "info": info}


def read_uncharacterized(path) -> set[int]:
    """QM9 indices listed in uncharacterized.txt (rows whose first token is an integer)."""
    out: set[int] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                tok = line.split()
                if tok and tok[0].isdigit():
                    out.add(int(tok[0]))
    except OSError as exc:
        raise SourceError(f"cannot read the uncharacterized list ({exc})", path=path) from None
    return out


#: columns of QM9's atomref.txt after the element symbol, with their units
ATOMREF_COLUMNS = (("zpve", "Hartree"), ("U0", "Hartree"), ("U", "Hartree"), ("H", "Hartree"),
                   ("G", "Hartree"), ("Cv", "cal/(mol K)"))


def read_atomref(path) -> dict[int, dict[str, float]]:
    """Per-element reference values of QM9's ``atomref.txt``: ``{Z: {"zpve", "U0", "U", "H",
    "G", "Cv"}}`` (units in :data:`ATOMREF_COLUMNS`).  The atomization energy of a molecule is
    its ``U0`` minus the sum of ``atomref[Z]["U0"]`` over its atoms."""
    from ase.data import atomic_numbers

    out: dict[int, dict[str, float]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the atomref table ({exc})", path=path) from None
    for lineno, line in enumerate(lines, start=1):
        tok = line.split()
        if not tok or tok[0] not in atomic_numbers or len(tok) == 1:
            continue  # rules, headers, blank lines
        if len(tok) != 1 + len(ATOMREF_COLUMNS):
            raise SourceError(f"expected {1 + len(ATOMREF_COLUMNS)} columns, got {len(tok)}",
                              path=path, record=f"line {lineno}", field=tok[0])
        values = {}
        for (name, _), text in zip(ATOMREF_COLUMNS, tok[1:]):
            values[name] = _num(text, path=path, record=f"line {lineno}", field=name)
        out[atomic_numbers[tok[0]]] = values
    if not out:
        raise SourceError("no element rows found (is this QM9's atomref.txt?)", path=path)
    return out


class QM9Reader(Reader):
    """QM9 molecules.  ``info``: ``gdb_index``, ``file_name``, the 15 properties, ``frequencies``
    (space-separated text, cm^-1), ``n_frequencies``, ``linear``, ``smiles_gdb``,
    ``smiles_relaxed``, ``inchi_gdb``, ``inchi_relaxed`` (+ ``uncharacterized`` when the list is
    known); ``atom_info``: ``charges`` (Mulliken, e)."""

    name = "qm9"

    _transient = ("_counts", "_stream", "_stage_owner")

    def __init__(self, path, *, uncharacterized=None, exclude_uncharacterized: bool = False,
                 energy_key: str = "U0", energy_unit: str | None = None,
                 skip_bad_records: bool = False, scratch_dir=None, **options: Any):
        if energy_key not in _ENERGY_KEYS:
            raise InputError(f"energy_key {energy_key!r} is not a QM9 energy property; choose "
                             f"one of {', '.join(_ENERGY_KEYS)}")
        super().__init__(path, skip_bad_records=skip_bad_records, energy_key=energy_key,
                         exclude_uncharacterized=bool(exclude_uncharacterized),
                         uncharacterized=None if uncharacterized is None
                         else os.fspath(uncharacterized),
                         energy_unit=energy_unit, **options)
        self._energy_key = energy_key
        self._factor, self._unit = energy_conversion("Hartree", energy_unit)
        self._exclude = bool(exclude_uncharacterized)
        self._unchar_path = None if uncharacterized is None else os.fspath(uncharacterized)
        self._unchar: set[int] | None = None
        self._gdb: np.ndarray | None = None     # gdb index (from the name) per kept molecule
        self._names: list[str] | None = None    # file names (directory) per kept molecule
        self._ordinal: np.ndarray | None = None  # archive member ordinal per kept molecule
        self._is_dir = os.path.isdir(path)
        # archive staging (not an option: it changes where, never what, is read)
        self._scratch_dir = None if scratch_dir is None else os.fspath(scratch_dir)
        self._stage_dir: str | None = None
        self._rows: np.ndarray | None = None    # staged-index row per kept molecule

    def __getstate__(self):
        if not self._is_dir:
            self._index()  # stage once here, so that no copy decompresses again
        state = super().__getstate__()
        if not self._is_dir:  # workers re-derive these from the staged index
            for key in ("_gdb", "_rows", "_ordinal"):
                state[key] = None
        return state

    def close(self) -> None:
        """Remove the archive's staging directory if this reader made it."""
        owner = self.__dict__.pop("_stage_owner", None)
        if owner is not None:
            owner()
        self._stage_dir = None
        self._gdb = self._rows = None

    def _staged(self) -> tuple[dict, int]:
        """(index, fd) of the staged archive, staging it first when needed."""
        if self._stage_dir is not None:
            try:
                return _arch.open_staged(self._stage_dir)
            except FileNotFoundError:
                logger.warning("the staging directory %s of %s is gone or not visible here; "
                               "decompressing the archive again in this process (pass "
                               "scratch_dir= a directory every worker sees)", self._stage_dir,
                               self.path)
        self._stage_dir = _arch.stage(os.fspath(self.path), self._scratch_dir)
        self._stage_owner = _arch.owner_finalizer(self, self._stage_dir)
        return _arch.open_staged(self._stage_dir)

    # -- indexing ----------------------------------------------------------------------------
    def _load_unchar(self) -> None:
        if self._unchar is not None:
            return
        path = self._unchar_path
        if path is None:
            base = self.path if self._is_dir else os.path.dirname(os.path.abspath(self.path))
            cand = os.path.join(base, "uncharacterized.txt")
            if os.path.exists(cand):
                path = self._unchar_path = cand
        if path is None:
            if self._exclude:
                raise InputError("exclude_uncharacterized=True needs uncharacterized.txt: pass "
                                 f"uncharacterized=<path> (none found next to {self.path})")
            return
        self._unchar = read_uncharacterized(path)
        if self._exclude and len(self._unchar) != 3054:
            logger.warning("%s lists %d molecules, not the 3,054 of the QM9 release", path,
                           len(self._unchar))

    def _keep(self, gdb: int) -> bool:
        return not (self._exclude and self._unchar is not None and gdb in self._unchar)

    def _index(self) -> None:
        if self._gdb is not None:
            return
        self._load_unchar()
        if self._is_dir:
            found = []
            for name in os.listdir(self.path):
                m = _NAME.search(name)
                if m:
                    found.append((int(m.group(1)), name))
            found.sort()
            kept = [(g, nm) for g, nm in found if self._keep(g)]
            self._gdb = np.asarray([g for g, _ in kept], dtype=np.int64)
            self._names = [nm for _, nm in kept]
        else:
            idx, _ = self._staged()
            if self._exclude and self._unchar:
                keep = ~np.isin(idx["gdb"], np.fromiter(self._unchar, dtype=np.int64))
            else:
                keep = np.ones(len(idx["gdb"]), dtype=bool)
            self._rows = np.nonzero(keep)[0]
            self._gdb = idx["gdb"][self._rows]
            self._ordinal = idx["ordinal"][self._rows]
            self._counts = idx["natoms"][self._rows]

    # -- protocol ----------------------------------------------------------------------------
    @property
    def units(self) -> dict[str, str]:  # type: ignore[override]
        return make_units(self._unit, energy_kind=self._energy_key, forces=False)

    def __len__(self) -> int:
        self._index()
        return len(self._gdb)

    def n_atoms(self) -> np.ndarray:
        self._index()
        counts = self.__dict__.get("_counts")
        if counts is None:
            if self._is_dir:
                out = np.zeros(len(self._names), dtype=np.int64)
                for i, name in enumerate(self._names):
                    p = os.path.join(self.path, name)
                    try:
                        with open(p, "rb") as f:
                            out[i] = int(f.readline().split()[0])
                    except (ValueError, IndexError, OSError) as exc:
                        self._bad_record(i, SourceError(f"cannot read the atom count ({exc})",
                                                        path=p, record=i, field="natoms"))
                counts = out
            else:
                self._gdb = None
                self._index()
                counts = self._counts
            self._counts = counts
        return counts.copy()

    def schema(self) -> Schema:
        info = {"gdb_index": "int64", "file_name": "str"}
        info.update({p: "float64" for p in PROPERTIES})
        info.update({"n_frequencies": "int64", "frequencies": "str", "linear": "bool",
                     "smiles_gdb": "str", "smiles_relaxed": "str", "inchi_gdb": "str",
                     "inchi_relaxed": "str"})
        self._load_unchar()
        if self._unchar is not None:
            info["uncharacterized"] = "bool"
        return Schema.build(info=info, atom_info={"charges": "float64"}, has_energy=True,
                            has_forces=False, units=self.units)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"format": "QM9 dsgdb9nsd xyz " + ("directory" if self._is_dir else "archive"),
                  "property_units": dict(PROPERTY_UNITS), "charges_unit": "e",
                  "frequencies_unit": "cm^-1", "uncharacterized_list": self._unchar_path,
                  "energy_conversion": conversion_record("Hartree", self._unit, self._factor)})
        return d

    def drop_missing_elements(self, structures, known, where):
        """QM9's grammar admits H, C, N, O and F only (the parsers refuse any other symbol), so
        when the psp has all five nothing is dropped and no molecule is looked at."""
        if all(known(z) for z in _Z.values()):
            return list(structures)
        return super().drop_missing_elements(structures, known, where)

    def drop_nonfinite(self, structures):
        """One vectorised check over the whole list (a molecule's cell is zeros, finite);
        the per-molecule check runs only when some position is not finite."""
        structures = list(structures)
        if not structures or np.isfinite(np.concatenate([s.positions for s in structures])).all():
            return structures
        return super().drop_nonfinite(structures)

    def _texts(self, start: int, stop: int) -> Iterator[tuple[int, str, bytes]]:
        """Yield (reader index, file name, raw bytes); unreadable files are bad records."""
        if self._is_dir:
            base = os.path.join(os.fspath(self.path), "")
            for i in range(start, stop):
                name = self._names[i]
                p = base + name
                try:
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        data = os.read(fd, 1 << 16)   # a QM9 file is 1-3 kB: one read
                        if len(data) == 1 << 16:
                            chunks = [data]
                            while len(chunks[-1]) == 1 << 16:
                                chunks.append(os.read(fd, 1 << 16))
                            data = b"".join(chunks)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    self._bad_record(i, SourceError(f"cannot read ({exc})", path=p, record=i,
                                                    field="file"))
                    continue
                yield i, name, data
            return
        if start >= stop:
            return
        idx, fd = self._staged()
        for i in range(start, stop):
            r = int(self._rows[i])
            name = idx["name"][r].decode("utf-8", "replace")
            try:
                data = _arch.read_member(fd, int(idx["offset"][r]), int(idx["size"][r]))
            except (OSError, EOFError) as exc:
                raise SourceError(f"cannot read the staged member ({exc})",
                                  path=f"{self.path}:{name}", record=i, field="archive") from None
            yield i, name, data

    def _parsed(self, start: int, stop: int) -> Iterator[list[tuple[int, str, dict]]]:
        """Yield batches of (index, name, record dict); bad records are reported."""
        texts = self._texts(start, stop)
        while True:
            batch = list(islice(texts, _BATCH))
            if not batch:
                return
            try:
                recs = parse_batch([b for _, _, b in batch])
            except NotParsed:
                recs = [None] * len(batch)
            expect = self._gdb[[i for i, _, _ in batch]].tolist()
            out = []
            for (i, name, blob), rec, gdb in zip(batch, recs, expect):
                if rec is not None and rec["info"]["gdb_index"] == gdb:
                    out.append((i, name, rec))
                    continue
                where = os.path.join(self.path, name) if self._is_dir else f"{self.path}:{name}"
                try:
                    if rec is None:  # file by file: the error names file, record and field
                        try:
                            text = blob.decode("utf-8", "strict" if self._is_dir else "replace")
                        except UnicodeDecodeError as exc:
                            raise SourceError(f"cannot read ({exc})", path=where, record=i,
                                              field="file") from None
                        rec = parse_qm9_text(text, path=where, record=i)
                    if rec["info"]["gdb_index"] != gdb:
                        raise SourceError(f"header index {rec['info']['gdb_index']} does not "
                                          "match the file name", path=where, record=i,
                                          field="index")
                except SourceError as err:
                    self._bad_record(i, err)
                    continue
                out.append((i, name, rec))
            yield out

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[Structure]:
        start, stop = self._check_range(start, stop)
        unchar = self._unchar
        key, factor = self._energy_key, self._factor
        for batch in self._parsed(start, stop):
            for i, name, rec in batch:
                info = rec["info"]
                info["file_name"] = name
                if unchar is not None:
                    info["uncharacterized"] = info["gdb_index"] in unchar
                # the parsers' arrays are int64 (N,) and C-contiguous float64 (N, 3)
                yield Structure.trusted(rec["numbers"], rec["positions"], MOLECULE_CELL,
                                        MOLECULE_PBC, info[key] * factor, None, i, info,
                                        {"charges": rec["charges"]})
