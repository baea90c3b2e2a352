"""A durable spool: each accepted message lands in a Maildir, and a 250 to DATA means it is on disk.

Maildir delivery is the classic crash-safe recipe: write to ``tmp/``, fsync, link into ``new/``, fsync the
directory. A reader (the runner, a student with ``ls``) only ever sees complete messages in ``new/``. Every
failure is a ``SpoolError`` so the listener can answer 451 and leave nothing behind. A crash (kill -9, power)
can leave a file in ``tmp/``; it was never acknowledged, and ``Maildir.recover`` removes it at the next start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import functools
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lab.errors import BadInput

if TYPE_CHECKING:
    from lab.smtp.session import TLSInfo  # the version and cipher a session carries (lab.tls.tlsctx.TLSFacts)

FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be no longer than 78 characters
MAX_ATTEMPTS = 8  # name collisions tolerated per delivery before giving up
FSYNC_THREADS = 32  # the files of a batch are fsynced concurrently (``_fsync_all``)


class SpoolError(Exception):
    """The message could not be made durable; nothing was delivered (the listener answers 451)."""


class MaildirNames:
    """Maildir-style unique names ``<seconds>.M<micro>P<pid>Q<seq>.<host>``; deterministic for a fixed clock."""

    def __init__(self, clock: Callable[[], float] = time.time, host: str | None = None, pid: int | None = None) -> None:
        self._clock = clock
        raw_host = host if host is not None else socket.gethostname()
        self._host = raw_host.replace("/", r"\057").replace(":", r"\072") or "localhost"
        self._pid = os.getpid() if pid is None else pid
        self._seq = itertools.count(1)  # next() is atomic: committer threads share one source

    def __call__(self) -> str:
        seq = next(self._seq)
        now = self._clock()
        seconds, micro = int(now), round((now - int(now)) * 1_000_000) % 1_000_000
        return f"{seconds}.M{micro:06d}P{self._pid}Q{seq}.{self._host}"  # padded: names sort by time


@dataclass(frozen=True)
class Leftover:
    """A file an interrupted delivery left in ``tmp/``; ``delivered``: its link in ``new/`` was already made."""

    path: Path
    size: int
    delivered: bool


class Maildir:
    """One Maildir (``tmp/``, ``new/``, ``cur/``); ``deliver`` is atomic and durable."""

    def __init__(self, path: Path, *, name_source: Callable[[], str] | None = None) -> None:
        self.path = Path(path)
        self._names = name_source or MaildirNames()
        try:
            created = not (self.path / "new").is_dir()
            for sub in ("tmp", "new", "cur"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            if created:  # the new directories' names must survive a crash too, before a message is in them
                _fsync_dir(self.path)
                _fsync_dir(self.path.parent)
        except OSError as exc:
            raise SpoolError(f"cannot create Maildir {self.path}: {exc.strerror or exc}") from exc
        self._tmp, self._new = f"{self.path}/tmp/", f"{self.path}/new/"  # strings: cheaper than Paths per message

    def deliver(self, message: bytes) -> str:
        """Store ``message``; returns its file name in ``new/``. Raises SpoolError, leaving nothing behind."""
        outcome = self.deliver_many([message])[0]
        if isinstance(outcome, SpoolError):
            raise outcome
        return outcome

    def deliver_many(self, messages: Sequence[bytes]) -> list[str | SpoolError]:
        """Store several messages with one fsync of ``new/`` for all of them (group commit).

        Every message is written to ``tmp/`` first, then the files are fsynced all at once (one thread each:
        the file system commits concurrent fsyncs together, where one after the other each waits for a commit
        of its own), each is linked into ``new/``, and ``new/`` is fsynced once: only then is any of them durable
        (its name returned). A message that fails gets its SpoolError and
        leaves nothing behind; when the directory fsync fails, every message of the batch does.
        """
        outcomes: list[str | SpoolError] = []
        written: list[tuple[int, str, int]] = []  # (index, name, open descriptor)
        linked: list[str] = []
        try:
            for message in messages:
                try:
                    name, fd = self._write_one(message)
                except SpoolError as exc:
                    outcomes.append(exc)
                else:
                    written.append((len(outcomes), name, fd))
                    outcomes.append(name)
            synced = _fsync_all([fd for _index, _name, fd in written])
            for (index, name, _fd), problem in zip(written, synced, strict=True):
                try:
                    if problem is not None:
                        raise problem
                    os.link(self._tmp + name, self._new + name)  # never replaces a message
                except OSError as exc:
                    outcomes[index] = SpoolError(f"cannot spool to {self.path}: {exc.strerror or exc}")
                else:
                    linked.append(name)
            if linked:
                try:
                    _fsync_dir(self._new)
                except OSError as exc:
                    for name in linked:
                        _remove(self._new + name)
                    failure = SpoolError(f"cannot spool to {self.path}: {exc.strerror or exc}")
                    outcomes = [failure if isinstance(item, str) else item for item in outcomes]
        finally:
            for _index, name, fd in written:  # the tmp/ names go once new/ holds the messages (or they failed)
                os.close(fd)
                _remove(self._tmp + name)
        return outcomes

    def _write_one(self, message: bytes) -> tuple[str, int]:
        """Write one message to a fresh ``tmp/`` file under a unique name; its descriptor stays open."""
        for _ in range(MAX_ATTEMPTS):
            name = self._names()
            if "/" in name or name.startswith(".") or not name:
                raise SpoolError(f"unusable Maildir file name {name!r}")
            tmp = self._tmp + name
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SpoolError(f"cannot spool to {self.path}: {exc.strerror or exc}") from exc
            try:
                view = memoryview(message)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException as exc:
                os.close(fd)
                _remove(tmp)
                if isinstance(exc, OSError):
                    raise SpoolError(f"cannot spool to {self.path}: {exc.strerror or exc}") from exc
                raise
            if os.path.lexists(self._new + name):  # taken in new/ (a name source that repeats): another name
                os.close(fd)
                _remove(tmp)
                continue
            return name, fd
        raise SpoolError(f"no unique file name in {self.path} after {MAX_ATTEMPTS} attempts")

    def messages(self) -> list[Path]:
        """The delivered messages in ``new/``, oldest name first."""
        return sorted((self.path / "new").iterdir())

    def check_writable(self) -> None:
        """Prove a file can be created in ``tmp/`` now, rather than answering 451 to every message later."""
        try:
            probe_dir(self.path / "tmp")
        except OSError as exc:
            raise SpoolError(f"cannot write in {self.path / 'tmp'}: {exc.strerror or exc}") from exc

    def recover(self) -> list[Leftover]:
        """Remove what a crash left in ``tmp/`` (call before serving). Nothing there was ever acknowledged.

        A delivery writes, fsyncs and links its ``tmp/`` file into ``new/`` before the 250, so a ``tmp/`` file
        is either an incomplete message whose client got no 250 (it retries), or (``delivered``) one whose link
        in ``new/`` was made and only the ``tmp/`` name was left. Either way the ``tmp/`` name goes.
        """
        leftovers = []
        try:
            for path in sorted((self.path / "tmp").iterdir()):
                facts = path.lstat()
                path.unlink()
                leftovers.append(Leftover(path, facts.st_size, facts.st_nlink > 1))
            if leftovers:
                _fsync_dir(self.path / "tmp")
        except OSError as exc:
            raise SpoolError(f"cannot clean {self.path / 'tmp'}: {exc.strerror or exc}") from exc
        return leftovers


class Spool:
    """One Maildir per listener under ``root``."""

    def __init__(self, root: Path, *, name_source: Callable[[], str] | None = None) -> None:
        self.root = Path(root)
        self._names = name_source or MaildirNames()
        self._dirs: dict[str, Maildir] = {}

    def for_listener(self, name: str) -> Maildir:
        if not name or name in {".", ".."} or "/" in name or "\0" in name:
            raise BadInput(f"listener name {name!r} cannot name a spool directory", field="name")
        if name not in self._dirs:
            self._dirs[name] = Maildir(self.root / name, name_source=self._names)
        return self._dirs[name]


#: What a committer reports for one message: its name in ``new/``, or why it could not be stored.
Outcome = str | SpoolError


def probe_dir(path: Path) -> None:
    """Create ``path`` (and parents) and prove a file can be created and removed in it; OSError if not."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".smtplab-probe-{os.getpid()}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    probe.unlink()


