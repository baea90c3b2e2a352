"""Every wait is bounded: the deadline arithmetic by tables, then the listener on the memory carrier (virtual time).

Postfix's smtpd_timeout / smtpd_per_record_deadline / smtpd_starttls_timeout are the model; see
docs/config-format.md, "Timeouts".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet import defer, protocol, task

from lab.appliance.config import quick_appliance
from lab.appliance.maillog import MailLog
from lab.appliance.spool import Spool
from lab.net.memory import MemoryNetwork
from lab.policy import deadlines
from lab.policy.deadlines import Phase, Timeouts, Watch
from lab.policy.modes import TLSMode
from lab.smtp.listener import ApplianceRuntime, ListenerFactory
from lab.tls.tlsctx import ClientTLS

SHORT = Timeouts(idle=30, command=5, tls_handshake=10, data=20, session=100, close_grace=3)
SLACK = 0.05  # the memory wire's latency, a few hops of it

# --- the arithmetic ----------------------------------------------------------------------------------------

T = Timeouts(idle=30, command=5, tls_handshake=10, data=20, session=100, close_grace=3)


@pytest.mark.parametrize(
    ("watch", "at", "what", "graceful"),
    [
        (Watch.start(T, 0), 5, deadlines.COMMAND, True),  # waiting for the first command: 5 s for the record
        (Watch(T, 0, Phase.COMMAND, 0, last_input=4, record_since=4), 9, deadlines.COMMAND, True),
        (Watch(Timeouts(idle=3, command=5), 0, Phase.COMMAND, 0, 0, 0), 3, deadlines.IDLE, True),
        (Watch(T, 0, Phase.HANDSHAKE, 50, last_input=50, record_since=50), 60, deadlines.HANDSHAKE, False),
        (Watch(Timeouts(idle=4), 0, Phase.HANDSHAKE, 50, 50, 50), 54, deadlines.IDLE, False),  # mid-handshake
        (Watch(T, 0, Phase.DATA, 10, last_input=29, record_since=29), 30, deadlines.DATA, True),
        (Watch(T, 0, Phase.DATA, 10, last_input=12, record_since=12), 17, deadlines.COMMAND, True),
        (Watch(T, 0, Phase.DELIVERY, 98, last_input=98, record_since=98), 100, deadlines.SESSION, True),
        (Watch(T, 0, Phase.COMMAND, 99, last_input=99, record_since=99), 100, deadlines.SESSION, True),
        (Watch(T, 0, Phase.CLOSING, 40, 40, 40), 43, deadlines.CLOSE, False),
    ],
)
def test_the_earliest_deadline_of_the_phase_applies(watch: Watch, at: float, what: str, graceful: bool) -> None:
    expiry = watch.expiry()
    assert (expiry.at, expiry.what, expiry.graceful) == (at, what, graceful)


def test_trickled_bytes_move_the_idle_deadline_but_not_the_record_deadline() -> None:
    watch = Watch.start(Timeouts(idle=2, command=5), 0)
    for second in (1, 2, 3, 4):
        watch = watch.received(second, completes_record=False)
    assert (watch.expiry().at, watch.expiry().what) == (5, deadlines.COMMAND)
    watch = watch.received(4.5, completes_record=True)  # the line is complete: the next record's wait begins
    assert (watch.expiry().at, watch.expiry().what) == (6.5, deadlines.IDLE)


def test_entering_a_phase_restarts_its_clock_once() -> None:
    watch = Watch.start(T, 0).enter(Phase.DATA, 7)
    assert watch.enter(Phase.DATA, 9) is watch  # staying in a phase changes nothing
    assert watch.phase_since == 7 and watch.expiry().at == 12  # record deadline: 7 + 5
    assert watch.due(11.9) is None and watch.due(12) is not None


def test_the_421_names_the_deadline() -> None:
    assert Watch.start(T, 0).expiry().reply.wire == b"421 4.4.2 Command deadline, closing connection\r\n"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1, 0, 1e300, 86400.5, True, "5"])
def test_timeouts_must_be_finite_positive_and_bounded(bad: object) -> None:
    problems = Timeouts(command=bad).problems()  # type: ignore[arg-type]
    assert [name for name, _ in problems] == ["command"]


def test_default_timeouts_are_usable_and_the_handshake_is_short() -> None:
    assert Timeouts().problems() == []
    assert Timeouts().tls_handshake <= 60


# --- the listener on the memory carrier --------------------------------------------------------------------


class Client(protocol.Protocol):
    """Collects what the server sends and when the connection ended; ``on_reply`` scripts the dialogue."""

    def __init__(self, on_reply: Callable[[Client, bytes], None] | None = None) -> None:
        self.on_reply = on_reply
        self.data = b""
        self.replies: list[bytes] = []
        self.buffer = b""
        self.closed_at: float | None = None
        self.done: defer.Deferred[Client] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] == b"-":
                continue
            self.replies.append(line)
            if self.on_reply is not None:
                self.on_reply(self, line)

    def connectionLost(self, reason: object = None) -> None:
        self.closed_at = self.transport_clock.seconds()
        self.done.callback(self)

    def send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")


class Lab:
    def __init__(self, tmp_path: Path, timeouts: Timeouts, max_concurrency: int = 1000) -> None:
        self.clock = task.Clock()
        self.net = MemoryNetwork(self.clock)
        appliance = quick_appliance("192.168.2.1", 25, TLSMode.PREFERRED)
        listener = dataclasses.replace(appliance.listeners[0], timeouts=timeouts, max_concurrency=max_concurrency)
        appliance = dataclasses.replace(appliance, listeners=(listener,))
        self.log = MailLog(None, clock=self.clock.seconds)
        self.runtime = ApplianceRuntime(
            appliance, clock=self.clock, maillog=self.log, spool=Spool(tmp_path / "spool"), state_dir=tmp_path / "st"
        )
        self.factory: ListenerFactory = self.runtime.factory(listener)
        self.net.listen("192.168.2.1", 25, self.factory)
        self.spool_new = tmp_path / "spool" / "Inboundmail" / "new"

    def connect(self, client: Client, source: str = "198.51.100.7") -> Client:
        client.transport_clock = self.clock  # type: ignore[attr-defined]
        self.net.connect(source, "192.168.2.1", 25, protocol.ClientFactory.forProtocol(lambda: client))
        return client

    def run(self, client: Client, timeout: float = 1000) -> Client:
        result: Client = self.net.run_until(client.done, timeout=timeout)
        return result

    def advance_to(self, when: float) -> None:
        """Run everything due up to virtual time ``when`` (calls scheduled meanwhile included)."""
        while True:
            due = [call.getTime() for call in self.clock.getDelayedCalls()]
            if not due or min(due) > when:
                self.clock.advance(max(0.0, when - self.clock.seconds()))
                return
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))

    def logged(self, needle: str) -> list[str]:
        return [line for line in self.log.lines if needle in line]


def _script(lines: list[bytes], after_last: Callable[[Client], None] | None = None) -> Callable[[Client, bytes], None]:
    """One line per reply; after the 220 to STARTTLS, ``after_last`` (or nothing: the client stalls)."""
    pending = list(lines)

    def on_reply(client: Client, reply: bytes) -> None:
        if pending:
            client.send(pending.pop(0))
        elif after_last is not None:
            callback = after_last
            client.on_reply = None
            callback(client)

    return on_reply


def _trickle(clock: task.Clock, client: Client, data: bytes, every: float = 1.0) -> None:
    """Send ``data`` one byte per ``every`` seconds (a slowloris), stopping when the connection is gone."""

    def step(rest: bytes) -> None:
        if client.closed_at is not None or not rest:
            return
        client.transport.write(rest[:1])
        clock.callLater(every, step, rest[1:])

    step(data)


def test_a_client_stalled_after_the_starttls_220_is_closed_at_the_handshake_deadline(tmp_path: Path) -> None:
    lab = Lab(tmp_path, SHORT, max_concurrency=1)
    stalled = lab.connect(Client(_script([b"EHLO stall.example", b"STARTTLS"])))
    lab.advance_to(1)
    assert stalled.replies[-1].startswith(b"220 2.0.0")
    started = lab.clock.seconds()

    # while it holds the only slot, a second client is turned away
    refused = lab.run(lab.connect(Client(), source="198.51.100.8"))
    assert refused.replies == [b"421 4.3.2 Too many concurrent connections, try again later"]

    lab.run(stalled)
    assert stalled.closed_at is not None
    handshake_started = started - 1  # the 220 went out within the first second
    assert handshake_started + SHORT.tls_handshake <= stalled.closed_at <= started + SHORT.tls_handshake + SLACK
    assert lab.logged("protocol error: TLS handshake deadline, connection aborted")
    assert (lab.factory.active, dict(lab.factory.per_ip)) == (0, {})

    # the slot is free again: a normal client is served
    normal = lab.run(lab.connect(Client(_script([b"EHLO ok.example", b"QUIT"])), source="198.51.100.8"))
    assert normal.replies[0].startswith(b"220 ") and normal.replies[-1].startswith(b"221")


def test_a_one_byte_per_second_trickler_is_closed_at_the_command_deadline(tmp_path: Path) -> None:
    lab = Lab(tmp_path, SHORT)
    line = b"EHLO " + b"x" * 60 + b"\r\n"  # would take 67 s at one byte per second
    client = lab.connect(Client(lambda c, _reply: _trickle(lab.clock, c, line)))
    lab.run(client)
    assert client.closed_at is not None and client.closed_at <= SHORT.command + SLACK
    assert client.data.endswith(b"421 4.4.2 Command deadline, closing connection\r\n")
    assert lab.logged("protocol error: command deadline")
    assert lab.logged("close by listener")
    assert lab.factory.active == 0


def test_a_trickler_inside_data_is_closed_at_the_data_bound(tmp_path: Path) -> None:
    lab = Lab(tmp_path, SHORT)
    setup = [b"EHLO slow.example", b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.com>", b"DATA"]
    # short lines, each complete within the command deadline: only the DATA bound stops it
    body = b"x\r\n" * 1000
    data_sent: list[float] = []

    def trickle(client: Client) -> None:
        data_sent.append(lab.clock.seconds())
        _trickle(lab.clock, client, body)

    client = lab.run(lab.connect(Client(_script(setup, after_last=trickle))))
    assert client.replies[-2].startswith(b"354")
    assert client.closed_at is not None
    assert data_sent[0] + SHORT.data - SLACK <= client.closed_at <= data_sent[0] + SHORT.data + SLACK
    assert client.data.endswith(b"421 4.4.2 DATA deadline, closing connection\r\n")
    assert lab.logged("connection lost before end of data")
    assert not lab.spool_new.exists() or not list(lab.spool_new.iterdir())


def test_idle_closes_in_plaintext(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Timeouts(idle=7, command=60))
    client = lab.run(lab.connect(Client(_script([b"EHLO quiet.example"]))))
    assert client.closed_at is not None and 7 <= client.closed_at <= 7 + SLACK
    assert client.data.endswith(b"421 4.4.2 Idle timeout, closing connection\r\n")
    assert lab.logged("protocol error: idle timeout")


def test_idle_closes_mid_handshake(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Timeouts(idle=7, command=60, tls_handshake=60))
    partial_client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20

    def stall_mid_handshake(client: Client) -> None:
        client.transport.write(partial_client_hello)

    client = lab.connect(Client(_script([b"EHLO half.example", b"STARTTLS"], after_last=stall_mid_handshake)))
    lab.run(client)
    assert client.replies[-1].startswith(b"220 2.0.0")  # no 421 in plaintext after the 220: the wire is TLS now
    assert client.closed_at is not None and client.closed_at <= 7 + 1 + SLACK
    assert lab.logged("protocol error: idle timeout, connection aborted")
    assert lab.logged("TLS failed")
    assert (lab.factory.active, dict(lab.factory.per_ip)) == (0, {})


def _tls_then(after: Callable[[Client], None]) -> Callable[[Client, bytes], None]:
    """EHLO, STARTTLS, the handshake, EHLO again inside TLS; then ``after``."""
    state = {"step": 0}

    def on_reply(client: Client, reply: bytes) -> None:
        state["step"] += 1
        if state["step"] == 1:
            client.send(b"EHLO tls.example")
        elif state["step"] == 2:
            client.send(b"STARTTLS")
        elif state["step"] == 3:
            assert reply.startswith(b"220 2.0.0")
            client.transport.startTLS(ClientTLS())
            client.send(b"EHLO tls.example")
        elif state["step"] == 4:
            after(client)

    return on_reply


def test_idle_closes_inside_tls(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Timeouts(idle=7, command=60))
    client = lab.run(lab.connect(Client(_tls_then(lambda _client: None))))
    assert client.replies[-1] == b"421 4.4.2 Idle timeout, closing connection"  # decrypted: sent inside TLS
    assert lab.logged("TLS success")
    assert client.closed_at is not None and client.closed_at <= 7 + 1 + SLACK


def test_a_graceful_close_the_peer_holds_open_is_aborted_after_the_grace(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Timeouts(idle=7, command=60, close_grace=3))
    # inside TLS the close waits for the peer's close_notify; this client stops reading, so it never comes
    client = lab.run(lab.connect(Client(_tls_then(lambda c: c.transport.pauseProducing()))))
    assert client.closed_at is not None and 7 + 3 <= client.closed_at <= 7 + 3 + 1 + SLACK
    assert lab.logged("protocol error: idle timeout")
    assert lab.logged("protocol error: close deadline, connection aborted")
    assert lab.factory.active == 0


def test_the_session_bound_holds_for_a_client_that_keeps_talking(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Timeouts(idle=30, command=5, session=40))

    def noop_every_3s(client: Client, reply: bytes) -> None:
        lab.clock.callLater(3, lambda: client.closed_at is None and client.send(b"NOOP"))

    client = lab.run(lab.connect(Client(noop_every_3s)))
    assert client.closed_at is not None and 40 <= client.closed_at <= 40 + SLACK
    assert client.data.endswith(b"421 4.4.2 Session deadline, closing connection\r\n")


def test_pipelined_commands_and_a_normal_session_meet_no_deadline(tmp_path: Path) -> None:
    lab = Lab(tmp_path, SHORT)
    lines = [b"EHLO ok.example", b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.com>", b"DATA"]
    after_354: list[Callable[[Client], None]] = [
        lambda c: c.transport.write(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n"),
    ]
    client = lab.run(lab.connect(Client(_script(lines, after_last=after_354[0]))))
    assert client.replies[-2].startswith(b"250 2.0.0 Ok: queued as")
    assert client.replies[-1].startswith(b"221")
    assert len(list(lab.spool_new.iterdir())) == 1
    assert not lab.logged("protocol error")


# --- the appliance file ------------------------------------------------------------------------------------

APPLIANCE = """\
hostname: esa.test.example
interfaces: [{name: PublicNet, address: 127.0.0.1}]
listeners:
  - name: Inboundmail
    type: public
    interface: PublicNet
    rat: ALL
