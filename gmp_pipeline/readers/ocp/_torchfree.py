"""Decode pickled torch_geometric ``Data`` objects (OC20/OC22 LMDB values) without torch.

A restricted :class:`pickle.Unpickler` resolves only the globals this format needs, each to a
harmless stand-in written here; any other global (``os.system``, ``builtins.eval``, ...) is refused
in ``find_class`` before it can be called.  Tensors arrive as ``torch._utils._rebuild_tensor_v2``
applied to ``torch.storage._load_from_bytes(<legacy torch.save stream>)``; both are reimplemented
on numpy (format facts: shared/spec/dataset-formats.md section 4.5).
"""
from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict

import numpy as np

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype("<u2"),  # widened below
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"), "UntypedStorage": np.dtype("u1"),
}
_NUMPY_OK_KINDS = "biuf"


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the whitelist (it was not imported or called)."""

    def __init__(self, module: str, name: str):
        super().__init__(f"the pickle references the global {module}.{name}, which this "
                         "torch-free reader does not allow (nothing was called)")
        self.module, self.name = module, name


class DecodeError(ValueError):
    """The pickle is well formed but its tensors or storages are inconsistent."""


class PyGObject:
    """Base of the stand-ins for torch_geometric classes; state goes into ``__dict__``."""


def _standin(module: str, name: str) -> type:
    cls = type(name, (PyGObject,), {"__module__": module, "__qualname__": name})
    return cls


PYG_CLASSES = {
    ("torch_geometric.data.data", "Data"): _standin("torch_geometric.data.data", "Data"),
    ("torch_geometric.data.data", "DataEdgeAttr"): _standin("torch_geometric.data.data",
                                                            "DataEdgeAttr"),
    ("torch_geometric.data.data", "DataTensorAttr"): _standin("torch_geometric.data.data",
                                                              "DataTensorAttr"),
    ("torch_geometric.data.storage", "GlobalStorage"): _standin("torch_geometric.data.storage",
                                                                "GlobalStorage"),
    ("torch_geometric.data.batch", "Batch"): _standin("torch_geometric.data.batch", "Batch"),
}


class _StorageType:
    """Stand-in for ``torch.<X>Storage`` classes inside the legacy stream."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    def __init__(self, stype: _StorageType, numel: int):
        self.stype, self.numel = stype, numel
        self.array: np.ndarray | None = None


class _LegacyStreamUnpickler(pickle.Unpickler):
    """One pickle of a legacy torch.save stream: only torch storage classes, storages by
    persistent id (collected in ``storages``).  A module-level class: defining it per storage
    cost a sixth of the time of counting a record's atoms."""

    def __init__(self, f, storages: dict):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise RefusedGlobal(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise DecodeError(f"unexpected persistent id {pid!r:.80}")
        stype, key, numel = pid[1], str(pid[2]), pid[4]   # pid[3]: location
        if not isinstance(stype, _StorageType):
            raise DecodeError(f"storage type {stype!r:.60} is not a torch storage class")
        if len(pid) > 5 and pid[5] is not None:
            raise DecodeError("storage views (pre-1.0 torch files) are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(stype, int(numel))
        return self.storages[key]


def load_legacy_storage(data: bytes) -> np.ndarray:
    """``torch.storage._load_from_bytes``: parse a legacy torch.save stream holding one storage."""
    f = io.BytesIO(data)
    storages: dict[str, _Storage] = {}

    def plain_load():
        return _LegacyStreamUnpickler(f, storages).load()

    try:
        magic = plain_load()
        if magic != _TORCH_MAGIC:
            raise DecodeError("storage bytes are not a legacy torch.save stream (bad magic)")
        if plain_load() != _TORCH_PROTOCOL:
            raise DecodeError("unsupported torch.save protocol version")
        sys_info = plain_load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise DecodeError("only little-endian torch streams are supported")
        result = plain_load()
        keys = plain_load()
    except (EOFError, struct.error) as exc:
        raise DecodeError(f"storage stream is truncated ({exc})") from None
    if not isinstance(result, _Storage) or not isinstance(keys, list):
        raise DecodeError("storage stream does not hold one storage")
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise DecodeError(f"storage key {key!r} was not declared")
        head = f.read(8)
        if len(head) != 8:
            raise DecodeError("storage stream is truncated (element count)")
        (count,) = struct.unpack("<q", head)
        nbytes = count * st.stype.dtype.itemsize
        raw = f.read(nbytes)
        if count < 0 or len(raw) != nbytes:
            raise DecodeError(f"storage {key} declares {count} elements but holds "
                              f"{len(raw) // st.stype.dtype.itemsize} (truncated)")
        arr = np.frombuffer(raw, dtype=st.stype.dtype)
        if st.stype.name == "BFloat16Storage":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        st.array = arr
    if result.array is None:
        raise DecodeError("storage data missing")
    return result.array


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                   backward_hooks=None, metadata=None, *rest):
    """``torch._utils._rebuild_tensor_v2``: a numpy copy of the strided view."""
    if not isinstance(storage, np.ndarray):
        raise DecodeError(f"tensor storage is {type(storage).__name__}, not a decoded storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    off = int(storage_offset)
    if len(size) != len(stride) or off < 0 or any(s < 0 for s in size):
        raise DecodeError(f"inconsistent tensor size {size} / stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = off + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size or any(s < 0 for s in stride):
        raise DecodeError(f"tensor (offset {off}, size {size}, stride {stride}) reaches past "
                          f"its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[off:], shape=size,
                                           strides=[s * storage.itemsize for s in stride],
                                           writeable=False)
    return np.array(view)


def rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                      dtype=None, metadata=None):
    return rebuild_tensor(storage, storage_offset, size, stride)


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def torch_device(*args):
    return str(args[0]) if args else "cpu"


class _DType:
    """Stand-in for ``numpy.dtype`` during unpickling: records the type name and byte order."""

    def __init__(self, name, align=False, copy=True):
        try:
            dt = np.dtype(str(name))
        except TypeError:
            raise DecodeError(f"numpy dtype {name!r:.40} is not allowed") from None
        if dt.kind not in _NUMPY_OK_KINDS:
            raise DecodeError(f"numpy dtype {name!r:.40} is not allowed")
        self.dtype = dt

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>|=":
            self.dtype = self.dtype.newbyteorder(state[1])


def numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, (bytes, bytearray)):
        raise DecodeError("numpy scalar with an unexpected payload")
    if len(data) != dtype.dtype.itemsize:
        raise DecodeError("numpy scalar payload has the wrong size")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


class _NDArray:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, ...)`` + ``__setstate__``."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise DecodeError("numpy array with an unexpected state")
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType) or not isinstance(raw, (bytes, bytearray)):
            raise DecodeError("numpy array with a non-numeric dtype or payload")
        arr = np.frombuffer(raw, dtype=dtype.dtype)
        n = int(np.prod(shape, dtype=np.int64))
        if arr.size != n:
            raise DecodeError(f"numpy array payload holds {arr.size} values, shape {shape}")
        self.array = arr.reshape(shape, order="F" if fortran else "C").copy()


