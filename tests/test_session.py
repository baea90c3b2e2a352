"""The sans-IO server session: every STARTTLS rule of docs/rules.md §3 and the policy limits, without any I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.policy import replies
from lab.policy.modes import Behaviour, ClientCert, TLSMode
from lab.policy.params import EffectiveParams
from lab.smtp.core.events import LogEvent
from lab.smtp.session import Close, Deliver, Message, Send, ServerSession, SessionConfig, StartTLS


@dataclass
class Recorder:
    """SessionHooks that keep what they were given."""

    delivered: list[Message] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_spool: bool = False
    mids: int = 0

    def new_mid(self) -> int:
        self.mids += 1
        return self.mids

    def log_event(self, event: LogEvent) -> None:
        self.events.append((event.kind, event.fields()))

    def names(self) -> list[str]:
        return [n for n, _ in self.events]


@dataclass(frozen=True)
class FakeTLS:
    version: str = "TLSv1.3"
    cipher: str = "TLS_AES_256_GCM_SHA384"


def session(
    mode: TLSMode = TLSMode.PREFERRED, behaviour: Behaviour = Behaviour.ACCEPT, **params: Any
) -> tuple[ServerSession, Recorder]:
    hooks = Recorder()
    config = SessionConfig(
        hostname="esa.lab.example",
        behaviour=behaviour,
        params=EffectiveParams(tls=mode, **params),
        accepts_recipient=lambda a: a.endswith("@example.com"),
    )
    s = ServerSession(config, hooks)
    s.start()
    return s, hooks


def feed(s: ServerSession, data: bytes) -> list[Any]:
    """``receive``, with every ``Deliver`` carried out as a listener would (the Recorder is the spool)."""
    return resolve(s, s.receive(data))


def resolve(s: ServerSession, actions: list[Any]) -> list[Any]:
    hooks = s.hooks
    assert isinstance(hooks, Recorder)
    out: list[Any] = []
    for action in actions:
        out.append(action)
        if isinstance(action, Deliver):
            if not hooks.fail_spool:
                hooks.delivered.append(action.message)
            out.extend(resolve(s, s.delivered("disk full" if hooks.fail_spool else None)))
    return out


def wire(actions: list[Any]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def codes(actions: list[Any]) -> list[int]:
    return [int(line[:3]) for line in wire(actions).split(b"\r\n") if line[3:4] == b" "]


def talk(s: ServerSession, *lines: str) -> list[int]:
    return codes(feed(s, "".join(f"{line}\r\n" for line in lines).encode()))


def test_banner_and_ehlo_per_mode() -> None:
    for mode, advertised in [(TLSMode.NO, False), (TLSMode.PREFERRED, True), (TLSMode.REQUIRED, True)]:
        hooks = Recorder()
        s = ServerSession(SessionConfig("esa.lab.example", Behaviour.ACCEPT, EffectiveParams(tls=mode)), hooks)
        assert wire(s.start()) == b"220 esa.lab.example ESMTP smtplab\r\n"
        reply = wire(feed(s, b"EHLO client.example\r\n"))
        assert reply.startswith(b"250-esa.lab.example Hello client.example\r\n")
        assert reply.endswith(b"250 HELP\r\n")
        assert (b"250-STARTTLS\r\n" in reply) is advertised


def test_required_gate_before_tls() -> None:
    s, _ = session(TLSMode.REQUIRED)
    assert talk(s, "HELO x", "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA") == [
        530,
        250,
        530,
        530,
        530,
    ]
    assert talk(s, "RSET", "VRFY a", "EXPN a", "HELP", "AUTH PLAIN", "XYZZY", "NOOP") == [530] * 6 + [250]


def test_plaintext_mail_under_no_and_preferred() -> None:
    for mode in (TLSMode.NO, TLSMode.PREFERRED):
        s, hooks = session(mode)
        assert talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA") == [250, 250, 250, 354]
        assert codes(feed(s, b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n")) == [250]
        [message] = hooks.delivered
        assert message.data == b"Subject: hi\r\n\r\n.leading dot\r\n"  # dot-unstuffed
        assert message.tls is None and message.recipients == ("c@example.com",)
        assert "mid_ready" in hooks.names()


def test_starttls_under_no_is_502() -> None:
    s, _ = session(TLSMode.NO)
    assert talk(s, "EHLO x", "STARTTLS") == [250, 502]


@pytest.mark.parametrize("mode", [TLSMode.PREFERRED, TLSMode.REQUIRED])
def test_starttls_rules(mode: TLSMode) -> None:
    s, hooks = session(mode)
    assert talk(s, "EHLO x", "STARTTLS now") == [250, 501]  # rule 1
    actions = feed(
        s, b"MAIL FROM:<a@b.example>\r\nSTARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<c@example.com>\r\n"
    )
    expected_mail = 530 if mode is TLSMode.REQUIRED else 250
    assert codes(actions) == [expected_mail, 220]
    assert isinstance(actions[-1], StartTLS)
    # rule 3: the bytes behind STARTTLS are discarded and logged, never executed
    name, fields = hooks.events[-1]
    assert name == "injection_discarded" and fields["nbytes"] == len(
        b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<c@example.com>\r\n"
    )
    assert feed(s, b"anything before the handshake\r\n") == []
    s.tls_started(FakeTLS())
    # rule 4: everything from before is forgotten; MAIL before a new EHLO is 503 Send EHLO first
    assert wire(feed(s, b"MAIL FROM:<a@b.example>\r\n")) == b"503 5.5.1 Send EHLO first\r\n"
    ehlo = wire(feed(s, b"EHLO x\r\n"))
    assert b"STARTTLS" not in ehlo  # rule 2: never advertised inside TLS
    assert talk(s, "STARTTLS") == [503]  # rule 2: refused while TLS is active
    assert talk(s, "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA") == [250, 250, 354]
    assert codes(feed(s, b"hello\r\n.\r\n")) == [250]
    assert hooks.delivered[0].tls == FakeTLS()


def test_pipelined_starttls_must_be_last() -> None:
    """Rule 7: with PIPELINING, anything behind STARTTLS in the same group is rule 3."""
    s, hooks = session(TLSMode.PREFERRED)
    actions = feed(s, b"EHLO x\r\nSTARTTLS\r\nEHLO y\r\n")
    assert codes(actions) == [250, 220]
    assert ("injection_discarded", {"nbytes": 8, "preview": b"EHLO y\r\n"}) in hooks.events


def test_failed_handshake_closes_and_logs() -> None:
    s, hooks = session(TLSMode.REQUIRED)
    talk(s, "EHLO x", "STARTTLS")
    actions = s.tls_failed("no shared cipher")
    assert actions == [Close(abort=True)]
    assert ("tls_failed", {"reason": "no shared cipher"}) in hooks.events and not hooks.delivered


def test_line_limits_nul_and_bare_lf() -> None:
    s, hooks = session(TLSMode.NO)
    assert talk(s, "NOOP " + "x" * 505) == [250]  # 512 octets with CRLF: allowed
    assert talk(s, "NOOP " + "x" * 506) == [500]  # 513: too long
    # an overlong line arriving in pieces is discarded without buffering it all
    assert feed(s, b"NOOP " + b"y" * 600) == []
    assert codes(feed(s, b"yyyy\r\nNOOP\r\n")) == [500, 250]
    assert wire(feed(s, b"NOOP\x00\r\n")).startswith(b"500 5.5.2")
    assert wire(feed(s, b"NOOP\n")).startswith(b"500 5.5.2")
    assert hooks.names().count("protocol_error") == 4


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"a" * 998 + b"\r\n", 250),
        (b"a" * 999 + b"\r\n", 500),
        (b"bare\nlf\r\n", 550),
        (b"nul\x00byte\r\n", 550),
        (b"b" * 5000 + b"\r\n", 500),
    ],
)
def test_text_lines(body: bytes, code: int) -> None:
    s, hooks = session(TLSMode.NO)
    talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA")
    assert codes(feed(s, body + b".\r\n")) == [code]
    assert len(hooks.delivered) == (1 if code == 250 else 0)


def test_size_limits() -> None:
    s, hooks = session(TLSMode.NO, max_message_size=100)
    assert talk(s, "EHLO x", "MAIL FROM:<a@b.example> SIZE=101") == [250, 552]
    assert talk(s, "MAIL FROM:<a@b.example> SIZE=50", "RCPT TO:<c@example.com>", "DATA") == [250, 250, 354]
    assert codes(feed(s, b"x" * 80 + b"\r\n" + b"y" * 80 + b"\r\n.\r\n")) == [552]
    assert not hooks.delivered


def test_recipient_limits_and_rat() -> None:
    s, _ = session(TLSMode.NO, max_rcpts_per_msg=2)
    assert talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<x@elsewhere.example>") == [250, 250, 550]
    assert talk(s, "RCPT TO:<1@example.com>", "RCPT TO:<2@example.com>", "RCPT TO:<3@example.com>") == [250, 250, 452]


def test_messages_per_connection() -> None:
    s, hooks = session(TLSMode.NO, max_msgs_per_connection=1)
    talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA")
    feed(s, b"one\r\n.\r\n")
    actions = feed(s, b"MAIL FROM:<a@b.example>\r\n")
    assert codes(actions) == [421] and isinstance(actions[-1], Close)
    assert len(hooks.delivered) == 1


def test_sequencing() -> None:
    s, _ = session(TLSMode.NO)
    assert talk(s, "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA", "EHLO") == [503, 503, 503, 501]
    assert talk(s, "HELO x", "MAIL FROM:<a@b.example>", "MAIL FROM:<a@b.example>", "DATA") == [250, 250, 503, 554]
    assert talk(s, "RSET", "MAIL FROM:bad", "VRFY x", "EXPN x", "HELP", "AUTH x", "FOO", "QUIT") == [
        250,
        501,
        252,
        502,
        214,
        502,
        500,
        221,
    ]
    assert s.closed


def test_reject_and_tcprefuse() -> None:
    hooks = Recorder()
    reject = ServerSession(SessionConfig("esa", Behaviour.REJECT, EffectiveParams()), hooks)
    assert wire(reject.start()) == b"554 esa Access denied\r\n"
    assert talk(reject, "EHLO x", "MAIL FROM:<a@b>", "QUIT") == [503, 503, 221]
    refuse = ServerSession(SessionConfig("esa", Behaviour.TCPREFUSE, EffectiveParams()), hooks)
    assert refuse.start() == [Close(abort=True)]


def test_spool_failure_is_451_and_nothing_delivered() -> None:
    s, hooks = session(TLSMode.NO)
    hooks.fail_spool = True
    talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA")
    assert codes(feed(s, b"x\r\n.\r\n")) == [451]
    assert not hooks.delivered


def test_disconnect_mid_data_delivers_nothing() -> None:
    s, hooks = session(TLSMode.NO)
    talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA")
    feed(s, b"half a message\r\n")
    s.connection_lost()
    assert not hooks.delivered and hooks.names()[-1] == "message_refused"


def test_mandatory_tls_sender_under_preferred() -> None:
    s, _ = session(TLSMode.PREFERRED, tls_mandatory_senders=("bank.example",))
    assert talk(s, "EHLO x", "MAIL FROM:<ceo@bank.example>", "MAIL FROM:<a@other.example>") == [250, 530, 250]


@pytest.mark.parametrize(
    ("mode", "cert", "mail"),
    [
        (TLSMode.REQUIRED, ClientCert.VERIFIED, 250),
        (TLSMode.REQUIRED, ClientCert.NONE, 554),
        (TLSMode.REQUIRED, ClientCert.UNVERIFIED, 554),
        (TLSMode.PREFERRED, ClientCert.NONE, 250),
        (TLSMode.PREFERRED, ClientCert.UNVERIFIED, 554),
    ],
)
def test_verify_client_certificate(mode: TLSMode, cert: ClientCert, mail: int) -> None:
    s, _ = session(mode, verify_client=True)
    talk(s, "EHLO x", "STARTTLS")
    s.tls_started(FakeTLS(), cert)
    assert talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "QUIT") == [250 if mail == 250 else 554, mail, 221]


def test_deadline_expired_answers_421_and_closes() -> None:
    s, _ = session()
    actions = s.deadline_expired("idle timeout", replies.TIMEOUT)
    assert codes(actions) == [421] and isinstance(actions[-1], Close)
    assert s.deadline_expired("idle timeout", replies.TIMEOUT) == []  # once closed, nothing more


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=700), max_size=12))
def test_hostile_bytes_never_crash_and_never_deliver_without_dot(chunks: list[bytes]) -> None:
    """Whatever arrives, the session answers with well-formed replies and delivers nothing it did not 250."""
    s, hooks = session(TLSMode.REQUIRED)
    out = b""
    for chunk in chunks:
        out += wire(feed(s, chunk))
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-")
    assert not hooks.delivered  # nothing can be delivered before TLS under Required


@settings(max_examples=200, deadline=None)
@given(split=st.integers(min_value=1, max_value=60))
def test_chunking_does_not_change_the_outcome(split: int) -> None:
    stream = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n"
    s, hooks = session(TLSMode.NO)
    out = b"".join(wire(feed(s, stream[i : i + split])) for i in range(0, len(stream), split))
    assert codes([Send(out)]) == [250, 250, 250, 354, 250, 221]
    assert hooks.delivered[0].data == b"body\r\n"


#: The malformed end-of-data sequences of the SMTP smuggling research (SEC Consult 2023; CVE-2023-51764,
#: -51765, -51766), each put between "first" and a smuggled transaction.
SMUGGLING_SEQUENCES = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
]
SMUGGLED = b"MAIL FROM:<mallory@evil.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\nforged\r\n.\r\n"


def _in_data(mode: TLSMode) -> tuple[ServerSession, Recorder]:
    s, hooks = session(mode)
    if mode is not TLSMode.NO:
        talk(s, "EHLO x", "STARTTLS")
        s.tls_started(FakeTLS())
    assert talk(s, "EHLO x", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>", "DATA") == [250, 250, 250, 354]
    return s, hooks


@pytest.mark.parametrize("mode", list(TLSMode))
@pytest.mark.parametrize("sequence", SMUGGLING_SEQUENCES, ids=repr)
def test_a_malformed_end_of_data_is_message_text(mode: TLSMode, sequence: bytes) -> None:
    """Rule 9: only <CRLF>.<CRLF> ends the data; what follows a false dot is never executed, in TLS or not."""
    s, hooks = _in_data(mode)
    reply = wire(feed(s, b"Subject: x\r\n\r\nfirst" + sequence + SMUGGLED))
    assert reply.startswith(b"550 5.6.0 Message refused: ")  # one reply, at the real end
    assert codes([Send(reply)]) == [550]
    assert not hooks.delivered
    assert not any(f.get("address") == "mallory@evil.example" for _, f in hooks.events)
    assert any("malformed end of data" in str(f.get("what")) for _, f in hooks.events)
    assert talk(s, "NOOP") == [250]  # back in command mode, nothing pending


@pytest.mark.parametrize("sequence", SMUGGLING_SEQUENCES, ids=repr)
def test_a_malformed_end_of_data_byte_by_byte(sequence: bytes) -> None:
    s, hooks = _in_data(TLSMode.NO)
    out = b"".join(wire(feed(s, bytes([b]))) for b in b"first" + sequence + SMUGGLED)
    assert codes([Send(out)]) == [550] and not hooks.delivered


@pytest.mark.parametrize(
    ("body", "code", "data"),
    [
        (b".\r\n", 250, b""),  # the DATA command's CRLF counts: an empty message
        (b"a\r\n.\r\n", 250, b"a\r\n"),
        (b"..\r\n.\r\n", 250, b".\r\n"),  # dot-stuffed, not an end
        (b"a\r\n. \r\n.\r\n", 250, b"a\r\n \r\n"),  # a dot and a space is text (unstuffed)
        (b"bare\rcr\r\n.\r\n", 550, None),
        (b"trailing cr\r\r\n.\r\n", 550, None),
    ],
)
def test_end_of_data_and_bare_cr(body: bytes, code: int, data: bytes | None) -> None:
    s, hooks = _in_data(TLSMode.NO)
    assert codes(feed(s, body)) == [code]
    assert [m.data for m in hooks.delivered] == ([data] if data is not None else [])


def test_an_overlong_line_ending_in_cr_keeps_its_crlf() -> None:
    """The CR of an overlong line's CRLF may arrive in the discarded part; the dot behind it still ends the data."""
    s, _ = _in_data(TLSMode.NO)
    assert feed(s, b"x" * 1500 + b"\r") == []
    assert codes(feed(s, b"\n.\r\n")) == [500]


def test_bare_cr_in_a_command_is_refused() -> None:
    s, hooks = session(TLSMode.NO)
    assert wire(feed(s, b"NOOP\rRSET\r\n")) == b"500 5.5.2 Bare CR not allowed\r\n"
    assert wire(feed(s, b"EHLO x\r\r\n")) == b"500 5.5.2 Bare CR not allowed\r\n"
    assert ("protocol_error", {"what": "bare CR in command"}) in hooks.events
    assert s.greeting is None


def test_a_large_pipelined_input_is_framed_in_linear_time() -> None:
    """20 MB of message lines in one read: linear framing takes a moment, re-copying the buffer per line hours."""
    s, hooks = session(TLSMode.NO, max_message_size=30_000_000)
    line = b"x" * 98 + b"\r\n"
    head = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
    assert codes(feed(s, head + line * 200_000 + b".\r\nQUIT\r\n")) == [250, 250, 250, 354, 250, 221]
    assert len(hooks.delivered[0].data) == 200_000 * len(line)
