"""Target profiles (loading, errors with file:line) and declared deviations (XFAIL / XPASS)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from lab.conformance.deviations import Deviation, apply_deviations, covers_case, unknown_deviations
from lab.conformance.profile import load_profile, load_profiles, parse_address
from lab.errors import BadInput
from lab.policy.modes import TLSMode
from lab.scenario.result import CaseRun
from lab.scenario.verdict import Verdict

REPO = Path(__file__).resolve().parent.parent
TARGETS = REPO / "conformance" / "targets"


def write(tmp_path: Path, text: str, name: str = "target.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_with(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def case_run(
    case: str,
    policy: str,
    verdict: Verdict,
    reason: str = "",
    transcript: tuple[str, ...] = (),
    target: str = "postfix-may",
) -> CaseRun:
    return CaseRun(
        case=case,
        title=case,
        section="3",
        client="c",
        target=target,
        policy=TLSMode(policy),
        carrier="loopback",
        verdict=verdict,
        reason=reason,
        transcript=list(transcript),
    )


# -- loading


def test_full_profile_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / "certs" / name).write_text("x")
    path = write(
        tmp_path,
        """\
        name: postfix-encrypt
        description: Postfix smtpd_tls_security_level=encrypt
        address: 127.0.0.5:2525
        policy: encrypt
        verify_client: true
        ehlo: probe.smtplab.test
        server_name: mx.smtplab.test
        ca_file: certs/ca.pem
        client_cert: {cert_file: certs/client.pem, key_file: certs/client.key}
        envelope: {from: a@smtplab.invalid, to: [b@example.com, c@example.com]}
        timeouts: {connect: 2, reply: 5, case: 30}
        concurrency: 4
        deviations:
          - case: 3207-4.2
            policy: may
            reason: keeps the EHLO name across TLS
            match: "MAIL.*250"
        """,
    )
    profile = load_profile(path)
    assert (profile.name, profile.host, profile.port) == ("postfix-encrypt", "127.0.0.5", 2525)
    assert profile.policy is TLSMode.REQUIRED and profile.verify_client
    assert profile.ca_file == (tmp_path / "certs" / "ca.pem").resolve()
    assert profile.client_key == (tmp_path / "certs" / "client.key").resolve()
    assert profile.rcpt_to == ("b@example.com", "c@example.com")
    assert (profile.timeouts.connect, profile.timeouts.reply, profile.timeouts.case) == (2.0, 5.0, 30.0)
    assert profile.concurrency == 4
    (dev,) = profile.deviations
    assert dev.policy is TLSMode.PREFERRED and dev.match is not None and dev.line == line_with(path, "- case:")
    assert profile.target().to_dict() == {"name": "postfix-encrypt", "address": "127.0.0.5:2525", "policy": "required"}


def test_defaults_fill_a_minimal_profile(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "name: t\naddress: localhost:25\npolicy: no\n"))
    assert (profile.host, profile.port, profile.policy) == ("127.0.0.1", 25, TLSMode.NO)
    assert profile.mail_from == "probe@smtplab.invalid"
    assert profile.rcpt_to == ("postmaster@example.com",)
    assert profile.deviations == () and profile.concurrency == 1 and not profile.verify_client


def test_default_recipient_follows_the_server_name(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\naddress: 127.0.0.1:25\npolicy: Preferred\nserver_name: mx.example.org\n")
    profile = load_profile(path)
    assert profile.rcpt_to == ("postmaster@example.org",)
    assert profile.policy is TLSMode.PREFERRED  # the ESA spelling is accepted


@pytest.mark.parametrize(
    ("body", "needle", "field", "problem"),
    [
        ("address: 192.0.2.1:25\npolicy: no", "address:", "address", "not a loopback address"),
        ("address: mx.example.com:25\npolicy: no", "address:", "address", "needs allow_remote"),
        ("address: 127.0.0.1\npolicy: no", "address:", "address", "is not HOST:PORT"),
        ("address: 127.0.0.1:70000\npolicy: no", "address:", "address", "is not HOST:PORT"),
        ("address: 127.0.0.1:25\npolicy: sometimes", "policy:", "policy", "is not one of"),
        ("address: 127.0.0.1:25\npolicy: no\nca_file: missing.pem", "ca_file:", "ca_file", "no such file"),
        ("address: 127.0.0.1:25\npolicy: no\nconcurrency: 0", "concurrency:", "concurrency", "minimum"),
        ("address: 127.0.0.1:25\npolicy: no\ncolour: red", "name:", None, "unknown field(s)"),
        ("address: 127.0.0.1:25\npolicy: no\nenvelope:\n  to: [nobody]", "to:", "envelope.to[0]", "not a mail"),
        (
            "address: 127.0.0.1:25\npolicy: no\ntimeouts: {reply: 60, case: 10}",
            "timeouts:",
            "timeouts.reply",
            "longer than the case",
        ),
        (
            "address: 127.0.0.1:25\npolicy: no\ndeviations:\n  - case: 3207-4\n    reason: x\n    match: '(unclosed'",
            "match:",
            "deviations[0].match",
            "not a regular expression",
        ),
        (
            "address: 127.0.0.1:25\npolicy: no\ndeviations:\n  - case: 3207-4",
            "- case:",
            "deviations[0]",
            "'reason' is a required property",
        ),
    ],
)
def test_errors_name_file_line_and_field(
    tmp_path: Path, body: str, needle: str, field: str | None, problem: str
) -> None:
    path = write(tmp_path, "name: t\n" + body + "\n")
    with pytest.raises(BadInput) as info:
        load_profile(path)
    err = info.value
    assert err.file == str(path)
    assert err.line == line_with(path, needle), str(err)
    assert err.field == field
    assert problem in err.problem
    assert str(err).startswith(f"{path}:{err.line}: ")


def test_remote_addresses_need_the_users_word(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\naddress: mx.example.com:25\npolicy: may\nallow_remote: true\n")
    profile = load_profile(path)
    assert (profile.host, profile.port) == ("mx.example.com", 25)
    assert profile.rcpt_to == ("postmaster@example.com",)


def test_parse_address_forms() -> None:
    assert parse_address("[::1]:2525") == ("::1", 2525)
    assert parse_address("127.9.8.7:1") == ("127.9.8.7", 1)
    with pytest.raises(BadInput, match=r"\[ADDR\]:PORT"):
        parse_address("::1:25")
    with pytest.raises(BadInput, match="not a loopback"):
        parse_address("[2001:db8::1]:25")


def test_at_moves_a_placeholder_profile(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "name: t\naddress: 127.0.0.1:25\npolicy: may\n"))
    moved = profile.at("127.0.3.4:40025")
    assert moved.address == "127.0.3.4:40025" and moved.name == "t"
    with pytest.raises(BadInput):
        profile.at("10.0.0.1:25")


def test_two_profiles_with_one_name_are_refused(tmp_path: Path) -> None:
    a = write(tmp_path, "name: same\naddress: 127.0.0.1:25\npolicy: may\n", "a.yaml")
    b = write(tmp_path, "name: same\naddress: 127.0.0.1:26\npolicy: no\n", "b.yaml")
    with pytest.raises(BadInput, match="also used by") as info:
        load_profiles([a, b])
    assert info.value.file == str(b)


def test_shipped_target_profiles_load() -> None:
    profiles = load_profiles(TARGETS.glob("*.yaml"))
    assert {"example-postfix-may", "postfix-none", "postfix-may", "postfix-encrypt"} <= set(profiles)
    assert profiles["postfix-none"].policy is TLSMode.NO
    assert profiles["postfix-may"].policy is TLSMode.PREFERRED
    assert profiles["postfix-encrypt"].policy is TLSMode.REQUIRED
    assert profiles["aiosmtpd-require"].policy is TLSMode.REQUIRED
    for profile in profiles.values():
        assert parse_address(profile.address) == (profile.host, profile.port)
        for dev in profile.deviations:
            assert dev.reason.strip()


# -- deviations


def test_prefix_covers_at_separators_only() -> None:
    assert covers_case("3207-4", "3207-4")
    assert covers_case("3207-4", "3207-4-01")
    assert covers_case("3207-4", "3207-4.2-01")
    assert covers_case("3207-4.2-", "3207-4.2-01")
    assert not covers_case("3207-4", "3207-41-01")
    assert not covers_case("3207-4.2", "3207-4.20-01")
    assert not covers_case("3207-4-01", "3207-4")


def test_failed_as_declared_is_xfail_and_keeps_its_reason() -> None:
    dev = Deviation("3207-4.2", "Postfix keeps the EHLO name")
    runs = [case_run("3207-4.2-01", "preferred", Verdict.FAILED, "MAIL got 250")]
    (out,) = apply_deviations(runs, [dev])
    assert out.verdict is Verdict.XFAIL
    assert out.deviation == "Postfix keeps the EHLO name"
    assert out.reason == "MAIL got 250"
    assert runs[0].verdict is Verdict.FAILED  # pure: the input is unchanged


def test_non_strict_is_xfail_too() -> None:
    (out,) = apply_deviations([case_run("X-1", "no", Verdict.NON_STRICT)], [Deviation("X-1", "r")])
    assert out.verdict is Verdict.XFAIL


def test_ok_under_a_gone_deviation_is_xpass() -> None:
    (out,) = apply_deviations([case_run("3207-4.2-01", "preferred", Verdict.OK)], [Deviation("3207-4.2-01", "r")])
    assert out.verdict is Verdict.XPASS and out.deviation == "r"
    assert out.verdict.is_failure


def test_prefix_deviation_leaves_ok_cases_of_a_failing_section_alone() -> None:
    dev = Deviation("3207-4", "section 4 differs")
    runs = [case_run("3207-4-01", "required", Verdict.FAILED), case_run("3207-4-02", "required", Verdict.OK)]
    out = apply_deviations(runs, [dev])
    assert [r.verdict for r in out] == [Verdict.XFAIL, Verdict.OK]
    assert out[1].deviation is None


def test_policy_restricts_a_deviation() -> None:
    dev = Deviation("3207-4-01", "only under required", policy=TLSMode.REQUIRED)
    runs = [case_run("3207-4-01", "required", Verdict.FAILED), case_run("3207-4-01", "preferred", Verdict.FAILED)]
    out = apply_deviations(runs, [dev])
    assert [r.verdict for r in out] == [Verdict.XFAIL, Verdict.FAILED]


def test_match_must_show_in_reason_or_transcript() -> None:
    dev = Deviation("C-1", "answers 454", match=re.compile(r"<-  454 "))
    declared = case_run(
        "C-1", "no", Verdict.FAILED, "STARTTLS got 454", ("<-  220 hi", "<-  454 4.7.0 TLS not available")
    )
    different = case_run("C-1", "preferred", Verdict.FAILED, "STARTTLS got 500", ("<-  500 5.5.1 what",))
    out = apply_deviations([declared, different], [dev])
    assert [r.verdict for r in out] == [Verdict.XFAIL, Verdict.FAILED]
    by_reason = Deviation("C-1", "r", match=re.compile("got 500"))
    assert apply_deviations([different], [by_reason])[0].verdict is Verdict.XFAIL


def test_other_verdicts_are_left_alone() -> None:
    dev = Deviation("C", "r")
    runs = [
        case_run("C-1", "no", v) for v in (Verdict.INFORMATIONAL, Verdict.ERROR, Verdict.UNIMPLEMENTED, Verdict.SKIPPED)
    ]
    assert [r.verdict for r in apply_deviations(runs, [dev])] == [r.verdict for r in runs]


def test_target_limits_deviations_to_its_own_runs() -> None:
    dev = Deviation("C-1", "r")
    runs = [
        case_run("C-1", "no", Verdict.FAILED, target="postfix-may"),
        case_run("C-1", "no", Verdict.FAILED, target="lab:Inboundmail"),
    ]
    out = apply_deviations(runs, [dev], target="postfix-may")
    assert [r.verdict for r in out] == [Verdict.XFAIL, Verdict.FAILED]


def test_first_matching_deviation_gives_the_reason() -> None:
    devs = [Deviation("C", "broad"), Deviation("C-1", "narrow")]
    (out,) = apply_deviations([case_run("C-1", "no", Verdict.FAILED)], devs)
    assert out.deviation == "broad"


def test_unknown_deviations_are_named() -> None:
    devs = [Deviation("3207-4", "a"), Deviation("3207-9", "typo")]
    assert [d.case for d in unknown_deviations(devs, ["3207-4-01", "5321-4.5.3.1-01"])] == ["3207-9"]
