"""Import every reader module so that each registers itself."""
# Reader modules are added here as they are written, e.g.:
# from . import md17, rmd17, qm9, ocp, ase_reader  # noqa: F401
