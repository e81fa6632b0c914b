"""Source readers, one module per format, behind one protocol (:mod:`.base`).

The registry is the static map :data:`READERS` from a source kind (``featurize <kind>``) to the
``"module:Class"`` that reads it; a reader module is imported only when its kind is asked for.
"""
from __future__ import annotations

import importlib

from ..errors import InputError
from .base import Reader

#: source kind -> "module:Class" of its reader
READERS: dict[str, str] = {
    "ase": "gmp_pipeline.readers.ase_reader:ASEReader",
    "md17": "gmp_pipeline.readers.md17:MD17Reader",
    "ocp": "gmp_pipeline.readers.ocp:OCPReader",
    "qm9": "gmp_pipeline.readers.qm9:QM9Reader",
    "rmd17": "gmp_pipeline.readers.rmd17:RMD17Reader",
}


def reader_names() -> list[str]:
    """Names of every source kind."""
    return sorted(READERS)


def get_reader_class(name: str) -> type[Reader]:
    """The reader class of source kind ``name``."""
    target = READERS.get(name)
    if target is None:
        raise InputError(f"source kind {name!r} is unknown; choose one of "
                         f"{', '.join(reader_names())}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def open_reader(kind: str, path, **options) -> Reader:
    """Construct the reader of source kind ``kind`` for ``path``."""
    return get_reader_class(kind).open(path, **options)


__all__ = ["READERS", "Reader", "get_reader_class", "open_reader", "reader_names"]
