"""Start ``smtplab serve`` as a real process on its own 127.x address, for tests with real clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from peers import free_port, require_peer

_next_host = [10]


def fresh_loopback() -> str:
    """A distinct 127.0.x.y address per served listener, so tests never share a port space."""
    _next_host[0] += 1
    return f"127.0.{(os.getpid() % 200) + 20}.{_next_host[0]}"


@dataclass
class Served:
    host: str
    port: int
    workdir: Path
    process: subprocess.Popen[str]

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def logfile(self) -> Path:
        return self.workdir / "mail.log"

    def maildir_new(self, listener: str = "Inboundmail") -> list[Path]:
        new = self.spool / listener / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def log_lines(self) -> list[str]:
        return self.logfile.read_text().splitlines() if self.logfile.exists() else []

    def wait_log(self, needle: str, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.log_lines()
            if any(needle in line for line in lines):
                return lines
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in mail log:\n" + "\n".join(self.log_lines()))


def wait_port(host: str, port: int, process: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"smtplab serve exited {process.returncode}: {out}\n{err}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5) as probe:
            probe.recv(100)
            return
        time.sleep(0.05)
    raise AssertionError(f"smtplab serve did not answer on {host}:{port}")


@contextlib.contextmanager
def serve(workdir: Path, *args: str, host: str | None = None, port: int | None = None) -> Iterator[Served]:
    """``smtplab serve --listen HOST:PORT ARGS...`` (or ``--config`` when ARGS has it), stopped by PID."""
    host = host or fresh_loopback()
    port = port or free_port(host)
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lab", "serve"]
    if "--config" not in args:
        command += ["--listen", f"{host}:{port}"]
    command += [
        *args,
        "--spool",
        str(workdir / "spool"),
        "--log",
        str(workdir / "mail.log"),
        "--state",
        str(workdir / "state"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served = Served(host, port, workdir, process)
    try:
        wait_port(host, port, process)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def client_context() -> ssl.SSLContext:
    """A client that accepts the demo certificate (these tests are about the policy, not about trust)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def need_tool(name: str) -> str:
    """A real program (swaks, openssl, tshark): missing skips locally, fails in CI (where .ci/run installs it)."""
    path = shutil.which(name)
    require_peer(name, path is not None, "not installed (.ci/run installs it with apt-get)")
    assert path is not None
    return path


# --- mail under load, for the stop and crash tests (and benchmarks/bench_crash.py) --------------------------

LOAD_ID = re.compile(rb"^X-Load-Id: (\S+)\r?$", re.MULTILINE)
SHUTTING_DOWN = b"Service shutting down"


@dataclass
class LoadResult:
    """What the clients of ``mail_load`` saw, message by message (each body carries a unique ``X-Load-Id``)."""

    acked: set[str] = field(default_factory=set)  # the final reply to DATA was 250
    refused: set[str] = field(default_factory=set)  # the final reply to DATA was something else (421, 451 ...)
    unanswered: set[str] = field(default_factory=set)  # the data was sent; the connection ended before a reply
    sessions: int = 0  # sessions that got a 220 banner
    completed: int = 0  # sessions that ended with our QUIT
    shutting_down: int = 0  # sessions ended by the server's 421 4.3.2 ... Service shutting down
    cut: int = 0  # sessions that ended by EOF or reset without a 421
    not_served: int = 0  # connection attempts refused, or closed before a banner
    triggered_at: int | None = None  # len(acked) when ``trigger`` ran


class _SessionEnded(Exception):
    pass


