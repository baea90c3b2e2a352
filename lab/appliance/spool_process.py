"""The spool written by a process of its own, so that its file work never waits on the reactor's interpreter.

In-process spool threads cost ``smtplab serve`` as much as the rest of a plaintext session: every ``open``,
``write``, ``fsync`` and ``link`` a thread makes gives the interpreter lock up and takes it back, and the reactor
thread, which holds it for the sessions, stalls at each hand-over. ``SpoolProcess`` sends each message to a
writer process (``lab.appliance.spool_writer``) over a local socket and goes on with other sessions; the writer
stores it durably and answers with its name, and only then does the session's ``done`` run, so a 250 never
precedes the message and its directory entry on disk (docs/security.md). On a machine with two cores or more
the sessions and the spool run side by side.

If the writer dies, every message waiting for it fails (the sessions answer 451; nothing was acknowledged) and
the next message starts a new writer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

from lab.appliance.spool import Maildir, Outcome, SpoolError
from lab.appliance.spool_writer import read_answers, request_frame

STOP_WAIT = 60.0  # seconds the writer gets to store what it holds once the server stops
READ_SIZE = 1 << 16


class SpoolProcess:
    """The reactor's side: ``submit`` a message, and ``done(outcome)`` runs on the reactor thread."""

    def __init__(self, reactor: Any, pid: int | None = None) -> None:
        self._reactor = reactor
        self._pid = os.getpid() if pid is None else pid  # named in the Maildir file names
        self._process: subprocess.Popen[bytes] | None = None
        self._link: _Link | None = None
        self._start()

    @property
    def pid(self) -> int | None:
        """The writer's process ID (None before it starts or after ``stop``)."""
        return None if self._process is None else self._process.pid

    def submit(self, maildir: Maildir, message: bytes, done: Callable[[Outcome], None]) -> None:
        """Store ``message``; ``done(outcome)`` is called on the reactor thread once it is durable (or failed)."""
        if self._link is None or self._link.closed:
            self._start()
        assert self._link is not None
        self._link.send(os.fsencode(str(maildir.path)), message, done)

    def stop(self) -> None:
        """End the socket (the writer stores and answers what it holds, then exits); wait for the writer.

        Each message still waiting gets its real outcome: the answers are read until the writer's end."""
        if self._link is not None:
            self._link.finish(STOP_WAIT)
            self._link = None
        if self._process is not None:
            try:
                self._process.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self._process.kill()  # our own child, by its PID
                self._process.wait()
            self._process = None

    def _start(self) -> None:
        if self._link is not None:
            self._link.close()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()  # a writer whose socket has ended is of no use; our own child, by its PID
            self._process.wait()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            arguments = [str(theirs.fileno()), str(self._pid), str(os.getpid())]  # FD, PID named, parent
            self._process = subprocess.Popen(
                [sys.executable, "-m", "lab.appliance.spool_writer", *arguments],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                process_group=0,  # a Ctrl-C at the terminal is the server's to handle, not the writer's
            )
        except OSError as exc:
            ours.close()
            raise SpoolError(f"cannot start the spool writer: {exc.strerror or exc}") from exc
        finally:
            theirs.close()
        self._link = _Link(self._reactor, ours)


class _Link:
    """One socket to a writer, read and written by the reactor: requests out as soon as they are made."""

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        self._reactor = reactor
        self._sock = sock
        sock.setblocking(False)
        self.closed = False
        self._next = 0
        self._waiting: dict[int, Callable[[Outcome], None]] = {}
        self._out = b""  # what the socket did not take yet
        self._in = b""
        reactor.addReader(self)

    def send(self, path: bytes, message: bytes, done: Callable[[Outcome], None]) -> None:
        self._next = (self._next + 1) & 0xFFFFFFFF
        self._waiting[self._next] = done
        frame = request_frame(self._next, path, message)
        if self._out:
            self._out += frame
            return
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"cannot reach the spool writer: {exc.strerror or exc}")
            return
        if sent < len(frame):
            self._out = frame[sent:]
            self._reactor.addWriter(self)

    def close(self) -> None:
        """Stop using the socket (a writer being replaced); what still waits for it fails."""
        self._lost("the spool writer was replaced before the message was stored")

    def finish(self, wait: float) -> None:
        """Outside the reactor (it has stopped): hand over what is pending, end our side, and read every answer
        until the writer's end (at most ``wait`` seconds); only what is still unanswered then fails."""
        if self.closed:
            return
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        try:
            self._sock.settimeout(wait)
            if self._out:
                self._sock.sendall(self._out)
                self._out = b""
            self._sock.shutdown(socket.SHUT_WR)
            while self._waiting:
                data = self._sock.recv(READ_SIZE)
                if not data:
                    break
                self._answered(data)
        except OSError:
            pass  # a timeout or a writer gone: what is unanswered fails below
        self._lost("the spool writer stopped before the message was stored")

    # -- the reactor's descriptor interface

    def fileno(self) -> int:
        return -1 if self.closed else self._sock.fileno()

    def logPrefix(self) -> str:
        return "spool-writer"

    def doRead(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"the spool writer's socket failed: {exc.strerror or exc}")
            return
        if not data:
            self._lost("the spool writer stopped before the message was stored")
            return
        self._answered(data)

    def _answered(self, data: bytes) -> None:
        answers, self._in = read_answers(self._in + data if self._in else data)
        for request, outcome in answers:
            done = self._waiting.pop(request, None)
            if done is not None:
                done(outcome)

    def doWrite(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"cannot reach the spool writer: {exc.strerror or exc}")
            return
        self._out = self._out[sent:]
        if not self._out:
            self._reactor.removeWriter(self)

    def connectionLost(self, reason: Failure) -> None:
        self._lost(f"the spool writer's socket failed: {reason.getErrorMessage()}")

    def _lost(self, why: str) -> None:
        if not self.closed:
            self._reactor.removeReader(self)
            self._reactor.removeWriter(self)
            self._sock.close()
            self.closed = True
        waiting, self._waiting = self._waiting, {}
        for done in waiting.values():
            done(SpoolError(why))