def numpy_reconstruct(cls, shape, dtype_code):
    if cls is not _NDARRAY_MARKER:
        raise DecodeError("numpy _reconstruct of something other than ndarray")
    return _NDArray()


_NDARRAY_MARKER = object()

ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): load_legacy_storage,
    ("torch", "device"): torch_device,
    ("numpy", "dtype"): _DType,
    ("numpy", "ndarray"): _NDARRAY_MARKER,
    **{(m, "scalar"): numpy_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_reconstruct"): numpy_reconstruct
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **PYG_CLASSES,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only :data:`ALLOWED` globals."""

    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise DecodeError("unexpected persistent id in the outer pickle")


def unpickle(data: bytes):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; numpy arrays come back as arrays."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    return _finish(obj)


class TensorShape:
    """What a tensor decodes to with :func:`unpickle_shapes`: its shape only."""

    __slots__ = ("shape",)

    def __init__(self, shape):
        self.shape = tuple(int(n) for n in shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _tensor_shape(storage, storage_offset, size, *rest):
    if not isinstance(size, (tuple, list)) or not all(isinstance(n, int) and n >= 0
                                                      for n in size):
        raise DecodeError(f"inconsistent tensor size {size!r:.60}")
    return TensorShape(size)


def _storage_unread(data):
    return None


#: as :data:`ALLOWED`, but tensors become their shape and storages are not parsed
SHAPES_ALLOWED = {**ALLOWED,
                  ("torch._utils", "_rebuild_tensor_v2"): _tensor_shape,
                  ("torch._utils", "_rebuild_tensor_v3"): _tensor_shape,
                  ("torch.storage", "_load_from_bytes"): _storage_unread}


class ShapesUnpickler(RestrictedUnpickler):
    """:class:`RestrictedUnpickler` that leaves tensor data unread (for counting atoms)."""

    def find_class(self, module, name):
        try:
            return SHAPES_ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def unpickle_shapes(data: bytes):
    """Like :func:`unpickle`, with every torch tensor a :class:`TensorShape` (its storage is
    neither parsed nor copied): a record's atom count at a fraction of the cost of decoding it.
    Same whitelist of globals."""
    return _finish(ShapesUnpickler(io.BytesIO(data)).load())


def _finish(obj, _depth=0):
    if isinstance(obj, _NDArray):
        return obj.array
    if _depth > 4:
        return obj
    if isinstance(obj, PyGObject):
        for k, v in list(obj.__dict__.items()):
            obj.__dict__[k] = _finish(v, _depth + 1)
    elif isinstance(obj, dict):
        for k, v in list(obj.items()):
            obj[k] = _finish(v, _depth + 1)
    return obj


def data_attributes(obj) -> tuple[dict, str]:
    """(attribute dict, dialect) of a decoded PyG Data object (PyG 2 ``_store`` or PyG 1 dict)."""
    if not isinstance(obj, PyGObject):
        raise DecodeError(f"the value is a {type(obj).__name__}, not a torch_geometric Data "
                          "object")
    d = obj.__dict__
    store = d.get("_store")
    if store is not None:
        mapping = getattr(store, "__dict__", {}).get("_mapping")
        if not isinstance(mapping, dict):
            raise DecodeError("PyG 2 object without a _store._mapping dictionary")
        return {k: _finish(v) for k, v in mapping.items() if v is not None}, "PyG2 pickle"
    return ({k: v for k, v in d.items() if v is not None and not k.startswith("__")},
            "PyG1 pickle")
