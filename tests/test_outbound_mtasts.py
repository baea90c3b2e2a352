"""MTA-STS applied by the delivery engine (docs/outbound-reporting.md, "MTA-STS in the lab"), over the memory
carrier: dest.test publishes a policy (``_mta-sts`` TXT, the topology's policy host); the appliance fetches it
over HTTPS, caches it on the virtual clock and checks every MX against it before a message goes there."""

from __future__ import annotations

from pathlib import Path

import pytest
from outboundlab import OutboundLab

from lab.errors import BadInput
from lab.net.topology import load_topology


def mtasts_lines(lab: OutboundLab) -> list[str]:
    return [t for t in lab.texts() if "MTA-STS" in t]


def test_enforce_never_delivers_without_starttls(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1="absent", sts="enforce", retries=0)
    lab.send()
    lab.run()
    assert lab.mtas["mx1"].messages == []
    first = lab.engine.attempts[0]
    assert (first.mx_host, first.tls_setting, first.result_type) == (
        "mx1.dest.test",
        "Required (Verify)",
        "starttls-not-supported",
    )
    assert first.policy_type == "sts" and "mode: enforce" in first.policy_strings
    assert mtasts_lines(lab)[:2] == [
        "MTA-STS domain dest.test policy enforce max_age 86400 fetched",
        "DCID 1 MTA-STS enforce mx mx1.dest.test: starttls-not-supported - not delivered",
    ]
    assert b"MAIL FROM" not in lab.clear_bytes("mx1")  # nothing of the message crossed in clear
    assert lab.clear_bytes("mx1").startswith(b"EHLO esa.lab.example\r\n")
    assert lab.events("bounced")  # no MX would take it under the policy; retries 0: bounced with a DSN


def test_testing_delivers_and_reports(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1="absent", sts="testing")
    lab.send()
    lab.run()
    [message] = lab.mtas["mx1"].messages
    assert message.tls is False
    [attempt] = lab.engine.attempts
    assert (attempt.tls_setting, attempt.result_type, attempt.policy_type) == (
        "Preferred",
        "starttls-not-supported",
        "sts",
    )
    assert "DCID 1 MTA-STS testing mx mx1.dest.test: starttls-not-supported - delivered anyway" in lab.texts()
    assert b"MAIL FROM:<alice@example.com>" in lab.clear_bytes("mx1")  # testing: the message went in clear


def test_no_policy_applies_the_destination_control_alone(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1="absent")
    lab.send()
    lab.run()
    assert len(lab.mtas["mx1"].messages) == 1
    [attempt] = lab.engine.attempts
    assert (attempt.policy_type, attempt.result_type) == ("no-policy-found", "starttls-not-supported")
    assert mtasts_lines(lab) == []


def test_enforce_refuses_a_certificate_for_another_name(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="no", mx1="ok", mx1_names=("other.dest.test",), sts="enforce", retries=0)
    lab.send()
    lab.run()
    assert lab.mtas["mx1"].messages == []
    first = lab.engine.attempts[0]
    assert first.tls and first.result_type == "certificate-host-mismatch"
    assert first.tls_setting == "Required (Verify)"  # enforce overrides the local No
    assert "DCID 1 MTA-STS enforce mx mx1.dest.test: certificate-host-mismatch - not delivered" in lab.texts()
    clear = lab.clear_bytes("mx1")
    assert clear.endswith(b"STARTTLS\r\n") and b"MAIL FROM" not in clear
    assert "MTA-STS policy refuses it" in lab.alerts()[0].get_payload()


def test_testing_delivers_over_tls_with_a_certificate_for_another_name(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1="ok", mx1_names=("other.dest.test",), sts="testing")
    lab.send()
    lab.run()
    [message] = lab.mtas["mx1"].messages
    assert message.tls is True
    [attempt] = lab.engine.attempts
    assert attempt.result_type == "certificate-host-mismatch" and attempt.certificate_verified is False


def test_enforce_skips_an_mx_the_policy_does_not_name(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1="ok", mx2="ok", sts="enforce", sts_mx="mx2.dest.test")
    lab.send()
    lab.run()
    assert lab.mtas["mx1"].messages == [] and len(lab.mtas["mx2"].messages) == 1
    first, second = lab.engine.attempts
    assert (first.mx_host, first.result_type, first.outcome) == ("mx1.dest.test", "validation-failure", "not-sent")
    assert (second.mx_host, second.result_type, second.outcome) == ("mx2.dest.test", None, "delivered")
    assert "DCID 2 MTA-STS enforce mx mx2.dest.test: ok" in lab.texts()