_fsyncs: ThreadPoolExecutor | None = None
_fsyncs_lock = threading.Lock()


def _fsync_all(fds: list[int]) -> list[OSError | None]:
    """fsync every descriptor, concurrently when there are several; each one's error, or None."""
    global _fsyncs
    if len(fds) <= 1:
        return [_fsync_one(fd) for fd in fds]
    with _fsyncs_lock:
        if _fsyncs is None:
            _fsyncs = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
    return list(_fsyncs.map(_fsync_one, fds))


def _fsync_one(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(value: str) -> str:
    """Header-safe text: a client's HELO name must not smuggle CRLF or spaces into our header."""
    return _UNSAFE.sub("?", value)


def _date(when: dt.datetime | float) -> str:
    if isinstance(when, dt.datetime):
        moment = when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
        return email.utils.format_datetime(moment.replace(microsecond=0))
    return _date_of_second(int(when))


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    """The date of a second (RFC 5322 3.3), made once for every message received in it."""
    return email.utils.format_datetime(dt.datetime.fromtimestamp(second, dt.UTC))


def _fold(clauses: list[list[str]]) -> str:
    """Each clause starts a line; a clause longer than FOLD_AT wraps between its tokens (CRLF + TAB)."""
    lines: list[str] = []
    for clause in clauses:
        line = "" if lines else "Received:"
        for token in clause:
            candidate = f"{line} {token}" if line else f"\t{token}"
            if line and line != "Received:" and len(candidate.expandtabs(8)) > FOLD_AT:
                lines.append(line)
                line = f"\t{token}"
            else:
                line = candidate
        lines.append(line)
    return "".join(f"{line}\r\n" for line in lines)


def received_header(
    *,
    from_host: str | None,
    from_addr: str,
    helo: str,
    by_host: str,
    tls: TLSInfo | None,
    mid: int,
    recipient: str | None,
    when: dt.datetime | float,
    esmtp: bool = True,
) -> bytes:
    """An RFC 5321 4.4 trace header recording whether TLS was used, its version and cipher.

    ``from_host`` is the verified reverse-DNS name (None/"" if none), ``from_addr`` the peer IP, ``helo`` what the
    client said; ``recipient`` is named only when the message has exactly one. ``esmtp=False`` for a HELO session.
    """
    addr = _clean(from_addr)
    helo_name = _clean(helo) if helo else f"[{addr}]"
    tcp_info = f"({_clean(from_host)} [{addr}])" if from_host else f"([{addr}])"
    protocol = ("ESMTP" if esmtp else "SMTP") + ("S" if tls is not None else "")
    tls_note = f"(version={_clean(tls.version)} cipher={_clean(tls.cipher)})" if tls is not None else "(no TLS)"
    clauses = [
        ["from", helo_name, tcp_info],
        ["by", _clean(by_host), "with", protocol, tls_note, "id", str(int(mid))],
    ]
    tail = [f"{_date(when)}"]
    if recipient:
        clauses.append(["for", f"<{_clean(recipient.strip().strip('<>'))}>;", *tail[0].split(" ")])
    else:
        clauses[-1][-1] += ";"
        clauses.append(tail[0].split(" "))
    return _fold(clauses).encode("ascii")
