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

from .errors import StoreError


def check_before_cluster(reader, store, featurizer, *, derivatives: bool, dtype: str,
                         overwrite: bool = False, derivative_atoms: str = "all") -> None:
    """Raise :class:`StoreError` now for a store that :func:`featurize_to_store` would refuse.

    * another run holds the store's lock;
    * the path is a file, or a non-empty directory that is not a Zarr store;
    * without *overwrite*: a Zarr store of another format, or a gmp-features store written
      with a different configuration (the message names what differs).
    """
    from .store.layout import FORMAT_NAME, fingerprints_match, read_root_attrs
    from .store.lock import lock_path, store_lock
    from .store.writer import only_skip_bad_records_turned_on, refuse_mismatch

    path = Path(os.path.abspath(os.fspath(store)))
    lock = lock_path(path)
    if lock.parent.is_dir():
        with store_lock(path):    # held by a live run: StoreError naming it
            pass
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory")
    old = read_root_attrs(path)
    if old is None:
        if any(path.iterdir()):
            raise StoreError(f"{path} exists and is not a Zarr store; refusing to touch it "
                             "(choose another output path or remove it yourself)")
        return
    if overwrite:
        return
    if old.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is a Zarr store but not a {FORMAT_NAME} store; use "
                         "--overwrite to replace it")
    from .pipeline.run import store_attrs

    attrs, _ = store_attrs(reader, featurizer, derivatives=derivatives, dtype=dtype,
                           derivative_atoms=derivative_atoms)
    if not fingerprints_match(old, attrs) and not only_skip_bad_records_turned_on(old, attrs):
        refuse_mismatch(path, old, attrs)    # the writer's own message, naming what differs
