"""The on-disk layout of a ``gmp-features`` Zarr v3 store (see ``docs/format.md``).

Everything that decides *where* a value lives is here: the array names, dtypes and trailing
shapes (one array per extra of the reader's :class:`~gmp_pipeline.schema.Schema`), the chunk
shapes, the codecs, the fingerprint and the root attributes.  The writer (:mod:`.writer`) and
the reader (:mod:`.reader`) both use it, so the two cannot drift apart.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..schema import Schema

FORMAT_NAME = "gmp-features"
FORMAT_VERSION = 2

#: format versions :func:`~.reader.open_store` reads (1: plain chunks; 2: sharded arrays)
READABLE_VERSIONS = (1, 2)

#: directory (inside the store) holding the plan, per-task results and completion markers
#: of a run that has not finished; removed when the store is finalized
STAGING_DIR = "_staging"

LEVELS = ("structures", "atoms", "pairs")

#: arrays the pipeline itself writes; source extras never take these names
RESERVED = {
    "structures": {"n_atoms", "atom_start", "source_index", "energy", "cell", "pbc"},
    "atoms": {"numbers", "positions", "forces", "features", "pair_start", "pair_count"},
    "pairs": {"neighbor", "dfeatures"},
}

#: arrays the featurization tasks write themselves, each into chunk-aligned regions reserved
#: for it in the plan (all other arrays are staged per task and assembled chunk by chunk)
DIRECT = {"pairs/dfeatures"}

@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: ``path`` (``level/name``), numpy ``dtype`` (``"str"`` for text),
    the ``trailing`` shape after the row axis, and the ``fill`` value of rows nobody wrote."""

    path: str
    dtype: str
    trailing: tuple[int, ...] = ()
    fill: Any = 0

    @property
    def level(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path.split("/", 1)[1]

    @property
    def is_str(self) -> bool:
        return self.dtype == "str"

    def row_bytes(self) -> int:
        item = 16 if self.is_str else np.dtype(self.dtype).itemsize
        return item * int(np.prod(self.trailing, dtype=np.int64))

    def chunk_rows(self, n_rows: int) -> int:
        """Rows per (inner) chunk, the unit a reader decodes: the fewest rows that make at
        least knob ``store.min-chunk-bytes`` (1 MiB) uncompressed, capped at the array length
        (so a small array is a single chunk)."""
        from ..config import knob

        rows = max(1, math.ceil(int(knob("store.min-chunk-bytes")) / self.row_bytes()))
        return max(1, min(rows, int(n_rows)))

    def shard_rows(self, n_rows: int) -> int:
        """Rows per shard, the unit one writer owns and one file holds: a whole number of
        chunks making at least knob ``store.shard-bytes`` uncompressed, but no more chunks
        than the array needs (an array smaller than a shard is one shard)."""
        from ..config import knob

        inner = self.chunk_rows(n_rows)
        per = max(1, math.ceil(int(knob("store.shard-bytes")) / (inner * self.row_bytes())))
        need = max(1, math.ceil(int(n_rows) / inner))
        return inner * min(per, need)

    def empty(self, n: int) -> np.ndarray:
        if self.is_str:
            return np.full((n,) + self.trailing, self.fill, dtype=object)
        return np.full((n,) + self.trailing, self.fill, dtype=self.dtype)


def extra_path(level: str, name: str) -> str:
    """Array path of a source extra (``info`` → structures, ``atom_info`` → atoms)."""
    safe = str(name).replace("/", "_")
    if safe in RESERVED[level] or safe.startswith("_"):
        safe = "extra_" + safe
    return f"{level}/{safe}"


def array_specs(n_features: int, dtype: str, derivatives: bool,
                schema: Schema) -> dict[str, ArraySpec]:
    """Every array of a store, keyed by path, in a fixed order: the pipeline's own arrays, then
    one per extra of ``schema`` with the extra's dtype and trailing shape."""
    schema = Schema.coerce(schema)
    specs = [
        ArraySpec("structures/n_atoms", "int64"),
        ArraySpec("structures/atom_start", "int64"),
        ArraySpec("structures/source_index", "int64", fill=-1),
        ArraySpec("structures/energy", "float64", fill=float("nan")),
        ArraySpec("structures/cell", "float64", (3, 3)),
        ArraySpec("structures/pbc", "bool", (3,), fill=False),
        ArraySpec("atoms/numbers", "int64"),
        ArraySpec("atoms/positions", "float64", (3,)),
    ]
    if schema.has_forces:
        specs.append(ArraySpec("atoms/forces", "float64", (3,), fill=float("nan")))
    specs.append(ArraySpec("atoms/features", dtype, (n_features,), fill=float("nan")))
    if derivatives:
        specs += [ArraySpec("atoms/pair_start", "int64"), ArraySpec("atoms/pair_count", "int64"),
                  ArraySpec("pairs/neighbor", "int32", fill=-1),
                  ArraySpec("pairs/dfeatures", dtype, (3, n_features), fill=float("nan"))]
    for level, extras in (("structures", schema.info), ("atoms", schema.atom_info)):
        for name, e in extras.items():
            specs.append(ArraySpec(extra_path(level, name), e.dtype, e.shape, fill=e.fill))
    return {s.path: s for s in specs}


def extras_map(schema: Schema) -> dict[str, dict[str, str]]:
    """{"info": {name: array path}, "atom_info": {name: array path}} for the root attrs."""
    schema = Schema.coerce(schema)
    return {"info": {n: extra_path("structures", n) for n in schema.info},
            "atom_info": {n: extra_path("atoms", n) for n in schema.atom_info}}


def codecs_for(spec: ArraySpec):
    """Compressors of an array: Blosc (Zstd inside, LZ4 for ``pairs/dfeatures``) with byte
    shuffle for numbers, plain Zstd for text; every chain ends in a ``crc32c`` checksum of the
    encoded chunk, so ``verify`` catches flipped bytes and names the array."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if spec.is_str:
        return (ZstdCodec(level=3), Crc32cCodec())
    if spec.path == "pairs/dfeatures":
        # derivatives are the bulk of a store and barely compress (ratio ~1.04-1.09 with any
        # codec tried); LZ4 level 1 on bit-shuffled floats gave the best ratio (1.085) *and*
        # ~1.7 GB/s, where Zstd (~0.8 GB/s) would cost a sizeable fraction of the kernel time
        return (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec())
    shuffle = "shuffle" if spec.dtype != "bool" else "noshuffle"
    return (BloscCodec(cname="zstd", clevel=3, shuffle=shuffle), Crc32cCodec())


def create_kwargs(spec: ArraySpec, n_rows: int) -> dict:
    """Keyword arguments of ``zarr.Group.create_array`` for ``spec`` with ``n_rows`` rows:
    sharded (``shards`` of :meth:`ArraySpec.shard_rows`, inner ``chunks`` of
    :meth:`ArraySpec.chunk_rows`), the codecs of :func:`codecs_for` inside every shard, and
    zarr's default shard index (``bytes`` + ``crc32c``, at the end of the shard file)."""
    n_rows = int(n_rows)
    return dict(shape=(n_rows,) + spec.trailing,
                chunks=(spec.chunk_rows(n_rows),) + spec.trailing,
                shards=(spec.shard_rows(n_rows),) + spec.trailing,
                dtype=str if spec.is_str else spec.dtype, fill_value=spec.fill,
                compressors=codecs_for(spec),
                dimension_names=[spec.level] + [f"dim{i + 1}" for i in range(len(spec.trailing))])


#: ``encoding-type`` / ``encoding-version`` attributes of the three row groups (as anndata
#: marks every element it writes), so a reader can tell what a group holds without the root
GROUP_ENCODING = {
    "structures": {"encoding-type": "gmp-structures", "encoding-version": "1.0.0"},
    "atoms": {"encoding-type": "gmp-atoms", "encoding-version": "1.0.0"},
    "pairs": {"encoding-type": "gmp-pairs", "encoding-version": "1.0.0"},
}


# -- fingerprint -------------------------------------------------------------------------------

def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_parts(feature_config: dict, source: dict, options: dict, version: str,
                      source_identity: dict | None = None, schema: Schema | None = None) -> dict:
    """What a store's content depends on; the fingerprint is a hash of exactly this.
    ``source_identity``: :func:`source_identity` of the source's files (left out when None, as
    in stores written before it existed); ``schema``: the reader's :class:`Schema` (its extras'
    names, dtypes and shapes decide the store's arrays; left out when None)."""
    parts = {"feature_config": json.loads(_canonical(feature_config)),
             "source": json.loads(_canonical(source)),
             "options": json.loads(_canonical(options)),
             "gmp_pipeline_version": version,
             "format_version": FORMAT_VERSION}
    if source_identity is not None:
        parts["source_identity"] = json.loads(_canonical(source_identity))
    if schema is not None:
        parts["schema"] = json.loads(_canonical(Schema.coerce(schema).as_dict()))
    return parts


#: sampled blocks of a source file: how many, and how many bytes each
_SAMPLE_BLOCKS, _BLOCK = 4, 65536
#: files of a directory source whose contents are sampled (the rest by size and mtime only)
_SAMPLE_FILES = 4


def _sample_hash(path: str, size: int) -> str:
    """sha256 of a few blocks spread evenly over the file (all of it when it is small)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _BLOCK:
            h.update(f.read())
        else:
            for k in range(_SAMPLE_BLOCKS):
                f.seek((size - _BLOCK) * k // (_SAMPLE_BLOCKS - 1))
                h.update(f.read(_BLOCK))
    return h.hexdigest()[:16]


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sample_sha256": _sample_hash(path, st.st_size)}


def _dir_identity(path: str) -> dict:
    """A directory by one stat per entry (no contents, so a QM9 directory of 130k files costs
    130k stat calls) hashed into one listing digest, plus the sampled contents of a few files
    (first, last and evenly between, by name)."""
    entries = []
    with os.scandir(path) as it:
        for e in it:
            if e.is_file():
                st = e.stat()
                entries.append((e.name, st.st_size, st.st_mtime_ns))
    entries.sort()
    listing = hashlib.sha256("\n".join(f"{n}\t{s}\t{m}" for n, s, m in entries).encode())
    n = len(entries)
    picks = sorted({(n - 1) * k // (_SAMPLE_FILES - 1) for k in range(_SAMPLE_FILES)}) if n else []
    sample = hashlib.sha256()
    for k in picks:
        name, size, _ = entries[k]
        sample.update(f"{name}:{_sample_hash(os.path.join(path, name), size)}".encode())
    return {"files": n, "bytes": sum(s for _, s, _ in entries),
            "listing_sha256": listing.hexdigest()[:16],
            "sample_sha256": sample.hexdigest()[:16]}


def source_identity(paths) -> dict:
    """What identifies the source's files beyond their names, so that a source rewritten in
    place is not taken for the one a store was written from: per file its size, mtime and a
    hash of a few sampled blocks; per directory its listing (name, size, mtime of every file)
    and sampled contents of a few files.  Keyed by the path; a path that does not exist is
    left out."""
    out = {}
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            out[p] = _dir_identity(p)
        elif os.path.isfile(p):
            out[p] = _file_identity(p)
    return out


def fingerprints_match(old: dict, new: dict) -> bool:
    """Whether root attributes ``old`` (a store) and ``new`` (this run) have the same
    fingerprint; a store written before ``source_identity`` was recorded is compared without
    it (so its interrupted run can still be resumed)."""
    if old.get("fingerprint") == new.get("fingerprint"):
        return True
    old_parts, new_parts = old.get("fingerprint_parts") or {}, new.get("fingerprint_parts") or {}
    if "source_identity" in old_parts or "source_identity" not in new_parts:
        return False
    legacy = {k: v for k, v in new_parts.items() if k != "source_identity"}
    return old.get("fingerprint") == fingerprint(legacy)


def fingerprint(parts: dict) -> str:
    return "sha256:" + hashlib.sha256(_canonical(parts).encode()).hexdigest()


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not obj and prefix:
            out[prefix] = {}
        return out
    return {prefix: obj}


def describe_differences(old: dict, new: dict, limit: int = 8) -> list[str]:
    """Human-readable ``key: stored value (store) != value (this run)`` lines."""
    a, b = _flatten(old or {}), _flatten(new or {})
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} in the store, "
                         f"{b.get(key, '<absent>')!r} in this run")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


# -- root attributes ---------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_zarr():
    """Silence zarr's warnings about consolidated metadata, text dtypes and ``_staging``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
        warnings.filterwarnings("ignore", category=FutureWarning, module="zarr")
        yield


def read_root_attrs(path) -> dict | None:
    """Root attributes of the Zarr v3 group at ``path``, or None if there is none."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{meta} is unreadable: {exc}") from exc
    return doc.get("attributes", {}) or {}


def root_attrs(*, feature_config: dict, feature_list, source: dict, options: dict,
               schema: Schema, version: str, source_paths=None) -> dict:
    """The root attributes a run starts a store with (``complete: false``; the counts are added
    when it is finalized).  ``source_paths``: the source's files and directories, whose
    :func:`source_identity` joins the fingerprint."""
    schema = Schema.coerce(schema)
    parts = fingerprint_parts(feature_config, source, options, version,
                              None if source_paths is None else source_identity(source_paths),
                              schema)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "gmp_pipeline_version": version,
        "fingerprint": fingerprint(parts),
        "fingerprint_parts": parts,
        "feature_config": feature_config,
        "feature_list": [[int(o), float(s)] for o, s in feature_list],
        "source": source,
        "options": options,
        "units": dict(schema.units),
        "extras": extras_map(schema),
        "schema": {"has_energy": schema.has_energy, "has_forces": schema.has_forces},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
