"""The server session as a hypothesis state machine: random commands, hostile bytes, random reads, TLS events.

Every TLS mode and policy behaviour, with and without client-certificate verification. The invariants are the
session's promises (docs/rules.md §2-§3): a message is delivered only after a 354, an accepted envelope and a proper
<CRLF>.<CRLF> (never at an SMTP smuggling variant), never in plaintext under Required; bytes behind STARTTLS get
no reply; the handshake forgets the greeting and the envelope; and how the stream is cut into reads changes
nothing, which the teardown checks by replaying the same events in one read per run and a byte per read.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_session import SMUGGLING_SEQUENCES

from lab.policy import replies
from lab.policy.modes import Behaviour, ClientCert, TLSMode
from lab.policy.params import EffectiveParams
from lab.smtp.core.events import LogEvent
from lab.smtp.session import Close, Deliver, Message, Send, ServerSession, SessionConfig, StartTLS

COMMANDS = [
    "EHLO client.example",
    "HELO client.example",
    "MAIL FROM:<a@b.example>",
    "MAIL FROM:<mallory@evil.example>",
    "RCPT TO:<c@example.com>",
    "RCPT TO:<x@elsewhere.example>",
    "DATA",
    "RSET",
    "NOOP",
    "QUIT",
    "STARTTLS",
    "STARTTLS now",
    "VRFY c",
    "XYZZY",
]
#: Pieces that make hostile streams likely: line ends of every kind, dots, NULs, the smuggling sequences.
FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\x00",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\r\n",
    b"text",
    b"MAIL FROM:<mallory@evil.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\nforged\r\n",
    *(f"{c}\r\n".encode() for c in COMMANDS),
]
#: The false ends of data of the SMTP smuggling research (CVE-2023-51764, -51765, -51766).
SMUGGLING_ENDS = SMUGGLING_SEQUENCES
SMUGGLED = b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\nforged\r\n.\r\n"
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"


@dataclass(frozen=True)
class FakeTLS:
    version: str = "TLSv1.3"
    cipher: str = "TLS_AES_256_GCM_SHA384"


class Hooks:
    def __init__(self) -> None:
        self.mids = 0

    def new_mid(self) -> int:
        self.mids += 1
        return self.mids

    def log_event(self, event: LogEvent) -> None:
        pass


def _new_session(mode: TLSMode, behaviour: Behaviour, verify_client: bool) -> ServerSession:
    config = SessionConfig(
        hostname="esa.lab.example",
        behaviour=behaviour,
        params=EffectiveParams(tls=mode, verify_client=verify_client),
        accepts_recipient=lambda address: address.endswith("@example.com"),
    )
    return ServerSession(config, Hooks())


def _final_codes(data: bytes) -> list[int]:
    return [int(line[:3]) for line in data.split(b"\r\n") if line[3:4] == b" "]


def _well_formed(data: bytes) -> bool:
    """Message text as the session may deliver it: CRLF-terminated lines, no bare CR or LF, no NUL."""
    if not data:
        return True
    return data.endswith(b"\r\n") and all(
        b"\r" not in line and b"\n" not in line and b"\x00" not in line for line in data[:-2].split(b"\r\n")
    )


def _unstuffed(wire: bytes) -> bytes:
    """The wire with each line's leading dot removed (RFC 5321 4.5.2), the end-of-data line ``.<CRLF>`` kept.

    A client may stuff a line that did not need it (``.text``), so the wire is unstuffed rather than the
    delivered text stuffed."""
    lines = wire.splitlines(keepends=True)
    return b"".join(line[1:] if line.startswith(b".") and line != b".\r\n" else line for line in lines)


Event = tuple[str, Any]
Trace = list[tuple[str, Any]]


class Driver:
    """Runs events on one session, carries out Deliver as a listener would, and records a split-free trace."""

    def __init__(self, mode: TLSMode, behaviour: Behaviour, verify_client: bool) -> None:
        self.session = _new_session(mode, behaviour, verify_client)
        self.trace: Trace = []
        self.delivered: list[Message] = []
        self.awaiting_data = False  # a 354 was the last reply
        self.inputs: list[bytearray] = [bytearray()]  # the bytes received, per TLS epoch
        self.apply(self.session.start())

    def apply(self, actions: list[Any]) -> list[Any]:
        s = self.session
        out: list[Any] = []
        for i, action in enumerate(actions):
            out.append(action)
            if isinstance(action, Send):
                codes = _final_codes(action.data)
                self.awaiting_data = codes[-1:] == [354]
                if self.trace and self.trace[-1][0] == "send":
                    self.trace[-1] = ("send", self.trace[-1][1] + action.data)
                else:
                    self.trace.append(("send", action.data))
                continue
            self.trace.append((type(action).__name__, getattr(action, "abort", None)))
            if isinstance(action, StartTLS):
                assert i == len(actions) - 1, "nothing may follow StartTLS in the same batch"
            if isinstance(action, Deliver):
                self.check_delivery(action.message)
                self.delivered.append(action.message)
                out.extend(self.apply(s.delivered(None)))
        return out

    def check_delivery(self, message: Message) -> None:
        s = self.session
        params = s.config.params
        assert self.awaiting_data, "Deliver without a 354 right before it"
        assert s.config.behaviour in (Behaviour.ACCEPT, Behaviour.RELAY)
        assert message.sender is not None and message.recipients, "Deliver without an accepted envelope"
        assert _well_formed(message.data), f"malformed message text delivered: {message.data!r}"
        assert b"\r\n" + message.data + b".\r\n" in _unstuffed(bytes(self.inputs[-1])), "no <CRLF>.<CRLF> for it"
        if params.tls is TLSMode.REQUIRED:
            assert message.tls is not None, "plaintext delivery under Required"
            if params.verify_client:
                assert s.client_cert is ClientCert.VERIFIED
        self.awaiting_data = False

    def receive(self, data: bytes) -> list[Any]:
        before_pending = self.session.tls_pending
        self.inputs[-1] += data
        actions = self.apply(self.session.receive(data))
        if before_pending:
            assert actions == [], "a reply to bytes received before the handshake completed"
        return actions

    def run(self, event: Event) -> list[Any]:
        kind, value = event
        s = self.session
        if kind == "data":
            return self.receive(value)
        if kind == "tls_started":
            self.inputs.append(bytearray())
            self.awaiting_data = False
            return self.apply(s.tls_started(FakeTLS(), ClientCert(value)))
        if kind == "tls_failed":
            return self.apply(s.tls_failed("handshake failure"))
        if kind == "timeout":
            return self.apply(s.deadline_expired("idle timeout", replies.TIMEOUT))
        raise AssertionError(kind)


def _runs(events: list[Event]) -> list[Event]:
    """Consecutive data events merged into one read."""
    merged: list[Event] = []
    for kind, value in events:
        if kind == "data" and merged and merged[-1][0] == "data":
            merged[-1] = ("data", merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return merged


def _bytewise(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for kind, value in events:
        out.extend([("data", bytes([b])) for b in value] if kind == "data" else [(kind, value)])
    return out


def _outcome(driver: Driver) -> tuple[Trace, list[tuple[Any, ...]]]:
    return driver.trace, [(m.sender, m.recipients, m.data, m.tls) for m in driver.delivered]


class SessionMachine(RuleBasedStateMachine):
    driver: Driver

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.setup: tuple[TLSMode, Behaviour, bool] = (TLSMode.NO, Behaviour.ACCEPT, False)

    @initialize(
        mode=st.sampled_from(list(TLSMode)),
        behaviour=st.sampled_from(
            [Behaviour.ACCEPT, Behaviour.ACCEPT, Behaviour.RELAY, Behaviour.REJECT, Behaviour.TCPREFUSE]
        ),
        verify_client=st.booleans(),
    )
    def start(self, mode: TLSMode, behaviour: Behaviour, verify_client: bool) -> None:
        self.setup = (mode, behaviour, verify_client)
        self.driver = Driver(*self.setup)

    def feed(self, data: bytes, cuts: list[int]) -> list[list[Any]]:
        """``data`` in several reads, cut where ``cuts`` say; the actions of each read."""
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        out = []
        for a, b in pairwise(points):
            self.events.append(("data", data[a:b]))
            out.append(self.driver.receive(data[a:b]))
        return out

    @rule(command=st.sampled_from(COMMANDS), cuts=st.lists(st.integers(0, 80), max_size=3))
    def command(self, command: str, cuts: list[int]) -> None:
        self.feed(f"{command}\r\n".encode(), cuts)

    @rule(
        pieces=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), min_size=1, max_size=8),
        cuts=st.lists(st.integers(0, 400), max_size=4),
    )
    def hostile_bytes(self, pieces: list[bytes], cuts: list[int]) -> None:
        self.feed(b"".join(pieces), cuts)

    @rule(
        body=st.lists(st.sampled_from(FRAGMENTS[:17]), max_size=6),
        end=st.sampled_from([b"\r\n.\r\n", *SMUGGLING_ENDS]),
        cuts=st.lists(st.integers(0, 400), max_size=4),
    )
    def transaction(self, body: list[bytes], end: bytes, cuts: list[int]) -> None:
        """A whole transaction in one go, ended properly, or by a false end with a forged transaction behind it.

        When the session starts it in command mode and answers its DATA with 354, the rest is message text up to
        the first <CRLF>.<CRLF>: exactly one more reply may come, and the forged sender is never delivered.
        """
        text = b"Subject: t\r\n\r\n" + b"".join(body) + end + (b"" if end == b"\r\n.\r\n" else SMUGGLED)
        first_end = (b"\r\n" + text).find(b"\r\n.\r\n") + len(b"\r\n.\r\n") - 2
        s = self.driver.session
        fresh = not (s.closed or s.tls_pending or s._data is not None or s._transaction is not None)
        delivered_before = len(self.driver.delivered)
        sends: list[bytes] = []
        for chunk in self.feed(ENVELOPE + text, cuts):
            sends.extend(a.data for a in chunk if isinstance(a, Send))
        codes = _final_codes(b"".join(sends))
        if fresh and codes[3:4] == [354] and first_end == len(text):
            assert len(codes) == 5, f"bytes behind the end of data were executed: {codes}"
        if fresh and codes[3:4] == [354]:
            smuggled = [m for m in self.driver.delivered[delivered_before:] if m.sender == "smuggled@evil.example"]
            assert not smuggled or first_end < len(text), "a smuggled transaction was delivered"

    @precondition(
        lambda self: hasattr(self, "driver") and self.driver.session.tls_pending and not self.driver.session.closed
    )
    @rule(cert=st.sampled_from(list(ClientCert)))
    def handshake_completes(self, cert: ClientCert) -> None:
        self.events.append(("tls_started", cert.value))
        self.driver.run(self.events[-1])
        s = self.driver.session
        assert s.greeting is None and s._transaction is None and s._data is None  # RFC 3207 4.2: forget it all
        mail = b"MAIL FROM:<a@b.example>\r\n"
        self.events.append(("data", mail))
        codes = _final_codes(b"".join(a.data for a in self.driver.receive(mail) if isinstance(a, Send)))
        assert codes in ([503], [554]), codes  # Send EHLO first (or lack of security): never 250

    @precondition(
        lambda self: hasattr(self, "driver") and self.driver.session.tls_pending and not self.driver.session.closed
    )
    @rule()
    def handshake_fails(self) -> None:
        self.events.append(("tls_failed", None))
        actions = self.driver.run(self.events[-1])
        assert actions == [Close(abort=True)]

    @precondition(lambda self: hasattr(self, "driver") and not self.driver.session.closed)
    @rule()
    def idle_timeout(self) -> None:
        self.events.append(("timeout", None))
        self.driver.run(self.events[-1])

    @invariant()
    def closed_sessions_say_nothing(self) -> None:
        if hasattr(self, "driver") and self.driver.session.closed:
            assert self.driver.session.receive(b"NOOP\r\n") == []

    def teardown(self) -> None:
        if not hasattr(self, "driver"):
            return
        expected = _outcome(self.driver)
        for events in (_runs(self.events), _bytewise(self.events)):
            replay = Driver(*self.setup)
            for event in events:
                replay.run(event)
            assert _outcome(replay) == expected, "the same input cut into other reads changed the outcome"


SessionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSessionMachine = SessionMachine.TestCase
