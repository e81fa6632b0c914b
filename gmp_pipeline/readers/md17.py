"""MD17 in the sGDML npz format (``md17_<molecule>.npz`` / ``<molecule>_dft.npz``).

Keys ``R`` (M, N, 3) Angstrom, ``z`` (N,), ``E`` (M, 1) total energy in kcal/mol, ``F`` (M, N, 3)
kcal/mol/Angstrom; optional text metadata (``name``, ``theory``, ``type``, ``md5``, ``e_unit``,
``r_unit``) and ``lattice`` (sGDML stores lattice vectors as columns).  Energies stay in kcal/mol
unless ``energy_unit=`` asks for an explicit conversion (recorded in ``describe()``).
"""
from __future__ import annotations

from ._npz import FrameNpzReader


class MD17Reader(FrameNpzReader):
    """Frames of one MD17 npz.  ``info``: ``molecule`` (``name`` key or file stem),
    ``frame_index`` (row in the npz)."""

    name = "md17"

    format_name = "sGDML npz (MD17)"
    key_R, key_z, key_E, key_F = "R", "z", "E", "F"
