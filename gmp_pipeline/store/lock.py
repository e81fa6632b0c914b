"""The lock that keeps two featurize runs off one store (an ``flock`` beside it)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from ..errors import StoreError

logger = logging.getLogger("gmp_pipeline.store")


def lock_path(path) -> Path:
    """The lock file of the store at ``path``: a hidden file beside it (``.NAME.lock``), so
    that ``--overwrite`` can remove the store itself while the lock is held."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def store_lock(path, log=None):
    """Hold an exclusive lock on the store at ``path`` for one featurize run.

    A second run on the same store (by mistake: two shells, a resubmitted batch job) fails at
    once with :class:`StoreError` naming the process that holds it, instead of both writing
    the same staging area.  The lock is an ``flock`` on :func:`lock_path`; the system drops it
    when the holder dies, so a killed run never leaves a stale lock.  Where the file system
    has no locks (some network file systems) the run goes on without one, with a warning.
    """
    import socket

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    lp = lock_path(path)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the directory of {path}: {exc}") from exc
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {lp}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                   f"{holder.get('started', '?')}") if holder else "another process"
            raise StoreError(f"{path} is being written by another gmp-pipeline run ({who}); "
                             f"wait for it to finish or stop it (lock file {lp})") from None
        except OSError as exc:
            os.close(fd)
            msg = f"warning: cannot lock {lp} ({exc}); make sure no other run writes {path}"
            if log:
                log(msg)
            else:
                logger.warning(msg)
            yield
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file as we locked it: take the new one
    try:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        yield
    finally:
        try:
            os.unlink(lp)
        except OSError:
            pass
        os.close(fd)


__all__ = ["lock_path", "store_lock"]
