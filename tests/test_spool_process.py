"""The spool writer process (issue 14): what ``SpoolProcess`` answers is what ``lab.appliance.spool_writer`` put
on disk, when the writer works, is killed, is signalled or is stopped, and inside a real ``smtplab serve``.

Everything runs against the real writer process: ``SpoolProcess`` on the real reactor (pytest-twisted), the
writer's command line with ``subprocess``, and ``smtplab serve`` under the load of ``tests/serving.py``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from serving import children, load_ids, mail_load, serve
from twisted.internet import defer, reactor

from lab.appliance.spool import Maildir, Outcome, SpoolError
from lab.appliance.spool_process import SpoolProcess
from lab.appliance.spool_writer import read_answers, request_frame

SERVER_PID = 4242  # the PID a SpoolProcess is told to name files with: not the writer's, not ours
NAMED = re.compile(rf"^\d+\.M\d{{6}}P{SERVER_PID}Q\d+\.")
WAIT = 60.0  # seconds: an upper bound only, never a measure
WRITER = "lab.appliance.spool_writer"
SPOOL_ERROR = re.compile(r"message refused: MID \d+: spool error: ")  # the mail log's line for a 451 to DATA


def message(number: int, size: int = 200) -> bytes:
    """A distinct message with bytes a text-mode store would mangle (CR, LF, NUL, high bytes)."""
    head = f"Subject: spool {number}\r\nX-Number: {number}\r\n\r\n".encode()
    return head + bytes(range(256)) * (size // 256) + b"\x00\r\n.\r\n" + str(number).encode()


@pytest.fixture
def writer() -> Iterator[SpoolProcess]:
    spool = SpoolProcess(reactor, pid=SERVER_PID)
    yield spool
    spool.stop()


@dataclass
class Submitted:
    """Messages submitted in one reactor turn: a Deferred per message, fired by its ``done``."""

    waits: list[defer.Deferred[Outcome]] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)  # the message of each ``done`` call, in order


def submit_all(spool: SpoolProcess, maildir: Maildir, messages: list[bytes]) -> Submitted:
    submitted = Submitted()

    def done(index: int, outcome: Outcome) -> None:
        submitted.calls.append(index)
        if not submitted.waits[index].called:
            submitted.waits[index].callback(outcome)

    for index, item in enumerate(messages):
        submitted.waits.append(defer.Deferred())
        spool.submit(maildir, item, functools.partial(done, index))
    return submitted


async def outcomes(submitted: Submitted) -> list[Outcome]:
    """Every ``done`` outcome, in submission order, once each has come (each ``done`` ran exactly once)."""
    every = defer.gatherResults(submitted.waits, consumeErrors=True)
    every.addTimeout(WAIT, reactor)
    found = list(await every)
    assert sorted(submitted.calls) == list(range(len(submitted.waits)))
    return found


def files(maildir: Maildir, sub: str = "new") -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (maildir.path / sub).iterdir()}


def running(pid: int) -> bool:
    """Our child ``pid`` is still running (False once it has exited and been reaped)."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # no such child: it exited and was reaped
        return False


# --- SpoolProcess on the real reactor -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_messages_land_in_new_with_their_bytes_and_names_carry_the_given_pid(
    tmp_path: Path, writer: SpoolProcess
) -> None:
    inbound, other = Maildir(tmp_path / "inbound"), Maildir(tmp_path / "other")
    sent = {inbound: [message(n) for n in range(3)], other: [message(10)]}
    waits = {box: submit_all(writer, box, items) for box, items in sent.items()}
    for box, items in sent.items():
        names = await outcomes(waits[box])
        assert all(isinstance(name, str) and NAMED.match(name) for name in names), names
        assert files(box) == dict(zip(names, items, strict=True))  # exactly these, each with its own bytes
        assert files(box, "tmp") == {}
    assert writer.pid is not None and writer.pid != os.getpid()


@pytest_twisted.ensureDeferred
async def test_two_hundred_messages_at_once_are_all_stored_and_all_answered(
    tmp_path: Path, writer: SpoolProcess
) -> None:
    box = Maildir(tmp_path / "box")
    sent = [message(n, size=4096) for n in range(200)]
    names = await outcomes(submit_all(writer, box, sent))
    assert len(set(names)) == 200 and all(isinstance(name, str) and NAMED.match(name) for name in names)
    assert files(box) == dict(zip(names, sent, strict=True))
    assert files(box, "tmp") == {}


