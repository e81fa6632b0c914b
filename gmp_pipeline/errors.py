"""One exception family for the whole package.

Every error raised on purpose by gmp-pipeline derives from :class:`GMPError`.  Errors about
bad arguments or bad input data also derive from :class:`ValueError`, so callers that only
know the standard library still catch them.
"""
from __future__ import annotations


class GMPError(Exception):
    """Base class of every error raised by gmp-pipeline."""


class InputError(GMPError, ValueError):
    """An argument or an input structure is invalid (the message names it and its value)."""


class PseudopotentialError(InputError):
    """A .gpsp file cannot be read or is malformed (the message names the file and line)."""


class SourceError(InputError):
    """A record of a source dataset cannot be read.

    The message names the file, the record index and the field.
    """

    def __init__(self, message: str, *, path=None, record=None, field=None):
        parts = []
        if path is not None:
            parts.append(f"file {str(path)!r}")
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field {field!r}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.record = record
        self.field = field


class StoreError(GMPError):
    """A Zarr feature store is missing, incomplete, or does not match the requested run."""


class ClusterError(GMPError):
    """A Dask cluster could not be created or configured."""