def test_a_policy_fetch_error_delivers_as_without_a_policy_and_is_reported(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1="absent", sts="enforce", serve_sts=False)
    lab.send()
    lab.run()
    assert len(lab.mtas["mx1"].messages) == 1  # RFC 8461 5: as though the domain had no MTA-STS
    [attempt] = lab.engine.attempts
    assert (attempt.policy_type, attempt.policy_strings, attempt.result_type) == (
        "sts",
        (),
        "sts-policy-fetch-error",
    )
    [line] = mtasts_lines(lab)
    assert line.startswith("MTA-STS domain dest.test sts-policy-fetch-error: cannot connect to mta-sts.dest.test")
    assert [e["result_type"] for e in lab.events("mtasts_error")] == ["sts-policy-fetch-error"]


def test_a_cached_policy_survives_an_outage_until_its_max_age(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1="ok", sts="enforce", sts_max_age=3600)
    lab.send()
    lab.run()
    assert lab.engine.attempts[-1].tls_setting == "Required (Verify)"
    for port in lab.policy_ports:  # the policy host goes away, and the TXT record names a new id
        port.stopListening()
    source = lab.engine.policy_source
    source.txt = lambda name: ("v=STSv1; id=2",) if name == "_mta-sts.dest.test" else ()  # type: ignore[attr-defined]
    lab.net.clock.advance(600)
    lab.send()
    lab.run()
    second = lab.engine.attempts[-1]
    assert second.tls_setting == "Required (Verify)" and "mode: enforce" in second.policy_strings
    assert mtasts_lines(lab)[-3:-1] == [
        "MTA-STS domain dest.test sts-policy-fetch-error: cannot connect to mta-sts.dest.test:"
        " Connection was refused by other side: 198.51.100.13:443.",
        "MTA-STS domain dest.test policy enforce max_age 3600 cached",
    ]
    lab.net.clock.advance(3600)  # past max_age: the cache is empty, the fetch still fails: no policy
    lab.send()
    lab.run()
    third = lab.engine.attempts[-1]
    assert (third.tls_setting, third.result_type) == ("Preferred", "sts-policy-fetch-error")
    assert len(lab.mtas["mx1"].messages) == 3


def test_the_topology_names_the_policy_host(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, sts="testing")
    published = lab.topology.sts_host("DEST.test.")
    assert published is not None and published.host == "sts"
    assert published.text.split("\r\n") == [
        "version: STSv1",
        "mode: testing",
        "mx: mx1.dest.test",
        "mx: mx2.dest.test",
        "max_age: 86400",
        "",
    ]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            "{domain: dest.test, host: nobody, mode: enforce, mx: [mx1.dest.test]}",
            "mta_sts[0].host: unknown host 'nobody'",
        ),
        (
            "{domain: dest.test, host: mx1, mode: enforce, mx: [mx1.dest.test]}",
            "mta_sts[0].host: mta-sts.dest.test has no A record pointing at host mx1",
        ),
        ("{domain: dest.test, host: sts, mode: testing}", "mta_sts[0].mx: mode testing needs at least one mx pattern"),
        ("{domain: dest.test, host: sts, mode: enforce, mx: ['*.*.dest.test']}", "mta_sts[0].mx[0]: "),
        ("{domain: dest.test, host: sts, mode: strict, mx: [mx1.dest.test]}", "mta_sts[0].mode"),
        ("{domain: dest.test, host: sts, mode: enforce, mx: [a.dest.test], max_age: 31557601}", "mta_sts[0].max_age"),
    ],
)
def test_a_bad_policy_host_is_one_line_naming_the_field(tmp_path: Path, policy: str, message: str) -> None:
    OutboundLab(tmp_path, sts="testing")
    path = tmp_path / "topology.yaml"
    text = path.read_text()
    path.write_text(text[: text.index("mta_sts:")] + f"mta_sts:\n  - {policy}\n")
    with pytest.raises(BadInput) as caught:
        load_topology(path)
    assert message in str(caught.value)
    assert f"topology.yaml:{text[: text.index('mta_sts:')].count(chr(10)) + 2}" in str(caught.value)