async def mail_load(
    host: str,
    port: int,
    *,
    clients: int = 50,
    per_session: int = 3,
    trigger_after: int = 100,
    trigger: Callable[[], None] | None = None,
    total: int | None = None,
    deadline: float = 60.0,
) -> LoadResult:
    """``clients`` concurrent SMTP clients sending ``per_session`` messages per session, reconnecting until the
    server stops answering (or ``total`` messages are acknowledged); ``trigger`` runs once ``trigger_after`` are.
    Bounded by ``deadline`` seconds of wall time and by every client stopping at its first connection that is
    not served."""
    result = LoadResult()
    end = time.monotonic() + deadline

    def acked(load_id: str) -> None:
        result.acked.add(load_id)
        if trigger is not None and result.triggered_at is None and len(result.acked) >= trigger_after:
            result.triggered_at = len(result.acked)
            trigger()

    async def reply(reader: asyncio.StreamReader) -> bytes:
        lines = b""
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout=max(0.1, end - time.monotonic()))
            if not line.endswith(b"\n"):
                raise _SessionEnded
            lines += line
            if line[3:4] != b"-":
                if line.startswith(b"421") and SHUTTING_DOWN in line:
                    result.shutting_down += 1
                    raise _SessionEnded("421")
                return lines

    async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, code: bytes) -> None:
        writer.write(line + b"\r\n")
        answer = await reply(reader)
        if not answer.startswith(code):
            raise AssertionError(f"{line!r} got {answer!r}")

    async def session(number: int, sequence: list[int]) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=5)
        except (OSError, TimeoutError):
            result.not_served += 1
            return False
        in_flight: str | None = None
        try:
            try:
                if not (await reply(reader)).startswith(b"220"):
                    raise _SessionEnded
            except (_SessionEnded, ConnectionError, TimeoutError):
                result.not_served += 1
                return False
            result.sessions += 1
            await command(reader, writer, b"EHLO load.example", b"250")
            for _ in range(per_session):
                sequence[0] += 1
                load_id = f"c{number}-{sequence[0]}"
                await command(reader, writer, b"MAIL FROM:<load@client.example>", b"250")
                await command(reader, writer, b"RCPT TO:<bob@example.com>", b"250")
                await command(reader, writer, b"DATA", b"354")
                in_flight = load_id
                writer.write(f"Subject: load\r\nX-Load-Id: {load_id}\r\n\r\n".encode() + b"x" * 512 + b"\r\n.\r\n")
                try:
                    answer = await reply(reader)
                except _SessionEnded as ended:
                    if str(ended) == "421":
                        result.refused.add(load_id)
                        in_flight = None
                    raise
                in_flight = None
                if answer.startswith(b"250"):
                    acked(load_id)
                else:
                    result.refused.add(load_id)
            await command(reader, writer, b"QUIT", b"221")
            result.completed += 1
            return time.monotonic() < end and (total is None or len(result.acked) < total)
        except _SessionEnded as ended:
            if str(ended) != "421":
                result.cut += 1
            return False
        except (ConnectionError, TimeoutError):
            result.cut += 1
            return False
        finally:
            if in_flight is not None:
                result.unanswered.add(in_flight)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def client(number: int) -> None:
        sequence = [0]
        while await session(number, sequence):
            pass

    await asyncio.gather(*(client(n) for n in range(clients)))
    return result


def load_ids(paths: list[Path]) -> set[str]:
    """The ``X-Load-Id`` of each stored message."""
    found = set()
    for path in paths:
        match = LOAD_ID.search(path.read_bytes())
        if match:
            found.add(match.group(1).decode())
    return found


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc: a zombie too, until it is reaped)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


class Raw:
    """A line-level client on a real socket, for what smtplib will not send."""

    def __init__(self, host: str, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout=10)
        self.buffer = b""
        self.banner = self.reply()

    def reply(self) -> bytes:
        while True:
            lines = self.buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    out = b"\r\n".join(lines[: i + 1]) + b"\r\n"
                    self.buffer = b"\r\n".join(lines[i + 1 :])
                    return out
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buffer!r}")
            self.buffer += chunk

    def cmd(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.reply()

    def starttls(self) -> None:
        assert self.buffer == b""
        self.sock = client_context().wrap_socket(self.sock)

    def close(self) -> None:
        self.sock.close()
