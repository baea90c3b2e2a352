"""Listener throughput and memory, side by side with aiosmtpd, on loopback. Prints figures; asserts nothing.

    python3 benchmarks/bench_listener.py [--sessions 2000] [--concurrency 50] [--idle 1000]

1. STARTTLS sessions per second (connect, EHLO, STARTTLS, EHLO, MAIL, RCPT, DATA of 1 KiB, QUIT) with N
   concurrent clients against ``smtplab serve --tls required``, the same in plaintext against
   ``--tls no``, and the STARTTLS load against aiosmtpd with ``require_starttls=True``; the ratio.
2. ``--idle`` concurrent idle sessions held after EHLO: the listener's RSS, and what the one-too-many gets.

Every server runs in its own process on its own 127.x address and is stopped by PID; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the peers test-helper package
from peers import free_port, wait_for_banner

BODY = ("Subject: bench\r\n\r\n" + ("x" * 78 + "\r\n") * 13).encode()[:1024]
DEADLINE = 300.0  # no phase runs longer than this (seconds of wall time)


@contextlib.contextmanager
def started(command: list[str], host: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_banner(host, port, timeout=20.0, alive=lambda: process.poll() is None)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def smtplab_command(host: str, port: int, tls: str, workdir: Path, max_concurrency: int = 1000) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lab",
        "serve",
        "--listen",
        f"{host}:{port}",
        "--tls",
        tls,
        "--max-concurrency",
        str(max_concurrency),
        "--spool",
        str(workdir / "spool"),
        "--log",
        str(workdir / "mail.log"),
        "--state",
        str(workdir / "state"),
    ]


def aiosmtpd_command(host: str, port: int, workdir: Path) -> list[str]:
    from lab.tls.certs import LabCA

    certkey = LabCA(workdir / "state").issue("aiosmtpd", ["aiosmtpd.bench"])
    cert, key = workdir / "aiosmtpd.pem", workdir / "aiosmtpd.key"
    cert.write_bytes(certkey.cert_pem)
    key.write_bytes(certkey.key_pem)
    return [
        sys.executable,
        "-m",
        "peers.aiosmtpd_peer",
        "--host",
        host,
        "--port",
        str(port),
        "--mode",
        "require",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--maildir",
        str(workdir / "aiosmtpd-mail"),
    ]


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def one_session(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await read_reply(reader)
        writer.write(b"EHLO bench.example\r\n")
        await read_reply(reader)
        if tls is not None:
            writer.write(b"STARTTLS\r\n")
            if not (await read_reply(reader)).startswith(b"220"):
                raise RuntimeError("STARTTLS refused")
            await writer.start_tls(tls)
            writer.write(b"EHLO bench.example\r\n")
            await read_reply(reader)
        for line in (b"MAIL FROM:<a@bench.example>\r\n", b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n"):
            writer.write(line)
            reply = await read_reply(reader)
            if reply[:1] not in (b"2", b"3"):
                raise RuntimeError(reply.decode(errors="replace"))
        writer.write(BODY + b"\r\n.\r\n")
        if not (await read_reply(reader)).startswith(b"250"):
            raise RuntimeError("not queued")
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def load(host: str, port: int, sessions: int, concurrency: int, use_tls: bool) -> tuple[float, int]:
    context = None
    if use_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    remaining = [sessions]
    errors = [0]
    deadline = time.monotonic() + DEADLINE

    async def worker() -> None:
        while remaining[0] > 0 and time.monotonic() < deadline:
            remaining[0] -= 1
            try:
                await one_session(host, port, context)
            except Exception:
                errors[0] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return (sessions - remaining[0] - errors[0]) / elapsed, errors[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far: steadier than wall time on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def hold_idle(host: str, port: int, count: int) -> tuple[list[asyncio.StreamWriter], int]:
    writers: list[asyncio.StreamWriter] = []
    failed = 0
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection(host, port)
            await read_reply(reader)
            writer.write(b"EHLO idle.example\r\n")
            await read_reply(reader)
            writers.append(writer)
        except Exception:
            failed += 1
    return writers, failed


async def one_too_many(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    reply = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return reply.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]  # the child runs lab and tests/peers from this checkout
    os.environ.setdefault("PYTHONPATH", os.pathsep.join([str(repo), str(repo / "tests")]))
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        figures: dict[str, float] = {}
        for name, command_for, tls in [
            ("smtplab STARTTLS", lambda h, p: smtplab_command(h, p, "required", work / "a"), True),
            ("smtplab plaintext", lambda h, p: smtplab_command(h, p, "no", work / "b"), False),
            ("aiosmtpd STARTTLS (require_starttls)", lambda h, p: aiosmtpd_command(h, p, work), True),
        ]:
            host = f"127.0.77.{len(figures) + 1}"
            port = free_port(host)
            with started(command_for(host, port), host, port) as server:
                cpu_before = cpu_seconds(server.pid)
                rate, errors = asyncio.run(load(host, port, args.sessions, args.concurrency, tls))
                cpu_ms = (cpu_seconds(server.pid) - cpu_before) * 1000 / args.sessions
            figures[name] = rate
            figures[name + " cpu"] = cpu_ms
            print(
                f"{name:40s} {rate:8.1f} sessions/s {cpu_ms:6.2f} server CPU ms/session "
                f"({args.sessions} sessions, {args.concurrency} concurrent, {errors} errors)"
            )
        ratio = figures["smtplab STARTTLS"] / figures["aiosmtpd STARTTLS (require_starttls)"]
        cpu_ratio = figures["aiosmtpd STARTTLS (require_starttls) cpu"] / figures["smtplab STARTTLS cpu"]
        print(f"{'ratio smtplab / aiosmtpd (STARTTLS)':40s} {ratio:8.2f} by sessions/s, {cpu_ratio:.2f} by server CPU")

        host = "127.0.77.9"
        port = free_port(host)
        with started(
            smtplab_command(host, port, "preferred", work / "c", max_concurrency=args.idle), host, port
        ) as server:
            base = rss_mb(server.pid)

            async def idle_phase() -> tuple[int, int, bytes, float]:
                writers, failed = await hold_idle(host, port, args.idle)
                await asyncio.sleep(0.5)
                rss = rss_mb(server.pid)
                extra = await one_too_many(host, port)
                for writer in writers:
                    writer.close()
                return len(writers), failed, extra, rss

            held, failed, extra, rss = asyncio.run(idle_phase())
        print(f"{'idle sessions held after EHLO':40s} {held:8d}  ({failed} failed)")
        print(
            f"{'listener RSS with them (MB)':40s} {rss:8.1f}  (at start {base:.1f}, "
            f"{(rss - base) * 1024 / max(held, 1):.1f} KiB per session)"
        )
        print(f"{'session number ' + str(args.idle + 1) + ' got':40s} {extra.decode(errors='replace')}")


if __name__ == "__main__":
    main()
