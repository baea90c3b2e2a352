"""Hostile clients against ``smtplab serve`` on loopback: how fast slots come back, how little memory they cost.

    python3 benchmarks/bench_hostile.py [--stalled 1000] [--short-deadline 5] [--flood-mb 50] [--sessions 5000]

1. ``--stalled`` clients that send STARTTLS, read the 220 and never start the handshake: how long until the
   server closed them all, with the default TLS handshake deadline and with ``--short-deadline``; whether a
   normal client is served afterwards.
2. One client that writes ``--flood-mb`` MB of pipelined EHLOs and never reads: how much it got the server to
   take, and the server's RSS growth.
3. RSS before and after ``--sessions`` ordinary plaintext sessions (50 at a time).

Prints figures; asserts nothing. Every server runs in its own process, stopped by PID; every phase is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the peers test-helper package
from bench_listener import one_session, read_reply, rss_mb
from peers import free_port, wait_for_banner

from lab.policy.deadlines import Timeouts

APPLIANCE = """\
hostname: esa.bench.example
interfaces: [{{name: Loopback, address: 127.0.0.1}}]
listeners:
  - name: Inboundmail
    type: public
    interface: Loopback
    rat: ALL
    max_concurrency: {limit}
    tcp_queue: 1024
    timeouts: {{tls_handshake: {handshake}}}
    hat:
      defaults: {{tls: preferred, max_concurrency_per_ip: {limit}, max_msgs_per_connection: 1000}}
"""
PHASE_LIMIT = 240.0  # seconds of wall time any phase may take


@contextlib.contextmanager
def serving(
    root: Path, name: str, host: str, handshake: float, limit: int
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``smtplab serve`` and its port on ``host``, in its own folder under ``root``; stopped by PID (SIGTERM, kill)."""
    workdir = root / name
    workdir.mkdir()
    port = free_port(host)
    process = subprocess.Popen(serve_command(workdir, host, port, handshake, limit), stdout=subprocess.DEVNULL)
    try:
        wait_for_banner(host, port, timeout=20.0, alive=lambda: process.poll() is None)
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def load(host: str, port: int, sessions: int, concurrency: int) -> tuple[float, int]:
    """``sessions`` plaintext sessions over ``concurrency`` closed-loop clients: (sessions/s, errors)."""
    remaining, errors, deadline = [sessions], [0], time.monotonic() + PHASE_LIMIT

    async def worker() -> None:
        while remaining[0] > 0 and time.monotonic() < deadline:
            remaining[0] -= 1
            try:
                await one_session(host, port, None)
            except Exception:
                errors[0] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (sessions - remaining[0] - errors[0]) / (time.perf_counter() - start), errors[0]


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def serve_command(workdir: Path, host: str, port: int, handshake: float, limit: int) -> list[str]:
    config = workdir / "appliance.yaml"
    config.write_text(APPLIANCE.format(limit=limit, handshake=handshake))
    return [
        sys.executable,
        "-m",
        "lab",
        "serve",
        "--config",
        str(config),
        "--bind",
        f"Inboundmail={host}:{port}",
        "--spool",
        str(workdir / "spool"),
        "--log",
        str(workdir / "mail.log"),
        "--state",
        str(workdir / "state"),
    ]


async def stalled_client(host: str, port: int, ready: list[float], closed: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await read_reply(reader)
        writer.write(b"EHLO stall.example\r\n")
        await read_reply(reader)
        writer.write(b"STARTTLS\r\n")
        await read_reply(reader)
        ready.append(time.monotonic())
        with contextlib.suppress(ConnectionError, TimeoutError):  # EOF or a reset: the server closed it
            await asyncio.wait_for(reader.read(), timeout=PHASE_LIMIT)
        closed.append(time.monotonic())
    finally:
        writer.close()


async def stalled_phase(host: str, port: int, count: int) -> tuple[int, float, float, bool]:
    ready: list[float] = []
    closed: list[float] = []
    results = await asyncio.gather(
        *(stalled_client(host, port, ready, closed) for _ in range(count)), return_exceptions=True
    )
    failed = sum(isinstance(r, BaseException) for r in results)
    if not ready:
        return failed, float("nan"), float("nan"), False
    served = True
    try:
        await asyncio.wait_for(one_session(host, port, None), timeout=30)
    except Exception:
        served = False
    return failed, max(closed) - min(ready), max(closed) - max(ready), served


def flood_unread(host: str, port: int, total: int) -> int:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setblocking(False)
    chunk = b"EHLO flood.example\r\n" * 4096
    sent, progress, start = 0, time.monotonic(), time.monotonic()
    try:
        while sent < total and time.monotonic() - progress < 3 and time.monotonic() - start < PHASE_LIMIT:
            try:
                sent += sock.send(chunk)
                progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(1)  # let the server process what it has read
    finally:
        sock.close()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stalled", type=int, default=1000)
    parser.add_argument("--short-deadline", type=float, default=5.0)
    parser.add_argument("--flood-mb", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=5000)
    args = parser.parse_args()
    nofile = raise_nofile(args.stalled * 2 + 256)
    print(f"RLIMIT_NOFILE {nofile}; machine: {len(__import__('os').sched_getaffinity(0))} cores")
    host = "127.0.9.1"
    limit = args.stalled + 50

    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        root = Path(tmp)
        for handshake in (Timeouts().tls_handshake, args.short_deadline):
            with serving(root, f"stalled-{handshake:g}", host, handshake, limit) as (server, port):
                before = rss_mb(server.pid)
                failed, all_closed, after_last, served = asyncio.run(stalled_phase(host, port, args.stalled))
                print(
                    f"stalled handshakes: {args.stalled} clients, tls_handshake {handshake:g} s: all closed "
                    f"{all_closed:.1f} s after the first 220 ({after_last:.1f} s after the last); "
                    f"{failed} could not start; normal client served afterwards: {served}; "
                    f"RSS {before:.1f} -> {rss_mb(server.pid):.1f} MB"
                )

        with serving(root, "flood", host, 60, limit) as (server, port):
            before = rss_mb(server.pid)
            sent = flood_unread(host, port, args.flood_mb * 1_000_000)
            print(
                f"unread pipeline: offered {args.flood_mb} MB of EHLOs, the server took {sent / 1e6:.1f} MB "
                f"(then stopped reading); RSS {before:.1f} -> {rss_mb(server.pid):.1f} MB"
            )

        with serving(root, "sessions", host, 60, limit) as (server, port):
            before = rss_mb(server.pid)
            start = time.monotonic()
            rate, errors = asyncio.run(load(host, port, args.sessions, 50))
            print(
                f"ordinary sessions: {args.sessions} plaintext sessions (50 concurrent) in "
                f"{time.monotonic() - start:.0f} s ({rate:.0f}/s, {errors} errors); "
                f"RSS {before:.1f} -> {rss_mb(server.pid):.1f} MB"
            )


if __name__ == "__main__":
    main()
