"""Where a run's work executes: one interface, two implementations.

:class:`DaskExecutor` submits to a :class:`distributed.Client`; :class:`InProcessExecutor` runs
in this process (one job at a time in the calling thread, or in a small thread pool).  The run
(:mod:`.run`) is written once against this interface, so each phase has one code path whatever
executes it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

from ..errors import GMPError


class InProcessExecutor:
    """Runs jobs in this process: in the calling thread (``threads=1``, the serial reference) or
    in a pool of ``threads`` threads (for jobs that write disjoint files, like assembly)."""

    in_process = True

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))

    @property
    def n_workers(self) -> int:
        return 1

    def run_everywhere(self, fn: Callable, *args) -> None:
        fn(*args)

    def share(self, obj: Any, *, name: str) -> Any:
        """``obj`` itself (see :meth:`DaskExecutor.share`)."""
        return obj

    def map_unordered(self, fn: Callable, args: Sequence[tuple], *, name: str,
                      ids: Sequence[int] | None = None,
                      priorities: Sequence[int] | None = None) -> Iterator[Any]:
        """Results of ``fn(*a)`` for each ``a`` in ``args`` (``name``, ``ids`` and ``priorities``
        only matter to the Dask executor)."""
        if self.threads == 1 or len(args) <= 1:
            for a in args:
                yield fn(*a)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.threads, len(args))) as pool:
            yield from pool.map(lambda a: fn(*a), args)


class DaskExecutor:
    """Runs jobs as Dask tasks of ``client`` (keys ``gmp-<name>-<i>-<token>``, not cached)."""

    in_process = False

    def __init__(self, client):
        self.client = client

    @property
    def n_workers(self) -> int:
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:
            info = self.client.scheduler_info()
        return max(1, len(info["workers"]))

    def run_everywhere(self, fn: Callable, *args) -> None:
        """``fn(*args)`` on every worker (after at least one has joined)."""
        try:
            self.client.wait_for_workers(1, timeout=600)
        except Exception as exc:  # noqa: BLE001
            raise GMPError(f"no Dask worker joined within 10 minutes: {exc}") from exc
        self.client.run(fn, *args)

    def share(self, obj: Any, *, name: str) -> Any:
        """A future of ``obj`` to pass (as a whole argument) to many jobs of
        :meth:`map_unordered`: ``obj`` is pickled once, into one task of the graph, instead of
        once into every job (a reader of a large source carries an index that grows with it:
        pickled into each of N tasks, the driver and the scheduler held N copies).  A task, not
        scattered data, so that the scheduler can recompute it on a worker that joins after
        the holders are gone.  Release it with ``del`` when the jobs are done."""
        return self.client.submit(_same, obj, key=f"gmp-{name}-{os.urandom(4).hex()}",
                                  pure=False)

    def map_unordered(self, fn: Callable, args: Sequence[tuple], *, name: str,
                      ids: Sequence[int] | None = None,
                      priorities: Sequence[int] | None = None) -> Iterator[Any]:
        """Results of ``fn(*a)`` for each ``a`` in ``args`` as they complete; an error or an
        interruption cancels what is left."""
        from distributed import as_completed

        token = os.urandom(4).hex()
        extra = [{} if priorities is None else {"priority": priorities[k]}
                 for k in range(len(args))]
        ids = range(len(args)) if ids is None else ids
        futures = [self.client.submit(fn, *a, key=f"gmp-{name}-{i}-{token}", pure=False, **x)
                   for i, a, x in zip(ids, args, extra)]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:  # an error, Ctrl-C, or a consumer that stopped early
            self.client.cancel(futures)
            raise


def _same(obj):
    return obj


def executor_for(client) -> InProcessExecutor | DaskExecutor:
    """The executor of a run: ``client`` (a distributed Client) or, for None, this process."""
    return InProcessExecutor() if client is None else DaskExecutor(client)


__all__ = ["InProcessExecutor", "DaskExecutor", "executor_for"]
