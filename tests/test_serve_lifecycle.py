"""Issue 7 hardening: ``smtplab serve`` starts only on usable directories, recovers its spool after a crash,
and stops cleanly: the 250 for every spool write in flight, ``421 4.3.2`` for every other open session, exit 0.

The session and listener parts run without I/O or on the memory network (virtual time); the rest against a
real ``smtplab serve`` process on its own 127.x address, under a load of 50 concurrent clients whose messages
each carry a unique ``X-Load-Id``, so what the clients were told is compared with what is on disk.
"""

from __future__ import annotations

import asyncio
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from labruntime import lab_runtime
from serving import client_context, free_port, fresh_loopback, load_ids, mail_load, serve
from twisted.internet.protocol import ClientFactory, Protocol

from lab.appliance.config import quick_appliance
from lab.appliance.maillog import MailLog, parse_line
from lab.net.memory import MemoryNetwork
from lab.policy.modes import Behaviour, TLSMode
from lab.policy.params import EffectiveParams
from lab.smtp.core.events import LogEvent
from lab.smtp.faults import FaultPolicy
from lab.smtp.session import Action, Close, Deliver, Send, ServerSession, SessionConfig

SHUTTING_DOWN = b"421 4.3.2 esa.lab.example Service shutting down\r\n"
HALF_WRITTEN = b"Subject: half\r\n\r\nhalf a mess"
ENVELOPE = b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"


# --- the session: what it answers when the server stops ----------------------------------------------


class Hooks:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def new_mid(self) -> int:
        return 1

    def log_event(self, event: LogEvent) -> None:
        self.events.append((event.kind, event.fields()))


def new_session() -> tuple[ServerSession, Hooks]:
    hooks = Hooks()
    config = SessionConfig(
        hostname="esa.lab.example", behaviour=Behaviour.ACCEPT, params=EffectiveParams(tls=TLSMode.PREFERRED)
    )
    session = ServerSession(config, hooks)
    session.start()
    return session, hooks


def test_an_idle_session_gets_421_and_is_closed() -> None:
    session, _ = new_session()
    session.receive(b"EHLO c.example\r\n")
    assert session.shutdown() == [Send(SHUTTING_DOWN), Close()]
    assert session.closed and session.shutdown() == [] and session.receive(b"NOOP\r\n") == []


def test_a_message_being_spooled_gets_its_250_before_the_421() -> None:
    session, _ = new_session()
    actions = session.receive(ENVELOPE + b"hello\r\n.\r\nNOOP\r\n")
    assert isinstance(actions[-1], Deliver)
    assert session.shutdown() == []  # the spool write is in flight: no 421 yet
    after: list[Action] = session.delivered(None)
    assert after[0] == Send(b"250 2.0.0 Ok: queued as 1\r\n") and after[1] == Send(b"250 2.0.0 OK\r\n")
    assert session.shutdown() == [Send(SHUTTING_DOWN), Close()]


def test_a_message_half_received_is_refused_and_logged() -> None:
    session, hooks = new_session()
    session.receive(ENVELOPE + b"first line of the body\r\n")
    assert session.shutdown() == [Send(SHUTTING_DOWN), Close()]
    assert ("message_refused", {"mid": 1, "reason": "server shutting down"}) in hooks.events
    session.connection_lost()
    assert [name for name, _ in hooks.events].count("message_refused") == 1


def test_a_tls_handshake_in_progress_is_aborted() -> None:
    session, _ = new_session()
    session.receive(b"EHLO c.example\r\nSTARTTLS\r\n")
    assert session.tls_pending
    assert session.shutdown() == [Close(abort=True)]


# --- the listener on the memory network: every session ends, stragglers within the grace period ------------


class Talker(Protocol):
    def __init__(self, send: bytes) -> None:
        self.send, self.data, self.closed = send, b"", False

    def connectionMade(self) -> None:
        self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed = True


#: A session greeted as ``stuck`` ignores the stop: the grace period must still end its connection.
STUCK = FaultPolicy(ignore_shutdown_from=frozenset({"stuck"}))


def test_listener_shutdown_ends_every_session_within_the_grace_period(tmp_path: Path) -> None:
    net = MemoryNetwork()
    appliance = quick_appliance("192.168.2.1", 25, TLSMode.PREFERRED)
    log = MailLog(None, clock=net.clock.seconds)
    runtime = lab_runtime(appliance, net.clock, tmp_path, maillog=log, faults=STUCK)
    factory = runtime.factory(appliance.listeners[0])
    port = net.listen("192.168.2.1", 25, factory)
    clients = {
        "idle": Talker(b"EHLO idle.example\r\n"),
        "mid-data": Talker(ENVELOPE + b"partial body\r\n"),
        "handshake": Talker(b"EHLO tls.example\r\nSTARTTLS\r\n"),
        "stuck": Talker(b"EHLO stuck\r\n"),
    }
    for client in clients.values():
        client_factory = ClientFactory()
        client_factory.buildProtocol = lambda _addr, c=client: c  # type: ignore[method-assign]
        net.connect("198.51.100.7", "192.168.2.1", 25, client_factory)
    net.clock.pump([0.01] * 20)
    assert len(factory.live) == 4 and not any(c.closed for c in clients.values())

    port.stopListening()
    stopped = factory.shutdown(grace=5.0)
    net.clock.pump([0.01] * 20)
    assert clients["idle"].data.endswith(b"250 HELP\r\n" + SHUTTING_DOWN) and clients["idle"].closed
    assert clients["mid-data"].data.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n" + SHUTTING_DOWN)
    assert clients["handshake"].data.endswith(b"220 2.0.0 Ready to start TLS\r\n")  # aborted, nothing after
    assert clients["handshake"].closed and clients["mid-data"].closed
    assert not clients["stuck"].closed and not stopped.called  # still inside the grace period

    net.clock.advance(5.0)
    net.clock.pump([0.01] * 20)
    assert clients["stuck"].closed and not clients["stuck"].data.endswith(SHUTTING_DOWN)
    assert stopped.called and factory.live == set()
    assert any("message refused: MID 1: server shutting down" in line for line in log.lines)
    assert net.clock.getDelayedCalls() == []  # the grace timer is gone once all are closed


