"""How the command line ends: one line per failure, exit codes, Ctrl-C / SIGTERM, quiet Dask.

The ``gmp-pipeline`` commands run through :func:`run_command`, which turns

* an error raised on purpose (:class:`~gmp_pipeline.errors.GMPError`) into ``Error: <message>``
  and exit status 1;
* an operating-system error (full disk, permission denied, ...) into ``Error: <what>: <path>``
  and exit status 1;
* SIGINT (Ctrl-C, ``kill -INT``) into ``Interrupted; rerun the same command to resume`` and
  exit status 130, SIGTERM (``kill``, a batch system ending the job) likewise with 143.
  The store is left incomplete, so rerunning the same command resumes it;
* a closed output pipe (``gmp-pipeline inspect STORE | head``) into a quiet exit with status 141,
  as a process ended by SIGPIPE.

No traceback and none of distributed's own log blocks (``Compute Failed``, ``Run Failed``, the
``CancelledError`` noise of a cluster torn down mid-run) are printed, unless debugging is on
(``gmp-pipeline --debug ...`` or ``GMP_PIPELINE_DEBUG=1``).

Importing ``dask_jobqueue`` (its ``runner`` module) replaces the SIGINT handler by
``lambda *_: sys.exit()``, which made an interrupted run exit with status 0;
:func:`keep_signal_handlers` undoes that around the import.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import traceback
import warnings

#: exit status of a run ended by a signal: 128 + the signal number, as shells report it
EXIT_SIGINT = 128 + signal.SIGINT      # 130
EXIT_SIGTERM = 128 + signal.SIGTERM    # 143
INTERRUPTED = "Interrupted; rerun the same command to resume"

#: loggers whose messages are Dask's, not ours (silenced once a run is being torn down)
DASK_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")

_debug = os.environ.get("GMP_PIPELINE_DEBUG", "").lower() in ("1", "true", "yes", "on")
_signalled: int | None = None


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM (``signum`` says which).

    A :class:`KeyboardInterrupt`, so every ``except KeyboardInterrupt`` / ``BaseException``
    clean-up of the pipeline (cancelling futures, closing the cluster) runs for SIGTERM too.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def set_debug(on: bool = True) -> None:
    """Show tracebacks and distributed's log messages (``gmp-pipeline --debug``)."""
    global _debug
    _debug = bool(on) or _debug


def debug() -> bool:
    return _debug


@contextlib.contextmanager
def keep_signal_handlers():
    """Restore the SIGINT/SIGTERM handlers that code run inside this block replaces.

    ``dask_jobqueue.runner`` installs ``signal.signal(SIGINT, lambda *_: sys.exit())`` at
    import time (a Ctrl-C then exits with status 0).  Only in the main thread (the only one
    that may set handlers).
    """
    import threading

    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def silence_dask() -> None:
    """Drop distributed's (and tornado's, asyncio's) log messages and Python warnings from now on.

    Used once a run is ending because of an error or a signal: closing a cluster with tasks in
    flight logs ``CancelledError``s, "Worker process still alive ... killing" and the like,
    none of which the user can act on.
    """
    if _debug:
        return
    for name in DASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    warnings.simplefilter("ignore")


def _on_signal(signum, frame):
    global _signalled
    if _signalled is not None:
        # a second signal while the cluster shuts down: let the clean-up finish (it cancels
        # batch jobs); a third ends the process at once
        _signalled_again[0] += 1
        if _signalled_again[0] >= 2:
            os._exit(128 + signum)
        return
    _signalled = signum
    silence_dask()
    raise Interrupted(signum)


_signalled_again = [0]


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (the CLI's handlers)."""
    global _signalled
    _signalled = None
    _signalled_again[0] = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread (e.g. CliRunner in a thread): leave them
            pass


def restore_default_signal_handlers() -> None:
    for sig, handler in ((signal.SIGINT, signal.default_int_handler),
                         (signal.SIGTERM, signal.SIG_DFL)):
        try:
            signal.signal(sig, handler)
        except ValueError:
            pass


# -- error messages ----------------------------------------------------------------------------

#: errno -> what the user should read instead of the C library's wording
_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def os_error_message(exc: OSError, path=None) -> str:
    """One line for an :class:`OSError`: what happened and the file (or *path*, the store)."""
    what = _OS_ERRORS.get(exc.errno) or (exc.strerror or str(exc) or type(exc).__name__)
    where = exc.filename or path
    text = f"{what} writing {where}" if where and exc.errno in (
        errno.ENOSPC, errno.EDQUOT, errno.EROFS) else (f"{what}: {where}" if where else what)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += ("; free some space (or write the store elsewhere), then rerun the same command "
                 "to resume")
    return text


def _cause_chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _find_os_error(exc):
    """The OSError behind *exc* (zarr and asyncio wrap it sometimes), or None."""
    for e in _cause_chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            return e
    return None


def error_line(exc: BaseException, path=None) -> str | None:
    """``Error: ...`` text for an exception the user should see as one line, else None."""
    from .errors import GMPError

    if isinstance(exc, GMPError):
        return str(exc)
    if type(exc).__name__ == "KilledWorker":     # distributed.scheduler.KilledWorker
        task = getattr(exc, "task", None) or "a task"
        tries = int(getattr(exc, "allowed_failures", 0) or 0) + 1
        return (f"the Dask worker running {task} died {tries} times in a row (killed, or over "
                f"its memory limit: see the worker messages above); the store is incomplete. "
                f"Give workers more memory (fewer --workers, or memory per job) or smaller "
                f"tasks (--chunk-size), then rerun the same command to resume")
    if type(exc).__name__ == "CommClosedError":  # distributed.comm.core
        return ("a Dask worker died or lost its connection (killed, or over its memory "
                "limit: see the worker messages above); the store is incomplete. Give workers "
                "more memory (fewer --workers, or memory per job), then rerun the same command "
                "to resume")
    ose = _find_os_error(exc)
    if ose is not None:
        return os_error_message(ose, path)
    return None


def run_command(func, args, kwargs, *, path=None, echo=None):
    """Run a CLI command and end the process as the module docstring says.

    *path*: the file the command writes (the store), named by OS errors without a file name.
    Returns what *func* returns when it succeeds.
    """
    echo = echo or (lambda msg: (sys.stderr.write(msg + "\n"), sys.stderr.flush()))
    install_signal_handlers()
    try:
        return func(*args, **kwargs)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None) or _signalled or signal.SIGINT
        silence_dask()
        if _debug:
            traceback.print_exc()
        echo(INTERRUPTED)
        sys.exit(128 + int(signum))
    except (SystemExit, *click_exceptions()):
        raise
    except BrokenPipeError:
        # whoever read our output went away (``gmp-pipeline inspect STORE | head``): end quietly
        # with the status of a process killed by SIGPIPE, as the shell's own tools do
        # (stdout goes to /dev/null first, or Python's exit flush would complain once more)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # pragma: no cover - no usable stdout at all
            pass
        sys.exit(128 + int(signal.SIGPIPE))
    except Exception as exc:  # noqa: BLE001 - decided by error_line below
        line = error_line(exc, path)
        if line is None:
            raise
        silence_dask()
        if _debug:
            traceback.print_exc()
        echo(f"Error: {line}")
        sys.exit(1)
    finally:
        restore_default_signal_handlers()


def click_exceptions():
    try:
        import click

        return (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)
    except ImportError:  # pragma: no cover - click is a dependency
        return ()
