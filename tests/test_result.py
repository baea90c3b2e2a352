"""The result record: construction, counts, exit codes, exact JSON round trip, schema validation, load_index."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lab.errors import BadInput, HarnessError
from lab.policy.modes import TLSMode
from lab.report.jsonreport import dumps, write_index
from lab.scenario.result import (
    SCHEMA_VERSION,
    CaseRun,
    Expected,
    Level,
    RunResult,
    SpecRef,
    Target,
    Timings,
    TLSInfo,
    load_index,
)
from lab.scenario.verdict import Verdict

HOSTILE = '<-  250 ok\x00\x1b[2J\x1b]0;pwned\x07 <script>alert(1)</script> & ]]> "quoted" http://evil.example/x.js'

MUST_530 = SpecRef(
    ref="SPEC 2 Required",
    level=Level.MUST,
    text="before TLS is up only EHLO, NOOP, QUIT and STARTTLS are served; every other command gets 530 5.7.0",
)
SHOULD_530 = SpecRef(
    ref="RFC 3207 4",
    level=Level.SHOULD,
    text="the server SHOULD reply to every SMTP command other than NOOP, EHLO, STARTTLS, or QUIT with 530",
)


def _run(case: str, policy: str, verdict: Verdict, **kw: object) -> CaseRun:
    fields: dict[str, object] = {
        "case": case,
        "title": f"title of {case}",
        "section": "RFC 3207 4",
        "spec_refs": [SHOULD_530, MUST_530],
        "description": "The client sends MAIL before STARTTLS.",
        "expectation": "Under Required, MAIL before STARTTLS gets 530 and nothing is delivered.",
        "client": "misbehaving-mail-first",
        "target": "lab:Inboundmail",
        "policy": policy,
        "carrier": "memory",
        "verdict": verdict,
        "reason": "MAIL got 530 before TLS",
        "expected": Expected(Verdict.OK, "refused", {"replies": {"MAIL": 530}}),
        "observed": {"connected": True, "banner": 220, "starttls_advertised": True, "replies": {"MAIL": 530}},
        "transcript": [
            "=== Trying 192.168.2.1:25...",
            "<-  220 mail.example.com ESMTP",
            " -> EHLO client.example.net",
            "<-  250-mail.example.com",
            "<-  250 STARTTLS",
            " -> MAIL FROM:<a@example.net>",
            "<-  530 5.7.0 Must issue a STARTTLS command first",
            " -> QUIT",
            "<-  221 bye",
        ],
        "timings": Timings(virtual_s=0.25, wall_ms=3.5),
    }
    fields.update(kw)
    return CaseRun(**fields)  # type: ignore[arg-type]


def sample_result() -> RunResult:
    """A realistic record: passes, a FAILED with a hostile transcript, an XPASS, XFAIL, UNIMPLEMENTED, INFO, ERROR."""
    tls_transcript = [
        "<-  220 mail.example.com ESMTP",
        " -> EHLO client.example.net",
        "<-  250 STARTTLS",
        " -> STARTTLS",
        "<-  220 2.0.0 Ready to start TLS",
        "=== TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384",
        " ~> EHLO client.example.net",
        "<~  250 mail.example.com",
        " ~> MAIL FROM:<a@example.net>",
        "<~  250 2.1.0 ok",
    ]
    runs = [
        _run("3207-4-02", "required", Verdict.OK),
        _run(
            "3207-4-02",
            "preferred",
            Verdict.OK,
            observed={"connected": True, "banner": 220, "replies": {"MAIL": 250}},
            reason="under Preferred MAIL in plaintext is accepted",
        ),
        _run(
            "3207-4-03",
            "required",
            Verdict.FAILED,
            reason="MAIL was accepted in plaintext under Required",
            expected=Expected(Verdict.FAILED, "accepted in plaintext", {"replies": {"MAIL": 250}}),
            observed={"connected": True, "banner": 220, "replies": {"MAIL": 250}, "delivered_plaintext": True},
            transcript=[
                "<-  220 mail.example.com ESMTP",
                " -> EHLO client.example.net",
                "<-  250 STARTTLS",
                " -> MAIL FROM:<a@example.net>",
                HOSTILE,
                " -> QUIT",
            ],
            capture="captures/3207-4-03-required.pcap",
            keylog="captures/3207-4-03-required.keys",
        ),
        _run(
            "POL-REQ-01",
            "required",
            Verdict.INFORMATIONAL,
            section="POL",
            spec_refs=[SpecRef("RFC 3207 4", Level.LOCAL_POLICY, "A publicly-referenced SMTP server MUST NOT require")],
            client="skip",
            reason="Required on a public MX is a local policy choice",
            expected=Expected(Verdict.INFORMATIONAL, "refused plaintext", {"delivered": False}),
            observed={"connected": True, "delivered": False, "replies": {"MAIL": 530}},
        ),
        _run(
            "ATK-STRIP-01",
            "preferred",
            Verdict.XPASS,
            section="ATK",
            client="prefer",
            target="postfix-may",
            deviation="postfix-may falls back to plaintext when STARTTLS is stripped",
            reason="the client no longer fell back (declared deviation gone)",
            expected=Expected(Verdict.OK, "did not deliver", {"delivered_plaintext": False}),
            observed={"starttls_advertised": False, "delivered_plaintext": False, "fell_back": False},
            tls=None,
        ),
        _run(
            "ATK-STRIP-02",
            "preferred",
            Verdict.XFAIL,
            section="ATK",
            client="prefer",
            target="postfix-may",
            deviation="postfix-may sends mail in plaintext when STARTTLS is stripped",
            reason="delivered in plaintext, as declared",
            observed={"starttls_advertised": False, "delivered_plaintext": True},
        ),
        _run(
            "3207-4-10",
            "no",
            Verdict.UNIMPLEMENTED,
            client="require-verify",
            reason="the target has no certificate the lab CA can verify",
            expected=None,
            observed={},
            transcript=[],
            timings=Timings(virtual_s=0.0, wall_ms=None),
        ),
        _run(
            "3207-4-11",
            "preferred",
            Verdict.OK,
            client="prefer",
            reason="delivered inside TLS",
            tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
            transcript=tls_transcript,
            observed={"tls": True, "tls_version": "TLSv1.3", "delivered_tls": True, "replies": {"MAIL/tls": 250}},
        ),
        _run(
            "3207-4-12",
            "no",
            Verdict.ERROR,
            client="prefer",
            reason="harness: the listener did not start",
            expected=None,
            observed={"connected": False},
            transcript=["<** connection refused by 127.0.0.2:25"],
        ),
    ]
    return RunResult(
        seed=1234,
        carrier="memory",
        started=None,
        targets=[
            Target("lab:Inboundmail", "192.168.2.1:25", None),
            Target("postfix-may", "127.0.0.5:2525", TLSMode.PREFERRED, address_map={"198.51.100.7": "127.0.0.7"}),
        ],
        address_map={"192.168.2.1": "127.0.0.2", "198.51.100.7": "127.0.0.7"},
        runs=runs,
    )


def test_counts_cover_every_verdict_in_report_order() -> None:
    counts = sample_result().counts()
    assert list(counts)[:3] == [Verdict.OK, Verdict.FAILED, Verdict.NON_STRICT]
    assert set(counts) == set(Verdict)
    assert counts[Verdict.OK] == 3
    assert counts[Verdict.FAILED] == 1
    assert counts[Verdict.XPASS] == 1
    assert counts[Verdict.NON_STRICT] == 0
    assert sum(counts.values()) == 9


def test_exit_code_follows_the_verdicts() -> None:
    result = sample_result()
    assert result.exit_code() == 1
    no_failures = RunResult(**{**result.__dict__, "runs": [r for r in result.runs if not r.verdict.is_failure]})
    assert no_failures.exit_code() == 2  # the ERROR remains
    clean = RunResult(**{**result.__dict__, "runs": [r for r in no_failures.runs if r.verdict is not Verdict.ERROR]})
    assert clean.exit_code() == 0
    assert RunResult(seed=0, carrier="memory").exit_code() == 0


def test_dict_forms_are_accepted_and_coerced() -> None:
    run = _run(
        "3207-4-02",
        "required",
        "XFAIL",
        spec_refs=[{"ref": "RFC 3207 4.2", "level": "SHOULD", "text": "t"}],
        expected={"verdict": "OK", "label": "l", "conditions": {}},
        tls={"version": "TLSv1.2", "cipher": "ECDHE-RSA-AES128-GCM-SHA256"},
        timings={"virtual_s": 1, "wall_ms": None},
        deviation="known",
    )
    assert run.verdict is Verdict.XFAIL
    assert run.policy is TLSMode.REQUIRED
    assert run.spec_refs[0].level is Level.SHOULD
    assert run.expected == Expected(Verdict.OK, "l", {})
    assert run.tls == TLSInfo("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")
    assert run.name == "3207-4-02[required]"
    with pytest.raises(ValueError):
        _run("3207-4-02", "sometimes", Verdict.OK)


def test_round_trip_is_exact() -> None:
    result = sample_result()
    data = result.to_dict()
    again = RunResult.from_dict(json.loads(json.dumps(data)))
    assert again == result
    assert again.to_dict() == data
    assert dumps(again) == dumps(result)


def test_json_is_deterministic_with_stable_key_order() -> None:
    result = sample_result()
    assert dumps(result) == dumps(sample_result())
    replies = {"EHLO": 250, "STARTTLS": 220, "EHLO/tls": 250, "MAIL/tls": 250}
    stepwise = _run("3207-4-02", "required", Verdict.OK, observed={"tls": True, "replies": replies})
    loaded = RunResult.from_dict(json.loads(dumps(RunResult(seed=1, carrier="memory", runs=[stepwise]))))
    assert list(loaded.runs[0].observed["replies"]) == list(replies)  # step order survives the round trip
    data = json.loads(dumps(result))
    assert list(data) == ["schema_version", "tool", "seed", "carrier", "started", "targets", "address_map", "runs"]
    assert list(data["runs"][0])[:4] == ["case", "title", "section", "spec_refs"]
    assert data["schema_version"] == SCHEMA_VERSION == 4
    assert data["tool"] == "smtplab 0.1.0"
    hostile = data["runs"][2]["transcript"][4]
    # stored as is: views escape, the record does not
    assert hostile["direction"] == "received" and "<-  " + hostile["text"] == HOSTILE


def test_write_index_is_atomic_and_readable(tmp_path: Path) -> None:
    path = write_index(sample_result(), tmp_path / "report" / "index.json")
    assert path.read_bytes().startswith(b'{\n  "schema_version": 4,')
    assert [p.name for p in path.parent.iterdir()] == ["index.json"]  # no temporary file left behind
    assert load_index(path) == sample_result()


def test_non_json_observations_are_a_harness_error() -> None:
    run = _run("3207-4-02", "required", Verdict.OK, observed={"raw": b"\x00"})
    with pytest.raises(HarnessError, match=r"observed\.raw"):
        run.to_dict()
    with pytest.raises(HarnessError, match="not JSON"):
        _run("3207-4-02", "required", Verdict.OK, observed={"t": float("nan")}).to_dict()


def test_a_record_that_breaks_the_schema_is_not_written() -> None:
    result = sample_result()
    bad = RunResult(**{**result.__dict__, "runs": [_run("3207-4-02", "required", Verdict.XPASS)]})  # no deviation
    with pytest.raises(HarnessError, match="deviation"):
        dumps(bad)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(schema_version=5), "schema_version"),
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d["runs"][0].update(verdict="PASSED"), "runs[0].verdict"),
        (lambda d: d["runs"][0].update(policy="encrypt"), "runs[0].policy"),
        (lambda d: d["runs"][1].pop("reason"), "runs[1]"),
        (lambda d: d["runs"][0]["observed"].update(banner="220"), "runs[0].observed.banner"),
        (lambda d: d["runs"][0]["spec_refs"][0].update(level="MAY"), "runs[0].spec_refs[0].level"),
        (lambda d: d["runs"][4].update(deviation=None), "runs[4].deviation"),
        (lambda d: d["targets"][0].update(policy="sometimes"), "targets[0].policy"),
        (lambda d: d.update(extra=1), None),
        (lambda d: d["runs"][0].update(case="has space"), "runs[0].case"),
    ],
)
def test_schema_violations_name_the_field(mutate, field: str | None) -> None:  # type: ignore[no-untyped-def]
    data = copy.deepcopy(sample_result().to_dict())
    mutate(data)
    with pytest.raises(BadInput) as info:
        RunResult.from_dict(data, file="out/index.json")
    assert info.value.file == "out/index.json"
    assert info.value.field == field
    assert str(info.value).startswith("out/index.json: ")


def test_load_index_errors_are_one_line_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file"):
        load_index(tmp_path / "index.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "schema_version": 1,\n  "tool": \n}\n')
    with pytest.raises(BadInput) as info:
        load_index(broken)
    assert info.value.line == 4  # where the missing value was expected
    assert "not JSON" in str(info.value)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(BadInput, match="JSON object"):
        load_index(listed)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(BadInput, match="UTF-8"):
        load_index(binary)
    for path in (broken, listed, binary):
        with pytest.raises(BadInput) as info:
            load_index(path)
        assert "\n" not in str(info.value)


def test_scenario_model_parts_are_accepted() -> None:
    from lab.scenario import model

    alternative = model.Alternative(
        Verdict.FAILED, "accepted in plaintext", (model.Condition("replies.MAIL", model.Equals(250), 250),)
    )
    ref = model.SpecRef("RFC 3207 4", model.Level.MUST, "MUST NOT require")
    run = _run("3207-4-02", "required", Verdict.FAILED, spec_refs=[ref], expected=alternative)
    assert run.spec_refs == [SpecRef("RFC 3207 4", Level.MUST, "MUST NOT require")]
    assert run.expected == Expected(Verdict.FAILED, "accepted in plaintext", {"replies.MAIL": 250})
    assert RunResult.from_dict(RunResult(seed=1, carrier="memory", runs=[run]).to_dict()).runs == [run]
    with pytest.raises(HarnessError, match="Expected"):
        _run("3207-4-02", "required", Verdict.OK, expected=["not", "a", "mapping"])
