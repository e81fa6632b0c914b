"""The in-memory record every reader yields and the featurizer consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Structure:
    """One atomic structure as flat arrays.

    Attributes
    ----------
    numbers : (N,) int64 atomic numbers.
    positions : (N, 3) float64 Cartesian positions in Angstrom.
    cell : (3, 3) float64 cell rows in Angstrom (all zeros for a molecule without a box).
    pbc : (3,) bool periodicity flags.
    energy : the source's energy target in the reader's energy unit, or None.
    forces : (N, 3) float64 in the reader's force unit, or None.
    source_index : position of this structure in the source (0-based, reader order).
    info : per-structure extras (scalars or strings), e.g. ``sid``, ``fid``, QM9 properties.
    atom_info : per-atom extras, arrays of length N, e.g. ``tags``, ``fixed``, ``charges``.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    source_index: int = -1
    info: dict[str, Any] = field(default_factory=dict)
    atom_info: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.numbers = np.ascontiguousarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.ascontiguousarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.ascontiguousarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.ascontiguousarray(self.pbc, dtype=bool).reshape(3)
        if self.forces is not None:
            self.forces = np.ascontiguousarray(self.forces, dtype=np.float64).reshape(-1, 3)

    @classmethod
    def trusted(cls, numbers, positions, cell, pbc, energy=None, forces=None,
                source_index=-1, info=None, atom_info=None) -> "Structure":
        """Build without the conversions of ``__post_init__``, for a reader whose arrays are
        already what they make: C-contiguous int64 (N,), float64 (N, 3), float64 (3, 3),
        bool (3,) and float64 (N, 3) or None.  A quarter of the cost for a small molecule."""
        s = cls.__new__(cls)
        s.__dict__.update(numbers=numbers, positions=positions, cell=cell, pbc=pbc,
                          energy=energy, forces=forces, source_index=source_index,
                          info={} if info is None else info,
                          atom_info={} if atom_info is None else atom_info)
        return s

    def __len__(self) -> int:
        return int(self.numbers.shape[0])

    @classmethod
    def from_atoms(cls, atoms, **kwargs) -> "Structure":
        """Build from an ``ase.Atoms`` (energy/forces are not taken from a calculator)."""
        return cls(numbers=atoms.numbers, positions=atoms.positions,
                   cell=np.asarray(atoms.cell[:]), pbc=atoms.pbc, **kwargs)

    def to_atoms(self):
        """An ``ase.Atoms`` with the same numbers, positions, cell and pbc."""
        import ase

        return ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell,
                         pbc=self.pbc)
