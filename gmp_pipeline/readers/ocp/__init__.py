"""Open Catalyst (OC20/OC22) sources, auto-detected by what ``path`` holds:

(a) legacy LMDBs of pickled torch_geometric ``Data`` objects (one ``.lmdb`` file or a directory of
    ``*.lmdb``), PyG 1.x and 2.x layouts, S2EF and IS2RE fields, decoded without torch through a
    restricted unpickler (:mod:`._torchfree`);
(b) ``.aselmdb`` files (one file or a directory), both JSON dialects;
(c) S2EF raw shards ``N.extxyz[.xz]`` with their ``N.txt[.xz]`` sidecars (one file or a directory).

``format="lmdb" | "aselmdb" | "extxyz"`` overrides the detection (:meth:`OCPReader.open`, in
:mod:`._base`; one module per format: :mod:`.pyg_lmdb`, :mod:`.aselmdb`, :mod:`.s2ef`).
Units: Angstrom, eV, eV/Angstrom.
Per atom: ``tags`` (int64) and ``fixed`` (bool) are always present; ``info`` keeps ``sid``, ``fid``
(-1 when absent) and every energy the source has (NaN when a record lacks it).
"""
from ._base import FORMATS, OCPReader, detect_format, open_lmdb
from .aselmdb import AseLMDBReader
from .pyg_lmdb import LegacyLMDBReader
from .s2ef import S2EFExtxyzReader

__all__ = ["FORMATS", "OCPReader", "LegacyLMDBReader", "AseLMDBReader", "S2EFExtxyzReader",
           "detect_format", "open_lmdb"]
