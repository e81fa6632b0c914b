"""Revised MD17 (rMD17) npz files (``rmd17_<molecule>.npz``) and their split index CSVs.

Keys ``nuclear_charges`` (N,), ``coords`` (M, N, 3) Angstrom, ``energies`` (M,) kcal/mol,
``forces`` (M, N, 3) kcal/mol/Angstrom, ``old_indices`` (M,) row in the original MD17 npz,
``old_energies`` (M,) and ``old_forces`` (M, N, 3): MD17 values at another level of theory, kept
apart (``info["old_energy"]``) and never used as the target.

``split_file=`` (an ``index_train_0k.csv`` / ``index_test_0k.csv``: one 0-based row index per line)
restricts the reader to those rows, in file order; ``info["frame_index"]`` is then the npz row and
``source_index`` the position in the split.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ..errors import SourceError
from ._npz import FrameNpzReader, NpzArrays


def read_split_file(path, n_frames: int) -> np.ndarray:
    """Parse an rMD17 split CSV (one integer per line; blank lines ignored)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip().rstrip(",")
                if not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise SourceError(f"non-numeric index {text!r}", path=path, record=lineno,
                                      field="index") from None
                if value != int(value) or not 0 <= value < n_frames:
                    raise SourceError(f"index {text!r} is not a row of the {n_frames}-frame npz",
                                      path=path, record=lineno, field="index")
                rows.append(int(value))
    except OSError as exc:
        raise SourceError(f"cannot read split file ({exc})", path=path) from None
    return np.asarray(rows, dtype=np.int64)


class RMD17Reader(FrameNpzReader):
    """Frames of one rMD17 npz.  ``info``: ``molecule``, ``frame_index``, ``old_index``,
    ``old_energy``; ``old_forces`` only with ``include_old_forces=True`` (atom_info, (N, 3))."""

    name = "rmd17"
    format_name = "rMD17 npz"
    stem_pattern = re.compile(r"^(?:rmd17_)?(.+?)(?:_(?:train|test)_\d+)?$")
    key_R, key_z, key_E, key_F = "coords", "nuclear_charges", "energies", "forces"

    def __init__(self, path, *, split_file=None, include_old_forces: bool = False, **options):
        super().__init__(path, split_file=None if split_file is None else os.fspath(split_file),
                         include_old_forces=True if include_old_forces else None, **options)
        self._split_file = None if split_file is None else os.fspath(split_file)
        self._include_old_forces = bool(include_old_forces)
        self._rows: np.ndarray | None = None

    def _extra_validate(self, npz: NpzArrays, M: int, N: int) -> None:
        expect = {"old_indices": (M,), "old_energies": (M,)}
        if self._include_old_forces:
            expect["old_forces"] = (M, N, 3)
        for key, shape in expect.items():
            if key not in npz:
                raise SourceError(f"missing key (the file has {sorted(npz.keys())})",
                                  path=self.path, field=key)
            got, dt, _, _ = npz.header(key)
            if dt.kind not in "fiu":
                raise SourceError(f"non-numeric dtype {dt}", path=self.path, field=key)
            if tuple(got) != shape:
                raise SourceError(f"shape {got} does not match {shape}", path=self.path,
                                  field=key)
        if self._split_file is not None:
            self._rows = read_split_file(self._split_file, M)

    def _frames(self):
        return self._rows

    def _extra_info_schema(self) -> dict[str, str]:
        return {"old_index": "int64", "old_energy": "float64"}

    def _atom_info_schema(self) -> dict[str, Any]:
        return {"old_forces": ("float64", (3,))} if self._include_old_forces else {}

    def _extra_arrays(self, npz: NpzArrays) -> dict[str, np.ndarray]:
        out = {"old_indices": npz.array("old_indices"), "old_energies": npz.array("old_energies")}
        if self._include_old_forces:
            out["old_forces"] = npz.array("old_forces")
        return out

    def _extra_info(self, ext, j, factor) -> dict[str, Any]:
        return {"old_index": int(ext["old_indices"][j]),
                "old_energy": float(ext["old_energies"][j]) * factor}

    def read(self, start=0, stop=None):
        for s in super().read(start, stop):
            if self._include_old_forces:
                row = s.info["frame_index"]
                s.atom_info["old_forces"] = (np.asarray(self._npz.array("old_forces")[row],
                                                        dtype=np.float64) * self._factor)
            yield s
