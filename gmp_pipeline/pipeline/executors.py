"""Where a run's work executes: one interface, two implementations.

:class:`DaskExecutor` submits to a :class:`distributed.Client`; :class:`InProcessExecutor` runs
in this process (one job at a time in the calling thread, or in a small thread pool).  The run
(:mod:`.run`) is written once against this interface, so each phase has one code path whatever
executes it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

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

    def map_unordered(self, fn: Callable, args: Iterable[tuple], *, name: str,
                      ids: Sequence[int] | None = None,
                      priorities: Sequence[int] | None = None) -> Iterator[Any]:
        """Results of ``fn(*a)`` for each ``a`` in ``args`` (``name``, ``ids`` and ``priorities``
        only matter to the Dask executor)."""
        if self.threads == 1:
            for a in args:
                yield fn(*a)
            return
        args = list(args)
        if len(args) <= 1:
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

    def map_unordered(self, fn: Callable, args: Iterable[tuple], *, name: str,
                      ids: Sequence[int] | None = None,
                      priorities: Sequence[int] | None = None) -> Iterator[Any]:
        """Results of ``fn(*a)`` for each ``a`` in ``args`` as they complete; an error or an
        interruption cancels what is left.

        Jobs are submitted as a window that slides as they complete (about
        :data:`JOBS_IN_FLIGHT_PER_WORKER` per worker, at least :data:`MIN_JOBS_IN_FLIGHT`), not
        all at once: the driver (and the scheduler, which runs in the driver's process for a
        local or batch cluster) then holds the futures and task states of a bounded number of
        jobs however many the run has.  ``args`` may be a generator.
        """
        from distributed import as_completed

        token = os.urandom(4).hex()
        args = iter(args)
        submitted = 0

        def submit_next():
            nonlocal submitted
            a = next(args, None)
            if a is None:
                return None
            k = submitted
            submitted += 1
            i = k if ids is None else ids[k]
            extra = {} if priorities is None else {"priority": priorities[k]}
            return self.client.submit(fn, *a, key=f"gmp-{name}-{i}-{token}", pure=False, **extra)

        window = self._window()
        first = [f for f in (submit_next() for _ in range(window)) if f is not None]
        ac = as_completed(first)
        in_flight = set(first)
        del first
        try:
            done = 0
            for fut in ac:
                in_flight.discard(fut)
                result = fut.result()
                fut.release()
                done += 1
                if done % 64 == 0:          # workers may have joined (adaptive batch jobs)
                    window = self._window()
                while len(in_flight) < window:
                    nxt = submit_next()
                    if nxt is None:
                        break
                    in_flight.add(nxt)
                    ac.add(nxt)
                yield result
        except BaseException:  # an error, Ctrl-C, or a consumer that stopped early
            self.client.cancel(list(in_flight))
            raise

    def _window(self) -> int:
        return max(MIN_JOBS_IN_FLIGHT, JOBS_IN_FLIGHT_PER_WORKER * self.n_workers)


#: jobs of one map kept submitted per worker (the rest wait in the driver as arguments)
JOBS_IN_FLIGHT_PER_WORKER = 4
#: ... and at least this many
MIN_JOBS_IN_FLIGHT = 16


def _same(obj):
    return obj


def executor_for(client) -> InProcessExecutor | DaskExecutor:
    """The executor of a run: ``client`` (a distributed Client) or, for None, this process."""
    return InProcessExecutor() if client is None else DaskExecutor(client)


__all__ = ["InProcessExecutor", "DaskExecutor", "executor_for"]
