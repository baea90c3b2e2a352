"""Stopping and crashing ``smtplab serve`` under load: what the clients were told against what is on disk.

    python3 benchmarks/bench_crash.py [--rounds 3] [--clients 50] [--after 300] [--sessions 3000]

1. SIGTERM under ``--clients`` concurrent clients (each message carries a unique ``X-Load-Id``), sent once
   ``--after`` messages are acknowledged: exit code, how long the stop took, sessions told ``421 4.3.2``,
   250s, files in new/, and the two differences that must be empty (acknowledged but not stored, stored but
   never acknowledged).
2. kill -9 under the same load, then a restart on the same spool: 250s against stored messages (acknowledged
   and lost must be 0; stored without a 250 are the retries a client will duplicate), the ``tmp/`` leftovers
   the restart logged and removed.
3. Memory: the server's RSS after ``--sessions`` sessions and after three times as many (the mail log writes
   through; its in-memory tail is bounded), with the mail log's size.

Every server runs in its own process on its own 127.x address and is stopped by PID; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the load generator the lifecycle tests use
from serving import Served, load_ids, mail_load, serve  # noqa: E402

from lab.appliance.maillog import parse_line  # noqa: E402

DEADLINE = 120.0  # no load runs longer than this (seconds of wall time)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sigterm_round(workdir: Path, clients: int, after: int) -> str:
    with serve(workdir, "--tls", "no") as server:
        sent: list[float] = []

        def stop() -> None:
            sent.append(time.monotonic())
            server.process.send_signal(signal.SIGTERM)

        result = asyncio.run(
            mail_load(server.host, server.port, clients=clients, trigger_after=after, trigger=stop, deadline=DEADLINE)
        )
        code = server.process.wait(timeout=60)
        took = time.monotonic() - sent[0] if sent else float("nan")
    stored = load_ids(server.maildir_new())
    return (
        f"exit {code}, stop {took:.2f} s (to the end of the load), sessions {result.sessions}: "
        f"{result.completed} completed, {result.shutting_down} got 421 4.3.2, {result.cut} cut without 421; "
        f"250s {len(result.acked)} ({len(result.acked) - (result.triggered_at or 0)} after SIGTERM), "
        f"refused {len(result.refused)}, unanswered {len(result.unanswered)}; files in new/ {len(stored)}; "
        f"250 not stored {len(result.acked - stored)}, stored without 250 {len(stored - result.acked)}"
    )


def kill_round(workdir: Path, clients: int, after: int) -> str:
    with serve(workdir, "--tls", "no") as server:
        result = asyncio.run(
            mail_load(
                server.host,
                server.port,
                clients=clients,
                trigger_after=after,
                trigger=server.process.kill,
                deadline=DEADLINE,
            )
        )
        code = server.process.wait(timeout=60)
    tmp = server.spool / "Inboundmail" / "tmp"
    left = len(list(tmp.iterdir()))
    before = len(server.log_lines())
    started = time.monotonic()
    with serve(workdir, "--tls", "no", host=server.host, port=server.port) as again:
        restart = time.monotonic() - started
        recovered = [parse_line(line) for line in again.log_lines()[before:] if "Spool recovery" in line]
        still = len(list(tmp.iterdir()))
    stored = load_ids(again.maildir_new())
    delivered = sum(1 for fields in recovered if fields["state"] == "delivered")
    return (
        f"exit {code}; 250s {len(result.acked)}, stored {len(stored)}: 250 not stored {len(result.acked - stored)}, "
        f"stored without 250 {len(stored - result.acked)}; data sent, no reply {len(result.unanswered)}; "
        f"tmp/ leftovers {left}: logged {len(recovered)} ({delivered} delivered, "
        f"{len(recovered) - delivered} incomplete), left after restart {still}; restart {restart:.2f} s"
    )


def memory(workdir: Path, clients: int, sessions: int) -> str:
    def load(server: Served, total: int) -> None:
        asyncio.run(mail_load(server.host, server.port, clients=clients, per_session=1, total=total, deadline=DEADLINE))

    with serve(workdir, "--tls", "no") as server:
        pid = server.process.pid
        figures = [f"start {rss_kib(pid)} KiB"]
        done = 0
        for target in (sessions, 3 * sessions):
            load(server, target - done)
            done = target
            log_kib = server.logfile.stat().st_size // 1024
            figures.append(f"after ~{target} sessions {rss_kib(pid)} KiB (mail log {log_kib} KiB)")
    return "RSS " + ", ".join(figures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--after", type=int, default=300, help="250s before the signal")
    parser.add_argument("--sessions", type=int, default=3000, help="sessions before the first RSS reading")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    try:
        for n in range(args.rounds):
            print(f"SIGTERM {n + 1}: {sigterm_round(scratch / f'term{n}', args.clients, args.after)}", flush=True)
        for n in range(args.rounds):
            print(f"kill -9 {n + 1}: {kill_round(scratch / f'kill{n}', args.clients, args.after)}", flush=True)
        print(f"memory: {memory(scratch / 'memory', args.clients, args.sessions)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
