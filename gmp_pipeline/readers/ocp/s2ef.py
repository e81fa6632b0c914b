"""OC20 S2EF raw shards: ``N.extxyz[.xz]`` with their ``N.txt[.xz]`` sidecars."""
from __future__ import annotations

import glob
import lzma
import os
import re
from typing import Any

import numpy as np

from ...errors import InputError, SourceError
from ...schema import Schema
from ...structure import Structure
from .._common import as_positions, scan_xyz_frames
from ..base import logger
from ._base import OCPReader

#: shards already warned about (in this process) for a missing .txt sidecar
_WARNED_NO_TXT: set[str] = set()


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
    _transient = ("_counts", "_stream", "_envs")

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
        self._warn_missing_txt(files)
        return files, sizes

    def _warn_missing_txt(self, files) -> None:
        """One warning per source (and process) for the shards read without a sidecar."""
        bare = [f for f, t in zip(files, self._txt) if t is None]
        key = os.path.realpath(os.fspath(self.path))
        if not bare or key in _WARNED_NO_TXT:
            return
        _WARNED_NO_TXT.add(key)
        names = ", ".join(os.path.basename(f) for f in bare[:3]) + (", ..." if len(bare) > 3
                                                                     else "")
        sidecar = re.sub(r"\.extxyz(\.xz)?$", ".txt", os.path.basename(bare[0]))
        logger.warning("%s: %d of %d S2EF shards have no .txt/.txt.xz sidecar (%s; e.g. %s is "
                       "missing): their frames get sid = fid = -1 and no reference_energy "
                       "(the system and frame ids are lost); require_txt=True refuses such "
                       "shards", self.path, len(bare), len(files), names, sidecar)

    def _count_frames(self, path) -> np.ndarray:
        try:
            with (lzma.open(path, "rb") if path.endswith(".xz") else open(path, "rb")) as f:
                return scan_xyz_frames(f, path)[1]
        except (EOFError, lzma.LZMAError, OSError) as exc:
            raise SourceError(f"truncated or corrupt file ({type(exc).__name__}: {exc})",
                              path=path, field="file") from None

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

    def _make_schema(self) -> tuple[Schema, dict[str, Any]]:
        info = {"file_name": "str", "frame": "int64", "sid": "int64", "fid": "int64",
                "energy": "float64", "free_energy": "float64", "reference_energy": "float64"}
        kind = ("total (DFT energy of the frame)" if self._target == "total" else
                "referenced (energy - reference_energy from the .txt sidecar)")
        schema = Schema.build(info=info, atom_info={"tags": "int64", "fixed": "bool"},
                              has_energy=True, has_forces=True)
        return schema, {"dialect": self.dialect, "energy_kind": kind,
                        "energy_field": "energy" if self._target == "total" else
                        "energy - reference_energy"}

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
                         forces=forces, source_index=i, info=schema.fill_info(values),
                         atom_info={"tags": tags, "fixed": fixed})
