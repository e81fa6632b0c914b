"""The torch view of a store: a ``Dataset`` of structure dicts and the collate function for
energy-and-force training (imports torch only when called).

>>> ds = make_torch_dataset(open_store("ethanol.zarr"))                    # doctest: +SKIP
>>> loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate_energy_forces)

The dataset class itself is in :mod:`._torch_dataset` (a module-level class, so it pickles
for ``DataLoader`` worker processes).
"""
from __future__ import annotations

import numpy as np


def make_torch_dataset(store, indices=None, *, dtype=None, fields=None):
    """A :class:`~._torch_dataset.GMPDataset` over ``store`` (a FeatureStore; ``indices``: a
    subset; ``fields``: as for :meth:`FeatureStore.get_batch`)."""
    from ._torch_dataset import GMPDataset

    return GMPDataset(store, indices, dtype=dtype, fields=fields)


def _views_of(whole, parts) -> bool:
    """Whether ``parts`` are consecutive row blocks of the contiguous tensor ``whole``."""
    if not parts or not whole.is_contiguous():
        return False
    ptr = whole.data_ptr()
    rows = 0
    for p in parts:
        if p.data_ptr() != ptr or p.dtype != whole.dtype or not p.is_contiguous():
            return False
        ptr += p.numel() * p.element_size()
        rows += p.shape[0]
    return rows == whole.shape[0]


def collate_energy_forces(samples: list[dict]) -> dict:
    """Collate structure dicts (tensors) into one batch for energy-and-force training.

    Returns ``features`` (A, M), ``numbers`` (A,), ``positions`` (A, 3), ``forces`` (A, 3),
    ``energy`` (B,), ``n_atoms`` (B,), ``batch`` (A,) structure of each atom, ``cell`` (B, 3, 3),
    ``pbc`` (B, 3) (each only when the structures have it: see ``fields``) and, with
    derivatives, ``pair_center``/``pair_neighbor`` (P,) as *batch* atom indices and
    ``dfeatures`` (P, 3, M).  With ``E = sum_a f(features[a])`` the forces are::

        g = autograd.grad(E, features)                     # (A, M)
        F = -zeros(A, 3).index_add(0, pair_neighbor, einsum("pm,pxm->px", g[pair_center], dfeatures))
    """
    import torch

    if not samples:
        raise ValueError("cannot collate an empty batch")
    first = samples[0]
    count_key = next((k for k in ("numbers", "features", "positions") if k in first), None)
    if count_key is None:
        raise ValueError("cannot collate structures without numbers, features or positions")
    n = torch.tensor([len(s[count_key]) for s in samples], dtype=torch.int64)
    offsets = torch.cumsum(n, 0) - n
    out = {"n_atoms": n,
           # numpy's repeat: torch.repeat_interleave costs milliseconds per call on small inputs
           "batch": torch.from_numpy(np.repeat(np.arange(len(samples), dtype=np.int64),
                                               n.numpy()))}
    flat = getattr(samples, "flat", {})     # a batch fetched by the torch dataset

    def cat(key):
        whole = flat.get(key)
        if whole is not None and _views_of(whole, [s[key] for s in samples]):
            return whole            # the samples are consecutive views of it: no copy
        return torch.cat([s[key] for s in samples])

    for key in ("features", "numbers", "positions", "forces", "fixed", "tags"):
        if key in first:
            out[key] = cat(key)
    for key in ("energy", "index"):
        if key in first:
            out[key] = torch.stack([torch.as_tensor(s[key]).reshape(()) for s in samples])
    for key in ("cell", "pbc"):
        if key in first:
            out[key] = torch.stack([s[key] for s in samples])
    if "dfeatures" in first:
        pairs = torch.tensor([len(s["pair_center"]) for s in samples], dtype=torch.int64)
        shift = torch.repeat_interleave(offsets, pairs) if len(samples) > 1 else offsets[0]
        out["pair_center"] = cat("pair_center") + shift
        out["pair_neighbor"] = cat("pair_neighbor") + shift
        out["dfeatures"] = cat("dfeatures")
    return out
