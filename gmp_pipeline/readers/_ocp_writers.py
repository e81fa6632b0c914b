"""Writers for OCP-layout test fixtures and benchmarks, needing neither torch nor ASE's backends.

* :func:`write_pyg_lmdb`: an OC20-style LMDB of pickled PyG ``Data`` objects in the PyG 1.x layout
  (attributes on the object) or the 2.x layout (``_store`` -> ``GlobalStorage._mapping``), with
  tensors pickled the way torch does (``_rebuild_tensor_v2`` + ``_load_from_bytes`` of a legacy
  torch.save stream).  Stand-in classes carry the real module/qualified names; fake modules are
  placed in ``sys.modules`` only while pickling (and only when the real ones are absent).
* :func:`write_aselmdb`: an ``.aselmdb`` file in either JSON dialect.
* :func:`write_s2ef_shard`: an OC20 S2EF ``N.extxyz[.xz]`` + ``N.txt[.xz]`` pair.
"""
from __future__ import annotations

import contextlib
import io
import json
import lzma
import os
import pickle
import struct
import sys
import types
import zlib
from collections import OrderedDict

import numpy as np

_STORAGE_NAME = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                 np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
                 np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}


def _named(module, name, obj):
    obj.__module__ = module
    obj.__qualname__ = name
    obj.__name__ = name
    return obj


def _fake_rebuild_tensor_v2(*args):  # never called: only its name is pickled
    raise RuntimeError("stand-in")


def _fake_load_from_bytes(*args):  # never called
    raise RuntimeError("stand-in")


class _FakeData:
    pass


class _FakeGlobalStorage:
    pass


class _FakeStorageClass:
    pass


_FAKES = {
    "torch": {n: _named("torch", n, type(n, (_FakeStorageClass,), {}))
              for n in set(_STORAGE_NAME.values())},
    "torch._utils": {"_rebuild_tensor_v2": _named("torch._utils", "_rebuild_tensor_v2",
                                                  _fake_rebuild_tensor_v2)},
    "torch.storage": {"_load_from_bytes": _named("torch.storage", "_load_from_bytes",
                                                 _fake_load_from_bytes)},
    "torch_geometric": {},
    "torch_geometric.data": {},
    "torch_geometric.data.data": {"Data": _named("torch_geometric.data.data", "Data", _FakeData)},
    "torch_geometric.data.storage": {"GlobalStorage": _named("torch_geometric.data.storage",
                                                             "GlobalStorage",
                                                             _FakeGlobalStorage)},
}


