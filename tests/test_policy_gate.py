"""The command gate per TLS mode, every verb in every state (docs/rules.md §2-§3), and the fallback table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.policy import gate, replies
from lab.policy.fallback import ClientTLS, Next, Problem, after, attempts_starttls
from lab.policy.gate import GateFacts
from lab.policy.modes import Behaviour, ClientCert, TLSMode
from lab.policy.params import MailFlowPolicy, PolicyParams

VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "VRFY", "EXPN", "HELP", "AUTH", "NOOP", "QUIT", "XYZZY"]
N, P, R = TLSMode.NO, TLSMode.PREFERRED, TLSMode.REQUIRED

# (mode, tls active) -> the verbs that are refused and with what; everything else is served.
GATE_TABLE = {
    (N, False): {},
    (N, True): {},
    (P, False): {},
    (P, True): {},
    (R, False): {v: 530 for v in VERBS if v not in ("EHLO", "NOOP", "QUIT")},
    (R, True): {},
}


@pytest.mark.parametrize(("mode", "tls"), list(GATE_TABLE))
@pytest.mark.parametrize("verb", VERBS)
def test_gate_table(mode: TLSMode, tls: bool, verb: str) -> None:
    refusal = gate.check(verb, True, GateFacts(mode, tls_active=tls))
    expected = GATE_TABLE[(mode, tls)].get(verb)
    assert (refusal.code if refusal else None) == expected
    if expected == 530:
        assert refusal == replies.MUST_STARTTLS
        assert refusal.wire == b"530 5.7.0 Must issue a STARTTLS command first\r\n"


# STARTTLS: (mode, tls active, has argument) -> reply code (None = served: 220)
STARTTLS_TABLE = [
    (N, False, False, 502),
    (N, False, True, 502),
    (N, True, False, 502),
    (P, False, False, None),
    (P, False, True, 501),
    (P, True, False, 503),
    (P, True, True, 501),
    (R, False, False, None),
    (R, False, True, 501),
    (R, True, False, 503),
]


@pytest.mark.parametrize(("mode", "tls", "arg", "code"), STARTTLS_TABLE)
def test_starttls_rules(mode: TLSMode, tls: bool, arg: bool, code: int | None) -> None:
    refusal = gate.check("starttls", arg, GateFacts(mode, tls_active=tls))
    assert (refusal.code if refusal else None) == code


def test_starttls_reply_codes_are_the_spec_ones() -> None:
    assert replies.STARTTLS_NO_PARAMETERS.wire == b"501 5.5.4 Syntax error (no parameters allowed)\r\n"
    assert replies.STARTTLS_NOT_IMPLEMENTED.wire.startswith(b"502 5.5.1 ")
    assert replies.TLS_ALREADY_ACTIVE.wire.startswith(b"503 5.5.1 ")


# verify client certificate: (mode, cert state) -> refused after TLS with 554?
VERIFY_TABLE = [
    (R, ClientCert.NONE, True),
    (R, ClientCert.UNVERIFIED, True),
    (R, ClientCert.VERIFIED, False),
    (P, ClientCert.NONE, False),
    (P, ClientCert.UNVERIFIED, True),
    (P, ClientCert.VERIFIED, False),
]


@pytest.mark.parametrize(("mode", "cert", "refused"), VERIFY_TABLE)
@pytest.mark.parametrize("verb", VERBS)
def test_verify_client_certificate(mode: TLSMode, cert: ClientCert, refused: bool, verb: str) -> None:
    facts = GateFacts(mode, tls_active=True, verify_client=True, client_cert=cert)
    refusal = gate.check(verb, False, facts)
    if verb == "QUIT" or not refused:
        assert refusal is None
    else:
        assert refusal == replies.LACK_OF_SECURITY


def test_reject_policy_serves_only_quit() -> None:
    facts = GateFacts(P, rejecting=True)
    assert gate.check("QUIT", False, facts) is None
    assert all(gate.check(v, False, facts) == replies.BAD_SEQUENCE for v in VERBS if v != "QUIT")


@pytest.mark.parametrize(
    ("mode", "tls", "advertised"),
    [(N, False, False), (P, False, True), (R, False, True), (P, True, False), (R, True, False)],
)
def test_ehlo_advertises_starttls(mode: TLSMode, tls: bool, advertised: bool) -> None:
    assert gate.advertises_starttls(GateFacts(mode, tls_active=tls)) is advertised


@pytest.mark.parametrize(
    ("sender", "listed", "required"),
    [
        ("<a@bank.example>", ["a@bank.example"], True),
        ("<b@bank.example>", ["a@bank.example"], False),
        ("<b@bank.example>", ["bank.example"], True),
        ("<b@BANK.example>", ["@bank.example"], True),
        ("<b@sub.bank.example>", ["bank.example"], False),
        ("<>", ["bank.example"], False),
    ],
)
def test_mandatory_tls_senders(sender: str, listed: list[str], required: bool) -> None:
    facts = GateFacts(P)
    assert (gate.check_sender(sender, listed, facts) is not None) is required
    assert gate.check_sender(sender, listed, GateFacts(P, tls_active=True)) is None
    assert gate.check_sender(sender, listed, GateFacts(N)) is None


@given(
    verb=st.one_of(st.sampled_from([*VERBS, "STARTTLS"]), st.text(min_size=1, max_size=12)),
    has_argument=st.booleans(),
    verify=st.booleans(),
    cert=st.sampled_from(list(ClientCert)),
)
def test_required_serves_nothing_else_before_tls(verb: str, has_argument: bool, verify: bool, cert: ClientCert) -> None:
    """Under Required no command other than EHLO, NOOP, QUIT, STARTTLS is ever served before TLS."""
    refusal = gate.check(verb, has_argument, GateFacts(R, verify_client=verify, client_cert=cert))
    if verb.upper() not in gate.SERVED_BEFORE_TLS:
        assert refusal is not None and refusal.code == 530


@given(verb=st.text(min_size=1, max_size=12), mode=st.sampled_from(list(TLSMode)), tls=st.booleans())
def test_quit_is_always_served(verb: str, mode: TLSMode, tls: bool) -> None:
    assert gate.check("QUIT", False, GateFacts(mode, tls_active=tls, rejecting=True)) is None


@given(mode=st.sampled_from(list(TLSMode)), arg=st.booleans())
def test_starttls_inside_tls_is_never_served(mode: TLSMode, arg: bool) -> None:
    assert gate.check("STARTTLS", arg, GateFacts(mode, tls_active=True)) is not None


FALLBACK_TABLE = {
    ClientTLS.SKIP: (Next.PLAINTEXT, Next.PLAINTEXT, Next.PLAINTEXT, Next.PLAINTEXT),
    ClientTLS.PREFER: (Next.PLAINTEXT, Next.PLAINTEXT, Next.RETRY_PLAINTEXT, Next.IGNORE),
    ClientTLS.PREFER_STRICT: (Next.PLAINTEXT, Next.ABORT, Next.ABORT, Next.IGNORE),
    ClientTLS.REQUIRE: (Next.ABORT, Next.ABORT, Next.ABORT, Next.IGNORE),
    ClientTLS.REQUIRE_VERIFY: (Next.ABORT, Next.ABORT, Next.ABORT, Next.ABORT),
}


@pytest.mark.parametrize("behaviour", list(ClientTLS))
def test_fallback_table(behaviour: ClientTLS) -> None:
    problems = [Problem.NOT_ADVERTISED, Problem.REFUSED, Problem.HANDSHAKE_FAILED, Problem.VERIFY_FAILED]
    assert tuple(after(behaviour, p) for p in problems) == FALLBACK_TABLE[behaviour]
    assert attempts_starttls(behaviour, True) is (behaviour is not ClientTLS.SKIP)
    assert attempts_starttls(behaviour, False) is False


def test_parameters_inherit_policy_then_listener_then_appliance() -> None:
    defaults = PolicyParams(tls=TLSMode.PREFERRED, max_rcpts_per_msg=50)
    policy = MailFlowPolicy("X", Behaviour.ACCEPT, PolicyParams(tls=TLSMode.REQUIRED))
    params = policy.effective(defaults)
    assert params.tls is TLSMode.REQUIRED  # the policy's own
    assert params.max_rcpts_per_msg == 50  # the listener default
    assert params.max_message_size == 10 * 1024 * 1024  # the appliance default
    assert MailFlowPolicy("Y", Behaviour.ACCEPT).effective(PolicyParams()).tls is TLSMode.NO  # out of the box
