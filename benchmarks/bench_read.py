"""Read throughput of a gmp-features store through the public reader, as a training loop sees it.

    python benchmarks/bench_read.py STORE [STORE ...] [--cache-mb N] [--epochs 2]

For each store it prints, in structures per second (one process, fresh open, so the first
epoch includes decoding every chunk once):

* ``get_batch`` of 64 random indices (a random permutation cut into batches: one epoch), with
  the default fields and with ``fields=["features", "numbers", "energy"]``;
* contiguous batches of 64 (one epoch);
* a torch ``DataLoader`` epoch (batch 64, ``collate_energy_forces``, no worker processes) in
  store order, with torch's ``RandomSampler`` and with :class:`ChunkShuffleSampler`, and the
  ratio shuffled / sequential epoch time.

Targets (issue 11): random batches of 64 on the full-QM9 features-only store >= 10,000
structures/s; on an OC20-like store with derivatives a chunk-shuffled epoch <= 1.5x a sequential
one.  ``--cache-mb`` sets the reader's chunk cache (default: the reader's default, 512 MiB);
pass one smaller than the store to see how the samplers behave when it does not fit.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gmp_pipeline import open_store  # noqa: E402
from gmp_pipeline.store import ChunkShuffleSampler, collate_energy_forces  # noqa: E402


def opened(path, cache_mb):
    return open_store(path) if cache_mb is None else open_store(path, cache_bytes=cache_mb << 20)


def epoch_of_batches(store, order, fields, batch=64):
    t0 = time.perf_counter()
    for lo in range(0, len(order), batch):
        store.get_batch(order[lo:lo + batch], fields=fields)
    return time.perf_counter() - t0


def loader_epoch(path, cache_mb, sampler_kind, seed=0):
    import torch

    ds = opened(path, cache_mb).torch_dataset()
    if sampler_kind == "sequential":
        sampler = torch.utils.data.SequentialSampler(ds)
    elif sampler_kind == "random":
        sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = ChunkShuffleSampler(ds, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=sampler,
                                         collate_fn=collate_energy_forces)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += int(b["n_atoms"].numel())
    return time.perf_counter() - t0, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--cache-mb", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of random batches (first is cold)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved DataLoader repeats")
    ap.add_argument("--no-torch", action="store_true", help="skip the DataLoader figures")
    args = ap.parse_args(argv)
    for path in args.stores:
        st = opened(path, args.cache_mb)
        n = len(st)
        print(f"{path}: {n} structures, {int(st.n_atoms().sum())} atoms, {st.n_features} "
              f"features, derivatives={st.has_derivatives}, cache "
              f"{st.cache_bytes / 2**20:.0f} MiB")
        rng = np.random.default_rng(0)
        for label, fields in (("default fields", None),
                              ("features+numbers+energy", ["features", "numbers", "energy"])):
            st = opened(path, args.cache_mb)
            for e in range(args.epochs):
                t = epoch_of_batches(st, rng.permutation(n), fields)
                print(f"  random batches of 64, {label}, epoch {e + 1}: {n / t:,.0f} structures/s "
                      f"({t:.2f} s)")
        st = opened(path, args.cache_mb)
        t = epoch_of_batches(st, np.arange(n), None)
        print(f"  contiguous batches of 64, default fields: {n / t:,.0f} structures/s ({t:.2f} s)")
        if args.no_torch:
            continue
        try:
            import torch  # noqa: F401
        except ImportError:
            print("  (torch not installed: no DataLoader figures)")
            continue
        loader_epoch(path, args.cache_mb, "sequential")   # untimed: torch's own first-use costs
        runs = {"sequential": [], "random": [], "chunk-shuffle": []}
        for r in range(args.repeat):                      # interleaved: the machine drifts
            for kind in runs:
                runs[kind].append(loader_epoch(path, args.cache_mb, kind, seed=r)[0])
        times = {kind: min(ts) for kind, ts in runs.items()}
        for kind, ts in runs.items():
            print(f"  DataLoader epoch (fresh open, batch 64), {kind} sampler: best "
                  f"{times[kind]:.2f} s ({n / times[kind]:,.0f} structures/s); runs "
                  + ", ".join(f"{t:.2f}" for t in ts))
        ratio = times["chunk-shuffle"] / times["sequential"]
        ratio_r = times["random"] / times["sequential"]
        print(f"  shuffled / sequential epoch: chunk-shuffle {ratio:.2f}x, random {ratio_r:.2f}x"
              + (f"  (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})"
                 if st.has_derivatives else ""))


if __name__ == "__main__":
    main()