@contextlib.contextmanager
def fake_torch_modules():
    """Temporarily register stand-in torch/torch_geometric modules so pickle can name them."""
    added = []
    try:
        for name, attrs in _FAKES.items():
            if name in sys.modules:
                continue
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
            added.append(name)
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def legacy_storage_bytes(arr: np.ndarray, key: str = "0") -> bytes:
    """A legacy (non-zip) torch.save stream holding one storage with ``arr``'s elements."""
    arr = np.ascontiguousarray(arr).reshape(-1)
    stype = _FAKES["torch"][_STORAGE_NAME[arr.dtype]]
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001,
                {"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, buf, protocol=2)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is marker:
                return ("storage", stype, key, "cpu", arr.size)
            return None

    marker = object()
    P(buf, protocol=2).dump(marker)
    pickle.dump([key], buf, protocol=2)
    buf.write(struct.pack("<q", arr.size))
    buf.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return buf.getvalue()


class _Storage:
    def __init__(self, arr):
        self.arr = arr

    def __reduce__(self):
        return (_fake_load_from_bytes, (legacy_storage_bytes(self.arr),))


class Tensor:
    """Pickles as a torch tensor (``_rebuild_tensor_v2``) holding ``arr``."""

    def __init__(self, arr):
        self.arr = np.ascontiguousarray(arr)

    def __reduce__(self):
        a = self.arr
        stride = tuple(s // a.itemsize for s in a.strides)
        return (_fake_rebuild_tensor_v2,
                (_Storage(a), 0, tuple(a.shape), stride, False, OrderedDict()))


def _tensorize(value):
    return Tensor(value) if isinstance(value, np.ndarray) else value


def pyg_pickle(attrs: dict, layout: str = "pyg1") -> bytes:
    """Pickle an attribute dict as a PyG Data object (numpy arrays become tensors)."""
    with fake_torch_modules():
        data = _FAKES["torch_geometric.data.data"]["Data"]()
        mapping = {k: _tensorize(v) for k, v in attrs.items()}
        if layout == "pyg1":
            # PyG 1.x: default slots set to None, then the attributes
            data.__dict__.update({"x": None, "edge_index": None, "edge_attr": None, "y": None,
                                  "pos": None, "normal": None, "face": None})
            data.__dict__.update(mapping)
        elif layout == "pyg2":
            store = _FAKES["torch_geometric.data.storage"]["GlobalStorage"]()
            store.__dict__.update({"_mapping": mapping, "_parent": data})
            data.__dict__["_store"] = store
        else:
            raise ValueError(f"layout {layout!r}")
        return pickle.dumps(data, protocol=4)


def write_pyg_lmdb(path, records, *, layout: str = "pyg1", length_key: bool = True,
                   map_size: int = 1 << 34) -> int:
    """Write ``records`` (attribute dicts) to a single-file LMDB at ``path``; returns the count."""
    import lmdb

    env = lmdb.open(os.fspath(path), subdir=False, map_size=map_size, meminit=False,
                    map_async=True, lock=True)
    n = 0
    txn = env.begin(write=True)
    for n, attrs in enumerate(records, 1):
        txn.put(str(n - 1).encode("ascii"), pyg_pickle(attrs, layout))
        if n % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    if length_key:
        txn.put(b"length", pickle.dumps(n, protocol=4))
    txn.commit()
    env.sync()
    env.close()
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.fspath(path) + "-lock")
    return n


def _ase_json(obj):
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": [list(obj.shape), obj.dtype.name, obj.reshape(-1).tolist()]}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(type(obj))


def _plain_json(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(type(obj))


def write_aselmdb(path, rows, *, dialect: str = "ase", deleted_ids=(), metadata=None) -> None:
    """Write row dicts (ASE AtomsRow fields) to an ``.aselmdb``: ids 1.., zlib-compressed JSON.

    ``dialect="ase"`` encodes arrays as ``{"__ndarray__": [shape, dtype, flat]}`` (ase-db-backends);
    ``dialect="orjson"`` as plain nested lists (fairchem's own LMDBDatabase).
    """
    import lmdb

    default = _ase_json if dialect == "ase" else _plain_json

    def enc(obj) -> bytes:
        return zlib.compress(json.dumps(obj, default=default).encode("utf-8"))

    env = lmdb.open(os.fspath(path), subdir=False, map_size=1 << 30, meminit=False)
    with env.begin(write=True) as txn:
        n = 0
        for n, row in enumerate(rows, 1):
            txn.put(str(n).encode("ascii"), enc(row))
        txn.put(b"nextid", enc(n + 1))
        txn.put(b"deleted_ids", enc(list(deleted_ids)))
        txn.put(b"metadata", enc(metadata or {}))
    env.close()
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.fspath(path) + "-lock")


def s2ef_frame_text(numbers, positions, cell, fixed, tags, forces, energy,
                    free_energy=None) -> str:
    """One frame in the OC20 S2EF extxyz column layout."""
    from ase.data import chemical_symbols

    lat = " ".join(repr(float(x)) for x in np.asarray(cell, dtype=float).reshape(-1))
    head = (f'Lattice="{lat}" Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3 '
            f"energy={float(energy)!r}")
    if free_energy is not None:
        head += f" free_energy={float(free_energy)!r}"
    head += ' pbc="T T T"'
    lines = [str(len(numbers)), head]
    for z, p, fx, t, f in zip(numbers, positions, fixed, tags, forces):
        lines.append(f"{chemical_symbols[int(z)]:<2} {p[0]:16.8f} {p[1]:16.8f} {p[2]:16.8f} "
                     f"{'F' if fx else 'T'} {int(t):8d} {f[0]:16.8f} {f[1]:16.8f} {f[2]:16.8f}")
    return "\n".join(lines) + "\n"


def write_s2ef_shard(directory, stem, frames, txt_lines, *, xz: bool = True) -> tuple[str, str]:
    """Write ``<stem>.extxyz[.xz]`` (frames: dicts of s2ef_frame_text arguments) and
    ``<stem>.txt[.xz]`` (lines ``random<sid>,frame<fid>,<reference_energy>``)."""
    ext = ".xz" if xz else ""
    xyz = os.path.join(os.fspath(directory), f"{stem}.extxyz{ext}")
    txt = os.path.join(os.fspath(directory), f"{stem}.txt{ext}")
    opener = (lambda p: lzma.open(p, "wt")) if xz else (lambda p: open(p, "w"))
    with opener(xyz) as f:
        for fr in frames:
            f.write(s2ef_frame_text(**fr))
    with opener(txt) as f:
        for line in txt_lines:
            f.write(line + "\n")
    return xyz, txt