%s
"""


def _appliance(tmp_path: Path, listener_lines: str) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(APPLIANCE % listener_lines)
    return path


def test_timeouts_load_with_defaults_for_what_is_left_out(tmp_path: Path) -> None:
    from lab.appliance.config import load_appliance

    path = _appliance(tmp_path, "    timeouts: {command: 20, tls_handshake: 5.5}\n    idle_timeout: 45")
    timeouts = load_appliance(path).listener("Inboundmail").timeouts
    assert timeouts == dataclasses.replace(Timeouts(), idle=45, command=20, tls_handshake=5.5)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("    timeouts: {tls_handshake: .nan}", "listeners[0].timeouts.tls_handshake"),
        ("    timeouts: {command: .inf}", "listeners[0].timeouts.command"),
        ("    timeouts: {data: -1}", "listeners[0].timeouts.data"),
        ("    timeouts: {session: 0}", "listeners[0].timeouts.session"),
        ("    timeouts: {idle: 1e300}", "listeners[0].timeouts.idle"),
        ("    timeouts: {idle: 1.0e300}", "listeners[0].timeouts.idle"),
        ("    idle_timeout: .nan", "listeners[0].idle_timeout"),
        ("    timeouts: {close_grace: true}", "listeners[0].timeouts.close_grace"),
        ("    timeouts: {handshake: 5}", "listeners[0].timeouts"),
        ("    idle_timeout: 5\n    timeouts: {idle: 5}", "listeners[0].idle_timeout"),
    ],
)
def test_unusable_timeouts_are_refused_at_their_line(tmp_path: Path, text: str, field: str) -> None:
    import subprocess
    import sys

    path = _appliance(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "lab", "serve", "--config", str(path), "--state", str(tmp_path / "st")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"smtplab: {path}:8: {field}: "), lines[0]  # line 8: the timeout's own line
