"""Import every reader module so that each registers itself."""
from . import ase_reader, md17, ocp, qm9, rmd17  # noqa: F401