# --- a real smtplab serve: bad directories, SIGTERM and kill -9 under load -----------------------------


def serve_command(host: str, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "lab", "serve", "--listen", f"{host}:{port}", "--tls", "no", *flags]


@pytest.mark.parametrize(
    ("flag", "bad", "expected"),
    [
        ("--spool", "/etc/hostname/x", "smtplab: --spool /etc/hostname/x: cannot create Maildir "),
        ("--state", "/etc/hostname/x", "smtplab: --state /etc/hostname/x: cannot create or write: Not a directory"),
        ("--log", "/etc/hostname/x", "smtplab: --log /etc/hostname/x: cannot open for appending: /etc/hostname: "),
        ("--log", "DIR", "cannot open for appending: Is a directory"),
    ],
)
def test_unusable_directories_are_refused_at_start(tmp_path: Path, flag: str, bad: str, expected: str) -> None:
    flags = {"--spool": str(tmp_path / "spool"), "--state": str(tmp_path / "state"), "--log": str(tmp_path / "log")}
    flags[flag] = str(tmp_path) if bad == "DIR" else bad
    host = fresh_loopback()
    command = serve_command(host, free_port(host), *(item for pair in flags.items() for item in pair))
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and expected in done.stderr and "Traceback" not in done.stderr
    assert "Listening" not in done.stdout


def test_sigterm_says_421_in_plaintext_and_inside_tls_and_exits_0(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "preferred") as server:
        inside = smtplib.SMTP(server.host, server.port, local_hostname="c.example", timeout=10)
        inside.starttls(context=client_context())
        assert inside.ehlo()[0] == 250
        plain = smtplib.SMTP(server.host, server.port, local_hostname="c.example", timeout=10)
        assert plain.ehlo()[0] == 250
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        for client in (inside, plain):
            assert client.getreply() == (421, b"4.3.2 esa.lab.example Service shutting down")
            client.close()
    closes = [line for line in server.log_lines() if parse_line(line)["event"] == "close"]
    assert len(closes) == 3 and all(line.endswith("close by listener") for line in closes[1:])  # 1: the probe


def test_sigterm_under_load_acknowledges_exactly_what_is_stored(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no") as server:
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
    assert result.triggered_at is not None and out.rstrip().endswith("smtplab serve: stopped")
    stored = load_ids(server.maildir_new())
    assert stored == result.acked  # nothing acknowledged is missing, nothing stored lacks its 250
    assert result.unanswered == set()  # every message whose data was sent got a final reply
    assert result.sessions == result.completed + result.shutting_down + result.cut
    assert result.shutting_down >= 1 and result.cut == 0  # open sessions were told 421, none just dropped
    assert list((server.spool / "Inboundmail" / "tmp").iterdir()) == []
    assert any(line.endswith("close by listener") for line in server.log_lines())


def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no") as server:
        result = asyncio.run(
            mail_load(server.host, server.port, clients=50, trigger_after=150, trigger=server.process.kill)
        )
        assert server.process.wait(timeout=30) == -signal.SIGKILL
    maildir = server.spool / "Inboundmail"
    planted = maildir / "tmp" / "1.M000000P1Q1.crashed"  # as a crash in mid-write leaves it
    planted.write_bytes(HALF_WRITTEN)
    left = sorted(path.name for path in (maildir / "tmp").iterdir())
    before = len(server.log_lines())

    with serve(tmp_path, "--tls", "no", host=server.host, port=server.port) as again:
        assert list((maildir / "tmp").iterdir()) == []
        recovered = [parse_line(line) for line in again.log_lines()[before:] if "Spool recovery" in line]
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(timeout=30) == 0
    assert sorted(Path(fields["path"]).name for fields in recovered) == left
    mine = next(fields for fields in recovered if fields["path"] == str(planted))
    assert (mine["nbytes"], mine["state"], mine["level"]) == (len(HALF_WRITTEN), "incomplete", "Warning")
    stored = load_ids(sorted((maildir / "new").iterdir()))
    assert result.acked <= stored  # every 250 is on disk; stored - acked were never acknowledged (retried)
    assert len(result.acked) >= 150
