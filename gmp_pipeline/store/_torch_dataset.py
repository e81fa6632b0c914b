"""The torch ``Dataset`` of a store: structure dicts as tensors, fetched a batch at a time.

Imported only by :func:`gmp_pipeline.store.torch.make_torch_dataset` (torch is an optional
dependency).  The dataset is a module-level class holding the store, so it pickles by path and
each ``DataLoader`` worker process reopens the store with a cache of its own.

A batch is converted column by column: one tensor per field for the whole batch, split into
per-structure views, rather than one tensor per field per structure (QM9 has some 30 fields).
"""
from __future__ import annotations

import numpy as np
import torch

_FLOAT_KEYS = frozenset(("features", "positions", "forces", "energy", "cell", "dfeatures"))


def _column_tensor(name: str, values: np.ndarray, dtype):
    if name == "energy":
        # a total energy (e.g. -97080 kcal/mol) in float32 keeps only ~0.008 of it
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    t = torch.from_numpy(np.ascontiguousarray(values))
    return t.to(dtype) if name in _FLOAT_KEYS and t.dtype != dtype else t


class TensorBatch(list):
    """The structure dicts of one fetched batch; ``flat[field]`` is the one tensor of each atom-
    or pair-level field whose row blocks the dicts hold, in order (``collate_energy_forces``
    returns it as it is instead of concatenating the views again)."""

    flat: dict


def batch_tensors(store, indices, *, fields=None, dtype=torch.float32) -> TensorBatch:
    """``store.get_batch(indices, fields)`` as dicts of tensors (text fields stay numpy)."""
    uniq, inverse, cols = store.read_columns(indices, fields, copy=False)
    order = inverse.tolist()
    per: dict[str, list] = {}
    flat: dict[str, torch.Tensor] = {}
    for name, values in cols.items():
        if isinstance(values, list):        # atom- or pair-level: one tensor, split into views
            parts = [values[k] for k in order]
            counts = [v.shape[0] for v in parts]
            if parts and parts[0].dtype.kind in "USOT":
                per[name] = [v.copy() for v in parts]
                continue
            whole = _column_tensor(name, np.concatenate(parts) if parts else np.zeros(0), dtype)
            flat[name] = whole
            per[name] = list(torch.split(whole, counts))
        elif values.dtype.kind in "USOT":
            per[name] = [values[k] for k in order]
        else:                               # structure-level: one row per structure
            rows = _column_tensor(name, values, dtype).unbind(0)
            per[name] = [rows[k] for k in order]
    names = list(per)
    out = TensorBatch({name: per[name][k] for name in names} for k in range(len(order)))
    out.flat = flat
    return out


class GMPDataset(torch.utils.data.Dataset):
    """Structures of a gmp-features store as dicts of tensors (``fields`` as for
    :meth:`FeatureStore.get_batch`; floats in ``dtype``, default float32, energy float64).

    The tensors of one fetched batch are views of one tensor per field (see
    :class:`TensorBatch`).
    """

    def __init__(self, store, indices=None, *, dtype=None, fields=None):
        self.store = store
        self.indices = (np.arange(len(store)) if indices is None
                        else np.asarray(indices, dtype=np.int64))
        self.dtype = dtype or torch.float32
        self.fields = fields
        store._resolve_fields(fields)   # an unknown field fails here, not in a worker

    def __len__(self):
        return int(self.indices.size)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, items):  # batched fetch (used by DataLoader)
        pos = self.indices[np.asarray(items, dtype=np.int64)]
        return batch_tensors(self.store, pos, fields=self.fields, dtype=self.dtype)
