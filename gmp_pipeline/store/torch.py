"""The torch view of a store: a ``Dataset`` of structure dicts and the collate function for
energy-and-force training (imports torch only when called).

>>> ds = make_torch_dataset(open_store("ethanol.zarr"))                    # doctest: +SKIP
>>> loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate_energy_forces)
"""
from __future__ import annotations

import numpy as np


_FLOAT_KEYS = ("features", "positions", "forces", "energy", "cell", "dfeatures")


def make_torch_dataset(store, indices=None, *, dtype=None):
    """A :class:`torch.utils.data.Dataset` over ``store`` (a FeatureStore; ``indices``: a subset)."""
    import torch

    dtype = dtype or torch.float32

    def to_tensors(d):
        out = {}
        for k, v in d.items():
            v = np.asarray(v)
            if v.dtype.kind in "US" or v.dtype == object:
                out[k] = v  # text extras stay numpy
            elif k == "energy":
                # a total energy (e.g. -97080 kcal/mol) in float32 keeps only ~0.008 of it
                out[k] = torch.as_tensor(np.asarray(v, dtype=np.float64, order="C"))
            elif k in _FLOAT_KEYS:
                out[k] = torch.as_tensor(np.asarray(v, order="C")).to(dtype)  # 0-d stays 0-d
            else:
                out[k] = torch.as_tensor(np.asarray(v, order="C"))
        return out

    class GMPDataset(torch.utils.data.Dataset):
        """Structures of a gmp-features store as dicts of tensors."""

        def __init__(self):
            self.store = store
            self.indices = (np.arange(len(store)) if indices is None
                            else np.asarray(indices, dtype=np.int64))

        def __len__(self):
            return int(self.indices.size)

        def __getitem__(self, i):
            return to_tensors(self.store[int(self.indices[i])])

        def __getitems__(self, items):  # batched fetch (used by DataLoader)
            return [to_tensors(d) for d in self.store.get_batch(self.indices[list(items)])]

    return GMPDataset()


def collate_energy_forces(samples: list[dict]) -> dict:
    """Collate structure dicts (tensors) into one batch for energy-and-force training.

    Returns ``features`` (A, M), ``numbers`` (A,), ``positions`` (A, 3), ``forces`` (A, 3),
    ``energy`` (B,), ``n_atoms`` (B,), ``batch`` (A,) structure of each atom, ``cell`` (B, 3, 3),
    ``pbc`` (B, 3) and, with derivatives, ``pair_center``/``pair_neighbor`` (P,) as *batch* atom
    indices and ``dfeatures`` (P, 3, M).  With ``E = sum_a f(features[a])`` the forces are::

        g = autograd.grad(E, features)                     # (A, M)
        F = -zeros(A, 3).index_add(0, pair_neighbor, einsum("pm,pxm->px", g[pair_center], dfeatures))
    """
    import torch

    if not samples:
        raise ValueError("cannot collate an empty batch")
    n = torch.tensor([len(s["numbers"]) for s in samples], dtype=torch.int64)
    offsets = torch.cumsum(n, 0) - n
    out = {
        "features": torch.cat([s["features"] for s in samples]),
        "numbers": torch.cat([s["numbers"] for s in samples]),
        "positions": torch.cat([s["positions"] for s in samples]),
        "forces": torch.cat([s["forces"] for s in samples]),
        "energy": torch.stack([torch.as_tensor(s["energy"]).reshape(()) for s in samples]),
        "cell": torch.stack([s["cell"] for s in samples]),
        "pbc": torch.stack([s["pbc"] for s in samples]),
        "n_atoms": n,
        "batch": torch.repeat_interleave(torch.arange(len(samples)), n),
        "index": torch.stack([torch.as_tensor(s["index"]).reshape(()) for s in samples]),
    }
    if "dfeatures" in samples[0]:
        out["pair_center"] = torch.cat([s["pair_center"] + o
                                        for s, o in zip(samples, offsets)])
        out["pair_neighbor"] = torch.cat([s["pair_neighbor"] + o
                                          for s, o in zip(samples, offsets)])
        out["dfeatures"] = torch.cat([s["dfeatures"] for s in samples])
    return out


__all__ = ["make_torch_dataset", "collate_energy_forces"]
