"""Real peer MTAs (Postfix, aiosmtpd) started on loopback addresses for interop tests, and stopped by PID.

Each peer is a separate process tree with its own temporary configuration under a work directory, bound to one
127.x.y.z address and a free high port. Nothing here looks processes up by name: a peer remembers the PID it
started (and, for Postfix, the master's children) and ends exactly those.

A test helper, not part of the installed ``lab`` package (docs/architecture.md, "Package boundaries"): the
tests import it as ``peers`` from ``tests/``, the benchmarks put ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import ipaddress
import mailbox
import os
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from lab.errors import BadInput, HarnessError
from lab.names import check_loopback
from lab.smtp.core.errors import ReplyError
from lab.smtp.core.readers import ReplyReader

START_TIMEOUT = 20.0  # seconds a peer may take to answer with 220
STOP_TIMEOUT = 10.0  # seconds a peer may take to exit after being told to
POLL = 0.05  # seconds between readiness / exit probes
MAX_PROBES = 2000  # hard bound on any probe loop, whatever the clock does

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def unavailable_reason(kind: str) -> str | None:
    """Why peer ``kind`` (``postfix`` or ``aiosmtpd``) cannot run here, or ``None`` when it can."""
    from peers import aiosmtpd_peer, postfix  # the peer modules import this package

    return {"postfix": postfix.unavailable_reason, "aiosmtpd": aiosmtpd_peer.unavailable_reason}[kind]()


def require_kind(kind: str) -> None:
    """``require_peer`` for one of the peers this package starts."""
    reason = unavailable_reason(kind)
    require_peer(kind, reason is None, reason or "")


def require_peer(name: str, available: bool, why: str = "") -> None:
    """Skip a test whose peer is missing, but fail it when ``CI=true``: CI installs every peer, so absence is a bug."""
    if available:
        return
    import pytest  # only tests call this; the lab itself never needs pytest

    message = f"peer {name} is not available" + (f": {why}" if why else "")
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"{message} (CI=true, so a missing peer is a failure)", pytrace=False)
    pytest.skip(message)


def free_port(address: str) -> int:
    """A TCP port that is free on ``address`` right now (bind port 0, read it, close)."""
    check_loopback(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class LoopbackAddresses:
    """Hands out distinct 127.x.y.z addresses in order, so every simulated peer has its own.

    Skips the network and broadcast addresses and 127.0.0.1, which the rest of the machine uses.
    """

    def __init__(self, network: str = "127.25.0.0/16") -> None:
        net = ipaddress.ip_network(network)
        if net.version != 4 or not net.subnet_of(LOOPBACK):  # type: ignore[arg-type]
            raise BadInput(f"{network} is not inside 127.0.0.0/8", field="network")
        self._hosts = (str(ip) for ip in net.hosts() if str(ip) != "127.0.0.1")
        self._lock = threading.Lock()
        self._network = network

    def take(self) -> str:
        with self._lock:
            try:
                return next(self._hosts)
            except StopIteration:
                raise HarnessError(f"no addresses left in {self._network}") from None


_DEFAULT_POOL = LoopbackAddresses()


def next_address() -> str:
    """The next unused address from the process-wide pool (127.25.0.0/16)."""
    return _DEFAULT_POOL.take()


def make_peer_workdir(prefix: str = "smtplab-peers-", base: str | Path | None = None) -> Path:
    """A fresh directory that Postfix's unprivileged users can traverse.

    pytest's ``tmp_path`` lives under a 0700 directory, which the postfix and nobody users cannot enter;
    peer state must sit below a path where every ancestor is searchable by others.
    """
    root = Path(base or tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    path.chmod(0o755)
    check_searchable(path)
    return path


def check_searchable(path: Path) -> None:
    """Raise HarnessError when an unprivileged daemon could not reach ``path`` (some ancestor lacks o+x)."""
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise HarnessError(
                f"{part} is not searchable by other users (mode {stat.filemode(mode)}), so Postfix's daemons cannot "
                f"reach {path}; put peer work directories under peers.make_peer_workdir()"
            )


def wait_for_banner(address: str, port: int, *, timeout: float, alive: Callable[[], bool]) -> str:
    """Connect until the peer greets with 220 and return the greeting; bounded in time and in attempts.

    ``alive`` says whether the peer process still runs, so a crash is reported at once instead of after the timeout.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    for attempt in range(MAX_PROBES):
        if not alive():
            raise HarnessError(f"peer on {address}:{port} exited before it answered")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # Short probes at first, so a dead peer (or someone else squatting on the port) is noticed quickly.
        probe = min(remaining, 0.5 * (attempt + 1))
        try:
            with socket.create_connection((address, port), timeout=probe) as sock:
                banner = read_reply(sock, time.monotonic() + probe)
                if not banner.startswith("220"):
                    raise HarnessError(f"peer on {address}:{port} greeted with {banner!r}, not 220")
                _polite_quit(sock)
                return banner
        except (OSError, EOFError) as exc:  # not listening yet, or closed on us while starting
            last = exc
        time.sleep(POLL)
    raise HarnessError(f"peer on {address}:{port} did not answer with 220 within {timeout:g} s (last: {last})")


