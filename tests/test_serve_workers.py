"""``smtplab serve --workers N``: several processes on one address, one spool, one log, stopped together.

Against real ``smtplab serve --workers 2`` processes on their own 127.x address, under 50 concurrent clients
whose messages each carry a unique ``X-Load-Id``: what the clients were told is compared with what is on disk.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import children, free_port, fresh_loopback, load_ids, mail_load, serve

from lab.appliance.config import quick_appliance
from lab.appliance.maillog import parse_line
from lab.commands.serve import _pieces, _share, _share_limits
from lab.policy.modes import TLSMode


def maildir_pids(paths: list[Path]) -> set[int]:
    """The PIDs in Maildir names ``<seconds>.M<micro>P<pid>Q<seq>.<host>``: which process stored each message."""
    return {int(path.name.split("P", 1)[1].split("Q", 1)[0]) for path in paths}


def running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child nobody reaps still has a /proc entry)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.05)
    return {pid for pid in pids if running(pid)}


def refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return True
    return False


def check_log(lines: list[str]) -> list[dict[str, object]]:
    """Every line is whole and in the grammar; ICIDs and MIDs are unique across the workers."""
    records = [parse_line(line) for line in lines]
    icids = [r["icid"] for r in records if r["event"] == "new_connection"]
    mids = [r["mid"] for r in records if r["event"] == "mid_start"]
    assert len(icids) == len(set(icids)) and len(mids) == len(set(mids))
    assert {icid % 2 for icid in icids} == {0, 1}  # worker 1 counts 1, 3, 5 ...; worker 2 counts 2, 4, 6 ...
    return records


def test_two_workers_share_the_load_and_sigterm_stops_both_with_every_250_stored(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no", "--workers", "2") as server:
        workers = children(server.process.pid)
        assert len(workers) == 2
        result = asyncio.run(
            mail_load(
                server.host,
                server.port,
                clients=50,
                trigger_after=150,
                trigger=lambda: server.process.send_signal(signal.SIGTERM),
            )
        )
        assert server.process.wait(timeout=30) == 0
        out = server.process.stdout.read() if server.process.stdout else ""
    assert "2 worker processes" in out and out.rstrip().endswith("smtplab serve: stopped")
    assert wait_gone(workers) == set()
    stored_files = server.maildir_new()
    assert load_ids(stored_files) == result.acked  # nothing acknowledged is missing, nothing stored lacks its 250
    assert result.unanswered == set() and result.cut == 0  # open sessions were told 421, none just dropped
    assert maildir_pids(stored_files) == workers  # both workers stored messages, in the one spool
    records = check_log(server.log_lines())
    spooled = [r for r in records if r["event"] == "mid_spooled"]
    assert len(spooled) == len(stored_files)


def test_kill_9_of_the_parent_stops_every_worker_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no", "--workers", "2") as server:
        workers = children(server.process.pid)
        result = asyncio.run(
            mail_load(server.host, server.port, clients=50, trigger_after=150, trigger=server.process.kill)
        )
        assert server.process.wait(timeout=30) == -signal.SIGKILL
        assert wait_gone(workers) == set()  # PR_SET_PDEATHSIG: no orphan keeps listening
        assert refuses(server.host, server.port)
    assert result.acked <= load_ids(server.maildir_new()) and len(result.acked) >= 150
    check_log(server.log_lines())


def test_a_worker_killed_is_reported_and_the_parent_stops_the_other_and_exits_2(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no", "--workers", "2") as server:
        victim, other = sorted(children(server.process.pid))
        result = asyncio.run(
            mail_load(
                server.host,
                server.port,
                clients=20,
                trigger_after=60,
                trigger=lambda: subprocess.run(["kill", "-9", str(victim)], check=True),
            )
        )
        assert server.process.wait(timeout=30) == 2
        err = server.process.stderr.read() if server.process.stderr else ""
        assert f"(pid {victim}) was killed by signal 9 unasked; stopping the others" in err
        assert "Traceback" not in err
        assert wait_gone({other}) == set()
    assert result.acked <= load_ids(server.maildir_new())


@pytest.mark.parametrize("value", ["0", "many", "65"])
def test_a_bad_worker_count_is_one_line_and_exit_3(value: str) -> None:
    host = fresh_loopback()
    command = [sys.executable, "-m", "lab", "serve", "--listen", f"{host}:{free_port(host)}", "--workers", value]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stderr.count("\n") == 1 and "--workers" in done.stderr


def test_the_limits_are_divided_among_the_workers() -> None:
    assert [_share(1000, index, 3) for index in range(3)] == [334, 333, 333]
    assert [_share(1, index, 2) for index in range(2)] == [1, 1]  # never 0: each worker admits one
    appliance = quick_appliance("127.0.0.1", 25, TLSMode.NO)
    listener = appliance.listeners[0]
    shared = [_share_limits(appliance, index, 2).listeners[0] for index in range(2)]
    assert sum(item.max_concurrency for item in shared) == listener.max_concurrency
    for name, policy in listener.policies.items():
        if policy.params.max_concurrency_per_ip is not None:
            parts = [item.policies[name].params.max_concurrency_per_ip or 0 for item in shared]
            limit = policy.params.max_concurrency_per_ip
            assert sum(parts) == max(limit, 2)  # a limit below the worker count: one per worker


def test_shared_log_pieces_end_at_line_ends_and_fit_a_pipe_write() -> None:
    data = b"".join(f"line {n} ".encode() + b"x" * (n % 50) + b"\n" for n in range(500))
    pieces = _pieces(data, 4096)
    assert b"".join(pieces) == data and all(len(p) <= 4096 and p.endswith(b"\n") for p in pieces)
    long_line = b"y" * 5000 + b"\n"
    assert _pieces(b"a\n" + long_line + b"b\n", 4096) == [b"a\n", long_line, b"b\n"]
    assert _pieces(data, 0) == [data]
