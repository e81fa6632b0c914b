"""Checks of a featurize run that need no cluster, made before the cluster starts.

Starting a cluster costs seconds (minutes for batch jobs in a queue) and prints its own lines;
a run refused afterwards for a reason known from the start (the store is held by another run,
it was written with another configuration) wastes them and buries the refusal.  The pipeline
makes the same checks again when it really takes the store (under its lock), so these are an
early, read-only copy: nothing here changes the store.
"""
from __future__ import annotations

import os
from pathlib import Path



def check_before_cluster(reader, store, featurizer, *, derivatives: bool, dtype: str,
                         overwrite: bool = False, derivative_atoms: str = "all") -> None:
    """Raise :class:`StoreError` now for a store that :func:`featurize_to_store` would refuse.

    * another run holds the store's lock;
    * the path is a file, or a non-empty directory that is not a Zarr store;
    * without *overwrite*: a Zarr store of another format, or a gmp-features store written
      with a different configuration (the message names what differs).
    """
    from .pipeline.run import store_attrs
    from .store.lock import lock_path, store_lock
    from .store.writer import existing_store_state

    path = Path(os.path.abspath(os.fspath(store)))
    lock = lock_path(path)
    if lock.parent.is_dir():
        with store_lock(path):    # held by a live run: StoreError naming it
            pass
    # the path checks first (cheap), then the configuration: the writer's own rules and messages
    if existing_store_state(path, None, overwrite=overwrite) == "resume":
        attrs, _ = store_attrs(reader, featurizer, derivatives=derivatives, dtype=dtype,
                               derivative_atoms=derivative_atoms)
        existing_store_state(path, attrs, overwrite=overwrite)