def read_reply(sock: socket.socket, deadline: float) -> str:
    """One complete SMTP reply (all continuation lines), as text without the final CRLF."""
    reader = ReplyReader()
    for _ in range(MAX_PROBES):
        try:
            reply = reader.next_reply()
        except ReplyError as exc:
            raise OSError(str(exc)) from exc
        if reply is not None:
            return reply.text
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OSError("timed out waiting for a reply")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("connection closed before a complete reply")
        reader.feed(chunk)
    raise OSError("reply too long")


def _polite_quit(sock: socket.socket) -> None:
    """End a readiness probe with QUIT so the peer logs a clean disconnect, not a lost connection."""
    try:
        sock.sendall(b"QUIT\r\n")
        read_reply(sock, time.monotonic() + 2.0)
    except (OSError, EOFError):
        pass


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, ...; None when the PID is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has exited; only its exit status is left)."""
    if not Path("/proc/self/stat").exists():  # no procfs: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def child_pids(parent: int) -> list[int]:
    """PIDs whose parent is ``parent`` (read from /proc), e.g. the daemons a Postfix master has spawned."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[1]) == parent:
            out.append(int(entry.name))
    return sorted(out)


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait (bounded) until none of ``pids`` runs; return those still running."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    for _ in range(MAX_PROBES):
        pending = [pid for pid in pending if pid_running(pid)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(POLL)
    return pending


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process we started, wait, SIGKILL if it lingers; always reaps it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def read_maildir(path: Path) -> list[bytes]:
    """Every message in the Maildir at ``path``, oldest first (Maildir keys start with the delivery time)."""
    if not (path / "new").is_dir():
        return []
    box = mailbox.Maildir(path, create=False)
    return [box.get_bytes(key) for key in sorted(box.keys())]


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` so that it never exists with looser permissions than ``mode`` (private keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    path.chmod(mode)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages; empty when the file does not exist."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Peer(ABC):
    """What both peers share: a process we started, an address and port, a Maildir, start/stop by PID."""

    kind = "peer"

    def __init__(self, workdir: Path, address: str, port: int | None, start_timeout: float) -> None:
        self.workdir = Path(workdir).absolute()
        self.address = check_loopback(address)
        if port is not None and not 1024 <= port <= 65535:
            raise BadInput(f"port {port} is not a high port (1024-65535)", field="port")
        self.port = port if port is not None else free_port(self.address)
        self.start_timeout = start_timeout
        self.banner = ""
        self.last_pid: int | None = None  # the PID of the latest start, kept after stop() so tests can check it
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def maildir(self) -> Path:
        return self.workdir / "Maildir"

    @property
    def pid(self) -> int | None:
        """The PID of the running peer's main process, None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def pids(self) -> list[int]:
        """Every process of this peer that runs now (the main process first)."""
        return [] if self.pid is None else [self.pid]

    def messages(self) -> list[bytes]:
        """Messages delivered to this peer so far, as stored on disk."""
        return read_maildir(self.maildir)

    def wait_for_message(self, needle: bytes, timeout: float = 10.0) -> bytes | None:
        """The first stored message containing ``needle``, waiting (bounded) because delivery may be asynchronous."""
        deadline = time.monotonic() + timeout
        for _ in range(MAX_PROBES):
            found = next((m for m in self.messages() if needle in m), None)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(POLL)
        return None

    def _spawn(self, argv: Sequence[str], log: Path, env: dict[str, str]) -> None:
        """Start the main process in its own session, so its process group is ours to end and nobody else's."""
        self._out = log.open("ab")
        self._proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, env=env,
            cwd=self.workdir, start_new_session=True,
        )  # fmt: skip
        self.last_pid = self._proc.pid

    def _await_banner(self, logs: Sequence[Path]) -> None:
        proc = self._proc
        assert proc is not None
        try:
            self.banner = wait_for_banner(
                self.address, self.port, timeout=self.start_timeout, alive=lambda: proc.poll() is None
            )
        except HarnessError as exc:
            self.stop()
            details = "\n".join(f"--- {log}\n{tail(log)}" for log in logs if log.exists())
            raise HarnessError(f"{self.kind} on {self.address}:{self.port}: {exc}\n{details}") from None

    def _reap(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        self._proc = None
        if self._out is not None:
            self._out.close()
            self._out = None

    @abstractmethod
    def start(self) -> None:
        """Write the peer's configuration, start its process and wait for the 220; a no-op while running."""

    @abstractmethod
    def stop(self) -> None:
        """End every process this peer started, by PID; a no-op when stopped."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}:{self.port} pid={self.pid}>"


def start_all(peers: Sequence[Peer]) -> None:
    """Start several peers at once (each start waits for its own 220); if one fails, stop them all."""
    with ThreadPoolExecutor(max_workers=max(1, len(peers))) as pool:
        results = [pool.submit(peer.start) for peer in peers]
    errors = [r.exception() for r in results if r.exception() is not None]
    if errors:
        stop_all(peers)
        raise HarnessError("; ".join(str(e) for e in errors))


def stop_all(peers: Sequence[Peer]) -> None:
    """Stop several peers at once (Postfix takes about a second each)."""
    with ThreadPoolExecutor(max_workers=max(1, len(peers))) as pool:
        results = [pool.submit(peer.stop) for peer in peers]
    errors = [r.exception() for r in results if r.exception() is not None]
    if errors:
        raise HarnessError("; ".join(str(e) for e in errors))