@pytest_twisted.ensureDeferred
async def test_a_killed_writer_fails_every_waiting_message_and_the_next_submit_starts_another(
    tmp_path: Path, writer: SpoolProcess
) -> None:
    box = Maildir(tmp_path / "box")
    await outcomes(submit_all(writer, box, [message(0)]))  # the writer is up and serving
    killed = writer.pid
    assert killed is not None
    # 25 MB: far more than a socket buffer holds, so most of it is still on our side when the writer dies
    sent = [message(n, size=128 * 1024) for n in range(1, 201)]
    waits = submit_all(writer, box, sent)
    os.kill(killed, signal.SIGKILL)
    answers = await outcomes(waits)
    failed = [item for item in answers if isinstance(item, SpoolError)]
    stored = {name: sent[index] for index, name in enumerate(answers) if isinstance(name, str)}
    assert failed, "the writer cannot have stored 25 MB it was never sent"
    assert all("spool writer" in str(item) for item in failed)
    on_disk = files(box)
    assert {name: on_disk.get(name) for name in stored} == stored  # no name for a file that is not in new/

    again = await outcomes(submit_all(writer, box, [message(999)]))
    assert writer.pid not in (None, killed) and not running(killed)  # a new writer; the dead one reaped
    assert isinstance(again[0], str) and NAMED.match(again[0])
    assert files(box)[again[0]] == message(999)


@pytest_twisted.ensureDeferred
async def test_the_writer_ignores_sigterm_and_sigint(tmp_path: Path, writer: SpoolProcess) -> None:
    box = Maildir(tmp_path / "box")
    await outcomes(submit_all(writer, box, [message(0)]))  # past its start: its signal dispositions are set
    pid = writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    names = await outcomes(submit_all(writer, box, [message(1), message(2)]))  # it ran after the signals
    assert writer.pid == pid and running(pid)
    assert [files(box).get(str(name)) for name in names] == [message(1), message(2)]


