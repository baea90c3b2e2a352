"""A child process that must not outlive its parent (a ``--workers`` worker, the spool writer)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Ask for ``sig`` when the parent dies (``prctl(PR_SET_PDEATHSIG)``); exit at once if it already has.

    Not Linux: nothing is asked, and the parent's own stop is all there is.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)
