"""Reading ``.gpsp`` pseudopotential files (spec section 2).

A ``.gpsp`` file models each element's valence density as a sum of Gaussians
``B * exp(-beta r^2)``.  Two files ship with the package (``"QE-kjpaw"`` and ``"NC-SR"``);
any other file can be given by path.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from .errors import PseudopotentialError

BUNDLED = ("QE-kjpaw", "NC-SR")


@dataclass(frozen=True)
class Pseudopotential:
    """Gaussians of every element in one .gpsp file.

    ``gaussians[Z]`` is a ``(K, 2)`` float64 array of ``(B, beta)`` rows in file order,
    Gaussians with ``B == 0`` removed (they never contribute).
    """

    name: str
    path: str
    sha256: str
    gaussians: dict[int, np.ndarray]

    def elements(self) -> list[int]:
        return sorted(self.gaussians)

    def has(self, z: int) -> bool:
        return int(z) in self.gaussians


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("gmp_pipeline") / "data" / "psp" / f"{name}.gpsp"))


def resolve_psp(psp) -> tuple[str, Path]:
    """Map a bundled name (``"QE-kjpaw"``, with or without ``.gpsp``) or a path to (name, path)."""
    if isinstance(psp, Pseudopotential):
        return psp.name, Path(psp.path)
    if not isinstance(psp, (str, os.PathLike)):
        raise PseudopotentialError(f"psp must be a bundled name {BUNDLED} or a path, got {psp!r}")
    s = os.fspath(psp)
    stem = s[:-5] if s.endswith(".gpsp") else s
    if stem in BUNDLED and not os.path.exists(s):
        return stem, bundled_path(stem)
    p = Path(s).expanduser()
    if not p.is_file():
        raise PseudopotentialError(
            f"psp {s!r} is neither a bundled pseudopotential ({', '.join(BUNDLED)}) nor a readable file")
    return p.name[:-5] if p.name.endswith(".gpsp") else p.name, p


_CACHE: dict[tuple[str, str], Pseudopotential] = {}


def load_psp(psp) -> Pseudopotential:
    """Parse a .gpsp file (bundled name or path); results are cached per path and content."""
    if isinstance(psp, Pseudopotential):
        return psp
    name, path = resolve_psp(psp)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PseudopotentialError(f"psp file {str(path)!r} cannot be read: {exc}") from exc
    sha = hashlib.sha256(raw).hexdigest()
    key = (str(path), sha)
    if key not in _CACHE:
        _CACHE[key] = Pseudopotential(name=name, path=str(path), sha256=sha,
                                      gaussians=_parse(raw, str(path)))
    return _CACHE[key]


def _parse(raw: bytes, where: str) -> dict[int, np.ndarray]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PseudopotentialError(f"psp file {where!r} is not UTF-8 text: {exc}") from exc
    out: dict[int, list[tuple[float, float]]] = {}
    current: int | None = None
    expect_header = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue  # blank lines are tolerated here (the reference parser crashes on them)
        if s.startswith("!"):
            continue  # "! 95 elements": informational
        if s.startswith("*"):
            if expect_header:
                raise PseudopotentialError(f"{where}, line {lineno}: element separator without an element header")
            expect_header = True
            current = None
            continue
        fields = s.split()
        if expect_header:
            sym = fields[0]
            if sym == "X":
                z = 0
            elif sym in atomic_numbers:
                z = atomic_numbers[sym]
            else:
                raise PseudopotentialError(f"{where}, line {lineno}: unknown element symbol {sym!r}")
            if z in out:
                raise PseudopotentialError(f"{where}, line {lineno}: element {sym} defined twice")
            out[z] = []
            current = z
            expect_header = False
            continue
        if current is None:
            raise PseudopotentialError(f"{where}, line {lineno}: data line {s!r} before any element record")
        if len(fields) != 2:
            raise PseudopotentialError(
                f"{where}, line {lineno}: expected two numbers 'B beta', got {s!r}")
        try:
            b, beta = float(fields[0]), float(fields[1])
        except ValueError:
            raise PseudopotentialError(f"{where}, line {lineno}: not a number in {s!r}") from None
        if not (math.isfinite(b) and math.isfinite(beta)) or beta <= 0.0:
            raise PseudopotentialError(
                f"{where}, line {lineno}: need finite B and beta > 0, got B={b!r}, beta={beta!r}")
        out[current].append((b, beta))
    if expect_header:
        raise PseudopotentialError(f"{where}: file ends after an element separator")
    if not out:
        raise PseudopotentialError(f"{where}: no element records found (is this a .gpsp file?)")
    result = {}
    for z, rows in out.items():
        arr = np.array([r for r in rows if r[0] != 0.0], dtype=np.float64).reshape(-1, 2)
        result[z] = arr
    return result


def element_symbol(z: int) -> str:
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"
