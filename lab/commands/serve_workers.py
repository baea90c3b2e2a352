"""The worker processes of ``smtplab serve --workers N``: fork them, wait for them, stop them together.

Each worker is a forked copy of the parent that runs its own reactor on the same listening addresses
(``SO_REUSEPORT``: the kernel spreads new connections among them). The parent runs no reactor: it forks, waits
until every worker is listening (each writes one byte to a pipe), forwards SIGTERM/SIGINT to them, and reaps them.

- A clean stop (SIGTERM or SIGINT to the parent): every worker is sent SIGTERM and stops as a single process does
  (spool writes in flight get their 250, other sessions a 421); the parent exits 0 once all have exited 0.
- A worker that dies unasked (a crash, a kill) is reported on stderr; the parent then stops the others and
  exits 2. It does not restart workers: a supervisor (systemd, a container runtime) restarts the whole server,
  which recovers the spool's ``tmp/`` first.
- The parent killed (even by SIGKILL): each worker asked the kernel for SIGTERM on its parent's death
  (``PR_SET_PDEATHSIG``), so none is left listening.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable

from lab.errors import EXIT_BAD_INPUT, EXIT_HARNESS, BadInput, HarnessError
from lab.lifetime import die_with_parent

#: ``run(index, ready)``: worker ``index`` (0-based) serves until SIGTERM, calls ``ready()`` once listening, and
#: returns its exit code.
WorkerMain = Callable[[int, Callable[[], None]], int]


def cores() -> int:
    """The cores this process may run on (``--workers auto``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def supervise(count: int, run: WorkerMain, listening: Callable[[], None], say: Callable[[str], None]) -> int:
    """Run ``count`` workers and wait for them; returns the parent's exit code (0 clean stop, 2 a worker failed).

    ``listening()`` is called once every worker listens; ``say`` reports what happens to them (one line each).
    """
    parent = os.getpid()
    ready_read, ready_write = os.pipe()
    live: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def stop_all(_signum: int = 0, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in live:
            _signal(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                os.close(ready_read)
                _worker(parent, index, run, ready_write)
            live[pid] = index
        os.close(ready_write)
        if stopping:  # a signal came while forking: the later workers did not get it
            stop_all()
        started = _wait_ready(ready_read, count)
        if started < count and not stopping:
            say(f"{count - started} of {count} workers did not start; stopping the others")
            stop_all()
        elif started == count:
            listening()
        failed = started < count
        while live:
            pid, status = os.waitpid(-1, 0)
            index = live.pop(pid, -1)
            if index < 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code == 0 and stopping:
                continue
            failed = True
            what = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            if not stopping:
                say(f"worker {index + 1} (pid {pid}) {what} unasked; stopping the others")
                stop_all()
            elif code != 0:
                say(f"worker {index + 1} (pid {pid}) {what}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_HARNESS if failed else 0


def _wait_ready(ready_read: int, count: int) -> int:
    """How many workers said they listen; returns when all have, or when every other one has exited."""
    started = 0
    while started < count:
        try:
            chunk = os.read(ready_read, count)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if not chunk:
            break  # every write end is closed: the workers that did not say so have exited
        started += len(chunk)
    os.close(ready_read)
    return started


def _worker(parent: int, index: int, run: WorkerMain, ready_write: int) -> None:
    """In the forked child: die with the parent, serve, and leave with ``os._exit`` (never the parent's code)."""
    code = EXIT_HARNESS
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the parent, which stops us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker's reactor installs its own
        die_with_parent(parent)

        def ready() -> None:
            os.write(ready_write, b"+")
            os.close(ready_write)

        code = run(index, ready)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_HARNESS
    except BadInput as exc:
        print(f"smtplab: worker {index + 1}: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except HarnessError as exc:  # e.g. it cannot listen
        print(f"smtplab: worker {index + 1}: harness error: {exc}", file=sys.stderr)
    except BaseException:  # a bug: its traceback, and the parent stops the others
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
