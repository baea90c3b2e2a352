"""MTA-STS (RFC 8461): record and policy parsing, mx patterns, the per-MX decision, the cache on a virtual clock,
and the HTTPS policy host and fetcher over the memory carrier (and once over loopback)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.protocol import Protocol, ServerFactory

from lab.net.capture import Direction
from lab.net.loopback import LoopbackNetwork
from lab.net.memory import MemoryNetwork
from lab.outbound.mtasts import (
    MAX_AGE_LIMIT,
    Mode,
    Policy,
    PolicyCache,
    PolicyError,
    StsRecord,
    TLSOutcome,
    decide,
    mx_matches,
    parse_policy,
    parse_txt,
    resolve,
)
from lab.outbound.policyserver import PublishedPolicy, current_policy, fetch_policy, parse_response, serve_policy
from lab.tls.certs import LabCA

ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.org\r\nmx: *.backup.example.org\r\nmax_age: 86400\r\n"
GOOD_TLS = TLSOutcome(starttls_offered=True)

# -- the TXT record -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20260101T000000;"], StsRecord("20260101T000000")),
        (["v=STSv1;id=abc"], StsRecord("abc")),
        (["v=spf1 -all", "v=STSv1; id=x1; ext=1"], StsRecord("x1")),
        (["v=spf1 -all"], None),
        ([], None),
    ],
)
def test_txt_record(records: list[str], expected: StsRecord | None) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (["v=STSv1; id=a", "v=STSv1; id=b"], "2 _mta-sts TXT records"),
        (["v=STSv1;"], "id None"),
        (["v=STSv1; id=has-dash"], "not 1-32"),
        (["v=STSv1; id=" + "a" * 33], "not 1-32"),
        (["v=STSv1; id=a; junk"], "not name=value"),
    ],
)
def test_txt_record_errors(records: list[str], why: str) -> None:
    result = parse_txt(records)
    assert isinstance(result, PolicyError) and result.result_type == "sts-policy-invalid" and why in result.reason


# -- the policy file ------------------------------------------------------------------------------------------


def test_policy_file() -> None:
    policy = parse_policy(ENFORCE)
    assert policy == Policy(Mode.ENFORCE, 86400, ("mail.example.org", "*.backup.example.org"), ENFORCE)
    assert policy.lines == (
        "version: STSv1",
        "mode: enforce",
        "mx: mail.example.org",
        "mx: *.backup.example.org",
        "max_age: 86400",
    )


def test_policy_rules_of_rfc8461_3_2() -> None:
    # LF line ends, unknown keys ignored, a repeated key keeps its first value, mx repeats
    text = "version: STSv1\nmode: testing\nmode: enforce\nfoo: bar\nmx: A.Example.ORG.\nmax_age: 0\n"
    policy = parse_policy(text)
    assert isinstance(policy, Policy)
    assert (policy.mode, policy.max_age, policy.mx) == (Mode.TESTING, 0, ("a.example.org",))
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n") == Policy(
        Mode.NONE, 60, (), "version: STSv1\nmode: none\nmax_age: 60\n"
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version None"),
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version 'STSv2'"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode 'strict'"),
        ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age ''"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age '-1'"),
        (f"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: {MAX_AGE_LIMIT + 1}\n", "up to 31557600"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "without an mx"),
        ("version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n", "not a host name pattern"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nno colon here\n", "line 5"),
    ],
)
def test_invalid_policies(text: str, why: str) -> None:
    result = parse_policy(text)
    assert isinstance(result, PolicyError) and result.result_type == "sts-policy-invalid" and why in result.reason


@given(st.text(max_size=200))
def test_any_text_gives_a_policy_or_a_typed_error(text: str) -> None:
    assert isinstance(parse_policy(text), Policy | PolicyError)


# -- mx patterns ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.org", "mail.example.org", True),
        ("mail.example.org", "MAIL.Example.org.", True),
        ("mail.example.org", "mx.example.org", False),
        ("*.example.org", "mx1.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "a.b.example.org", False),  # exactly one label
        ("*.example.org", "mx1.example.org.evil", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True))
def test_a_wildcard_never_matches_more_or_fewer_than_one_label(suffix: str) -> None:
    assert mx_matches(f"*.{suffix}", f"x.{suffix}")
    assert not mx_matches(f"*.{suffix}", suffix)
    assert not mx_matches(f"*.{suffix}", f"x.y.{suffix}")


# -- the decision for one MX ----------------------------------------------------------------------------------

TESTING = parse_policy(ENFORCE.replace("enforce", "testing"))
ENFORCING = parse_policy(ENFORCE)


@pytest.mark.parametrize(
    ("outcome", "result_type"),
    [
        (GOOD_TLS, None),
        (TLSOutcome(starttls_offered=False), "starttls-not-supported"),
        (TLSOutcome(True, handshake_ok=False, failure="no shared cipher"), "validation-failure"),
        (TLSOutcome(True, certificate_expired=True), "certificate-expired"),
        (TLSOutcome(True, certificate_trusted=False), "certificate-not-trusted"),
        (TLSOutcome(True, certificate_names_host=False), "certificate-host-mismatch"),
    ],
)
def test_enforce_refuses_and_testing_delivers_but_reports(outcome: TLSOutcome, result_type: str | None) -> None:
    assert isinstance(ENFORCING, Policy) and isinstance(TESTING, Policy)
    enforced, tested, none = (
        decide(ENFORCING, "mail.example.org", outcome),
        decide(TESTING, "mail.example.org", outcome),
        decide(None, "mail.example.org", outcome),
    )
    assert enforced.result_type == tested.result_type == none.result_type == result_type
    assert enforced.deliver is (result_type is None)
    assert tested.deliver and none.deliver


def test_an_mx_outside_the_policy() -> None:
    assert isinstance(ENFORCING, Policy) and isinstance(TESTING, Policy)
    refused = decide(ENFORCING, "evil.example.net", GOOD_TLS)
    assert not refused.deliver and refused.result_type == "validation-failure" and "evil.example.net" in refused.reason
    assert decide(TESTING, "evil.example.net", GOOD_TLS).deliver
    assert decide(ENFORCING, "x.backup.example.org", GOOD_TLS).deliver


# -- the cache ------------------------------------------------------------------------------------------------


def test_cache_by_id_and_max_age_on_the_clock() -> None:
    clock = task.Clock()
    cache = PolicyCache(clock.seconds)
    assert isinstance(ENFORCING, Policy)
    record = StsRecord("v1")
    assert cache.needs_fetch("example.org", record)
    assert resolve(cache, "example.org", record, ENFORCING) is ENFORCING
    assert not cache.needs_fetch("example.org", record)
    assert cache.needs_fetch("example.org", StsRecord("v2"))  # a new id: fetch again
    # the TXT record vanishes or the refetch fails: the cached policy stays in force until max_age
    assert resolve(cache, "example.org", None, None) is ENFORCING
    failure = PolicyError("sts-policy-fetch-error", "HTTP 404")
    assert resolve(cache, "example.org", StsRecord("v2"), failure) is ENFORCING
    clock.advance(86400)
    assert cache.policy("example.org") is None
    assert resolve(cache, "example.org", StsRecord("v2"), failure) == failure
    assert resolve(cache, "example.org", None, None) is None


# -- the policy host and the fetcher --------------------------------------------------------------------------

HOST_IP, SENDER_IP = "192.0.2.80", "192.168.2.1"


@pytest.fixture(scope="module")
def lab_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA(tmp_path_factory.mktemp("state"))


def _fetch(
    ca: LabCA, published: PublishedPolicy, *, name: str = "mta-sts.example.org", ca_for_cert: LabCA | None = None
) -> tuple[Policy | PolicyError, MemoryNetwork]:
    net = MemoryNetwork()
    certkey = (ca_for_cert or ca).issue(name.replace("*", "star"), [name])
    serve_policy(net, HOST_IP, published, certkey)
    result = net.run_until(fetch_policy(net, SENDER_IP, HOST_IP, "example.org", [ca.ca_pem]), timeout=120)
    return result, net


def test_fetch_over_real_tls(lab_ca: LabCA) -> None:
    result, net = _fetch(lab_ca, PublishedPolicy(ENFORCE))
    assert result == ENFORCING
    [flow] = net.capture.flows
    wire = flow.payload(Direction.C2S)
    assert b"GET" not in wire and b"mta-sts.example.org" in wire  # only the SNI is in clear, the GET is encrypted
    assert net.clock.seconds() < 1.0


@pytest.mark.parametrize(
    ("published", "result_type", "why"),
    [
        (PublishedPolicy("gone", status=404), "sts-policy-fetch-error", "HTTP 404"),
        (
            PublishedPolicy("", status=301, location="https://elsewhere.example/p"),
            "sts-policy-fetch-error",
            "redirect to https://elsewhere.example/p",
        ),
        (PublishedPolicy(ENFORCE, content_type="text/html"), "sts-policy-invalid", "not text/plain"),
        (PublishedPolicy("version: STSv1\nmode: enforce\n"), "sts-policy-invalid", "max_age"),
        (PublishedPolicy(ENFORCE + "x: " + "y" * 70_000 + "\n"), "sts-policy-fetch-error", "over 65536 bytes"),
    ],
)
def test_fetch_errors(lab_ca: LabCA, published: PublishedPolicy, result_type: str, why: str) -> None:
    result, _ = _fetch(lab_ca, published)
    assert isinstance(result, PolicyError) and result.result_type == result_type and why in result.reason


def test_a_certificate_for_another_name_or_from_another_ca_is_webpki_invalid(lab_ca: LabCA, tmp_path: Path) -> None:
    wrong_name, _ = _fetch(lab_ca, PublishedPolicy(ENFORCE), name="mta-sts.example.net")
    stranger, net = _fetch(lab_ca, PublishedPolicy(ENFORCE), ca_for_cert=LabCA.untrusted(tmp_path))
    for result in (wrong_name, stranger):
        assert isinstance(result, PolicyError) and result.result_type == "sts-webpki-invalid"
    assert b"GET" not in b"".join(s.data for s in net.capture.flows[0].segments)  # nothing asked of an impostor


def test_nothing_listening_and_a_silent_host_are_fetch_errors(lab_ca: LabCA) -> None:
    net = MemoryNetwork()
    refused = net.run_until(fetch_policy(net, SENDER_IP, HOST_IP, "example.org", [lab_ca.ca_pem]), timeout=10)
    assert isinstance(refused, PolicyError) and "cannot connect" in refused.reason
    net.listen(HOST_IP, 443, ServerFactory.forProtocol(Protocol))  # accepts, never answers the ClientHello
    silent = net.run_until(fetch_policy(net, SENDER_IP, HOST_IP, "example.org", [lab_ca.ca_pem], timeout=30), 120)
    assert isinstance(silent, PolicyError) and silent.result_type == "sts-policy-fetch-error"
    assert "no answer from mta-sts.example.org in 30 s" in silent.reason
    assert 30 <= net.clock.seconds() < 31  # the deadline ran on the virtual clock


def test_responses() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert parse_response(chunked) == (200, {"transfer-encoding": "chunked"}, b"hello")
    assert parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort") == "the body ended after 5 of 9 bytes"
    assert parse_response(b"SSH-2.0-OpenSSH\r\n\r\n") == "not an HTTP status line: 'SSH-2.0-OpenSSH'"


@pytest_twisted.inlineCallbacks
def test_fetch_over_loopback(lab_ca: LabCA) -> Any:
    base = f"127.62.{os.getpid() % 200 + 20}"
    net = LoopbackNetwork({HOST_IP: f"{base}.1", SENDER_IP: f"{base}.2"})
    try:
        serve_policy(
            net, HOST_IP, PublishedPolicy(ENFORCE), lab_ca.issue("mta-sts.example.org", ["mta-sts.example.org"])
        )
        result = yield net.wait(fetch_policy(net, SENDER_IP, HOST_IP, "example.org", [lab_ca.ca_pem]), 30)
    finally:
        yield net.close()
    assert result == ENFORCING


def test_current_policy_fetches_once_per_id_and_keeps_it_through_outages(lab_ca: LabCA) -> None:
    net = MemoryNetwork()
    cache = PolicyCache(net.clock.seconds)
    port = serve_policy(
        net, HOST_IP, PublishedPolicy(ENFORCE), lab_ca.issue("mta-sts.example.org", ["mta-sts.example.org"])
    )

    def current(txt: list[str], host_ip: str | None = HOST_IP) -> Policy | PolicyError | None:
        d = current_policy(net, cache, "example.org", txt, SENDER_IP, host_ip, [lab_ca.ca_pem])
        return net.run_until(d, timeout=120)  # type: ignore[no-any-return]

    assert current(["v=spf1 -all"]) is None and net.capture.flows == []  # no policy published: nothing fetched
    assert current(["v=STSv1; id=1"]) == ENFORCING and len(net.capture.flows) == 1
    assert current(["v=STSv1; id=1"]) == ENFORCING and len(net.capture.flows) == 1  # cached: no second fetch
    net.run_until(port.stopListening(), timeout=10)
    assert current(["v=STSv1; id=2"]) == ENFORCING and len(net.capture.flows) == 2  # refetch failed: cache holds
    assert current([], host_ip=None) == ENFORCING  # the TXT record blocked: still enforced until max_age
    net.clock.advance(86400)
    failed = current(["v=STSv1; id=2"])
    assert isinstance(failed, PolicyError) and failed.result_type == "sts-policy-fetch-error"
    assert current(["v=STSv1; id=2"], host_ip=None) == PolicyError(
        "sts-policy-fetch-error", "mta-sts.example.org does not resolve"
    )
