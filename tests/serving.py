"""Start ``smtplab serve`` as a real process on its own 127.x address, for tests with real clients."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab.peers import free_port, require_peer

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