def test_stop_stores_what_was_just_submitted_and_the_writer_exits(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box")
    spool = SpoolProcess(reactor, pid=SERVER_PID)
    pid = spool.pid
    assert pid is not None
    # 6 MB in this turn: most of it is still ours when stop() runs; it must hand all of it over
    sent = [message(n, size=64 * 1024) for n in range(100)]
    submit_all(spool, box, sent)
    spool.stop()
    assert spool.pid is None and not running(pid)  # exited and reaped before stop() returned
    assert sorted(files(box).values()) == sorted(sent)
    assert all(NAMED.match(name) for name in files(box)) and files(box, "tmp") == {}


def test_stop_answers_each_message_with_what_became_of_it(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box")
    spool = SpoolProcess(reactor, pid=SERVER_PID)
    sent = [message(n) for n in range(20)]
    answers: list[Outcome] = []
    for item in sent:
        spool.submit(box, item, answers.append)
    spool.stop()
    assert len(answers) == 20 and sorted(files(box).values()) == sorted(sent)
    assert all(isinstance(item, str) for item in answers), answers[:1]  # they are all in new/


# --- the writer on a plain socket: its frames and its end ---------------------------------------------------


def start_writer() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """``python -m lab.appliance.spool_writer FD PID`` on one end of a socketpair, as SpoolProcess starts it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-m", WRITER, str(theirs.fileno()), str(SERVER_PID)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    ours.settimeout(WAIT)  # an upper bound for every recv below
    return ours, process


def send_requests(sock: socket.socket, box: Maildir, messages: list[bytes]) -> None:
    path = os.fsencode(str(box.path))
    sock.sendall(b"".join(request_frame(number, path, item) for number, item in enumerate(messages, 1)))


def test_the_writer_stores_and_answers_all_it_was_sent_before_its_socket_ends_then_exits_0(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box")
    sock, process = start_writer()
    sent = [message(n, size=8192) for n in range(1, 51)]
    with sock:
        send_requests(sock, box, sent)
        sock.shutdown(socket.SHUT_WR)  # the end of its requests: it stores what it holds, answers, exits
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    answers, rest = read_answers(received)
    assert process.communicate(timeout=WAIT) == (None, b"") and process.returncode == 0
    assert rest == b"" and sorted(number for number, _ in answers) == list(range(1, 51))  # each answered once
    names = dict(answers)
    assert all(isinstance(names[n], str) for n in names)
    assert files(box) == {str(names[number]): item for number, item in enumerate(sent, 1)}
    assert all(NAMED.match(name) for name in files(box)) and files(box, "tmp") == {}


def test_the_writer_closed_with_answers_unread_still_stores_all_and_exits_0_quietly(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box")
    sock, process = start_writer()
    sent = [message(1), message(2)]
    with sock:
        send_requests(sock, box, sent)
        deadline = time.monotonic() + WAIT
        while len(read_answers(sock.recv(1 << 16, socket.MSG_PEEK))[0]) < 2:  # MSG_PEEK: left unread
            assert time.monotonic() < deadline, "the writer did not answer both messages"
    assert sorted(files(box).values()) == sorted(sent)  # answered, so stored
    _, errors = process.communicate(timeout=WAIT)
    assert (process.returncode, errors) == (0, b"")


# --- the writer's command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["3"],
        ["3", "1", "extra"],
        ["three", "1"],
        ["-3", "1"],
        ["3", "1.5"],
        ["99", "1"],  # not an open descriptor
        ["0", "1"],  # not a socket
        ["\N{SUPERSCRIPT TWO}", "1"],  # a digit to str.isdigit, not a number to int()
    ],
    ids=lambda args: " ".join(args) or "none",
)
def test_the_writer_with_wrong_arguments_says_one_line_and_exits_2(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", WRITER, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "lab.appliance.spool_writer" in done.stderr  # the usage, or which argument is wrong


# --- inside smtplab serve -------------------------------------------------------------------------------------


def is_writer(pid: int) -> bool:
    """``pid`` is a live spool writer (a zombie has no command line, another program another one)."""
    try:
        return WRITER in (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    except (FileNotFoundError, ProcessLookupError):
        return False


def writer_of(server_pid: int) -> int:
    """The one live spool writer among ``server_pid``'s children (waits for a restarted one, bounded)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        writers = [pid for pid in children(server_pid) if is_writer(pid)]
        if writers:
            assert len(writers) == 1, writers
            return writers[0]
        time.sleep(0.05)
    raise AssertionError(f"no spool writer among the children of {server_pid}")


def test_serve_survives_its_writer_killed_under_load_and_acknowledges_only_what_is_stored(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no") as server:
        first = writer_of(server.process.pid)
        result = asyncio.run(
            mail_load(
                server.host,
                server.port,
                clients=30,
                trigger_after=100,
                trigger=lambda: os.kill(first, signal.SIGKILL),
                total=300,
                deadline=40,
            )
        )
        assert result.triggered_at is not None and len(result.acked) > result.triggered_at  # 250s after the kill
        with smtplib.SMTP(server.host, server.port, local_hostname="late.example", timeout=30) as late:
            refused = late.sendmail("a@late.example", ["bob@example.com"], b"Subject: late\r\nX-Load-Id: late\r\n\r\nx")
            assert refused == {}  # every recipient taken, and a 250 to DATA (smtplib raises otherwise)
        second = writer_of(server.process.pid)
        assert second != first and not is_writer(first)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=WAIT) == 0
        errors = server.process.stderr.read() if server.process.stderr else ""
    assert "Traceback" not in errors, errors
    assert not is_writer(second) and not Path(f"/proc/{second}").exists()  # ended with the server, reaped
    stored = load_ids(server.maildir_new())
    assert result.acked | {"late"} <= stored  # every 250 is on disk
    assert result.unanswered == set() and result.cut == 0  # every message had its answer; no session dropped
    spool_errors = [line for line in server.log_lines() if SPOOL_ERROR.search(line)]
    assert len(spool_errors) == len(result.refused)  # each refusal is a spool error (a 451 4.3.0) ...
    assert all("spool writer" in line for line in spool_errors)  # ... because the writer died


def test_a_server_killed_outright_takes_its_writer_with_it(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no") as server:
        with smtplib.SMTP(server.host, server.port, timeout=WAIT) as client:  # one message: the writer is busy once
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: one\r\n\r\nbody\r\n")
        writer = writer_of(server.process.pid)
        server.process.kill()
        assert server.process.wait(timeout=WAIT) == -signal.SIGKILL
    deadline = time.monotonic() + WAIT
    while is_writer(writer) and time.monotonic() < deadline:  # PR_SET_PDEATHSIG: killed with its parent
        time.sleep(0.05)
    assert not is_writer(writer)
    assert len(list((server.spool / "Inboundmail" / "new").iterdir())) == 1  # what had its 250 is on disk


def test_the_writer_dies_with_its_parent_even_while_its_socket_is_still_open(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG, not the socket's end: we keep our end open, so only the parent's death can stop it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent_code = (
        "import os, subprocess, sys; fd = int(sys.argv[1]); "
        f"writer = subprocess.Popen([sys.executable, '-m', '{WRITER}', str(fd), '{SERVER_PID}', str(os.getpid())], "
        "pass_fds=(fd,)); print(writer.pid, flush=True); sys.stdin.read()"
    )
    with ours, theirs:
        parent = subprocess.Popen(
            [sys.executable, "-c", parent_code, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert parent.stdout is not None
        writer = int(parent.stdout.readline())
        box = Maildir(tmp_path / "box")
        ours.sendall(request_frame(1, os.fsencode(str(box.path)), message(1)))
        ours.settimeout(WAIT)
        assert read_answers(ours.recv(1 << 16))[0][0][0] == 1  # the writer runs, and answers
        parent.kill()
        parent.wait(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while is_writer(writer) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_writer(writer)  # gone although our end of its socket is still open
