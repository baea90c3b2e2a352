"""The verdict evaluator: every condition form, the order of alternatives, the fallback by spec level."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lab.scenario.evaluate import NO_MATCH, evaluate
from lab.scenario.loader import load_case_file
from lab.scenario.model import Case, lookup
from lab.scenario.verdict import Verdict


def make_case(tmp_path: Path, expect: dict[str, Any], *, levels: tuple[str, ...] = ("MUST",), **extra: Any) -> Case:
    """A minimal case file written as JSON (valid YAML), loaded through the real loader."""
    doc = {
        "id": "3207-4-99",
        "title": "evaluator table case",
        "refs": [{"ref": f"RFC 3207 4 ({level})", "level": level, "text": "a sentence"} for level in levels],
        "description": "d",
        "expectation": "e",
        "client": {"host": "mta-prefer", "steps": [{"ehlo": "x.example"}]},
        "expect": expect,
        **extra,
    }
    for alternatives in expect.values():  # cite the ref of the level a FAILED / NON-STRICT outcome breaks
        for alt in alternatives:
            level = {"FAILED": "MUST", "NON-STRICT": "SHOULD"}.get(alt["verdict"])
            if level in levels and "ref" not in alt:
                alt["ref"] = f"RFC 3207 4 ({level})"
    path = tmp_path / "case.yaml"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return load_case_file(path)


def judge(tmp_path: Path, when: dict[str, Any], observed: dict[str, Any]) -> Verdict:
    # The second alternative names the refused RCPT#2, so a miss is the MUST fallback, not an inconclusive run.
    named = {"verdict": "OK", "label": "never", "when": {"replies.RCPT#2": 599, "connected": False}}
    case = make_case(tmp_path, {"any": [{"verdict": "OK", "label": "it holds", "when": when}, named]})
    return evaluate(case, "preferred", observed, external=False).verdict


OBSERVED = {
    "connected": True,
    "banner": 220,
    "starttls_advertised": True,
    "starttls_reply": 454,
    "tls": False,
    "tls_version": "TLSv1.3",
    "replies": {"MAIL": 530, "MAIL/tls": 250, "RCPT#2": 452, "a.b": 221},
    "plaintext_exposure": {"envelope": True, "body": False},
    "connections": 2,
    "server_log": [
        {
            "event": "tls_failed",
            "fields": {"icid": 1, "reason": "wrong version number"},
            "line": "Info: ICID 1 TLS failed: wrong version number",
        },
        {"event": "close", "fields": {"icid": 1, "by": None}, "line": "Info: ICID 1 close"},
    ],
}


@pytest.mark.parametrize(
    ("when", "holds"),
    [
        # equality, with booleans kept apart from numbers
        ({"tls": False}, True),
        ({"tls": True}, False),
        ({"connections": 2}, True),
        ({"connections": 1}, False),
        ({"tls_version": "TLSv1.3"}, True),
        ({"banner": 220}, True),
        # one of
        ({"starttls_reply": [502, 454, 500, 503]}, True),
        ({"starttls_reply": [502, 500]}, False),
        # reply classes
        ({"starttls_reply": "4xx"}, True),
        ({"starttls_reply": "5xx"}, False),
        ({"starttls_reply": "4xx|5xx"}, True),
        ({"starttls_reply": "45x"}, True),
        ({"starttls_reply": "454"}, True),
        ({"starttls_reply": ["5xx", 220]}, False),
        # dotted keys into dicts, labels that contain dots
        ({"replies.MAIL": 530}, True),
        ({"replies.MAIL/tls": "2xx"}, True),
        ({"replies.RCPT#2": 452}, True),
        ({"replies.a.b": 221}, True),
        ({"plaintext_exposure.envelope": True}, True),
        ({"plaintext_exposure.body": True}, False),
        # not
        ({"starttls_reply": {"not": 220}}, True),
        ({"starttls_reply": {"not": "4xx"}}, False),
        ({"replies.DATA": {"not": 250}}, True),  # absent: the inner test fails, so not holds
        ({"starttls_reply": {"not": [220, 454]}}, False),
        # match on strings
        ({"tls_version": {"match": "^TLSv1\\.[23]$"}}, True),
        ({"tls_version": {"match": "1\\.2"}}, False),
        ({"tls_error": {"match": "."}}, False),  # absent
        # has on lists of lines
        ({"server_log": {"has": "TLS failed"}}, True),
        ({"server_log": {"has": "STARTTLS command injection"}}, False),
        # absent
        ({"tls_error": {"absent": True}}, True),
        ({"tls": {"absent": True}}, False),
        ({"replies.QUIT": {"absent": True}}, True),
        ({"replies.MAIL": {"absent": False}}, True),
        # several operators in one mapping: all must hold
        ({"starttls_reply": {"absent": False, "not": 220}}, True),
        ({"replies.QUIT": {"absent": False, "not": 220}}, False),
        # a key that is missing fails equality
        ({"delivered": False}, False),
        # several keys: all must hold
        ({"tls": False, "connections": 2, "replies.MAIL": "5xx"}, True),
        ({"tls": False, "connections": 3}, False),
        # no conditions: always holds
        ({}, True),
    ],
)
def test_condition_forms(tmp_path: Path, when: dict[str, Any], holds: bool) -> None:
    verdict = judge(tmp_path, when, OBSERVED)
    assert verdict is (Verdict.OK if holds else Verdict.FAILED)


def test_true_never_equals_one(tmp_path: Path) -> None:
    assert judge(tmp_path, {"connections": 1}, {"connections": True}) is Verdict.FAILED
    assert judge(tmp_path, {"tls": True}, {"tls": 1}) is Verdict.FAILED


def test_first_matching_alternative_decides(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        {
            "no": [
                {"verdict": "OK", "label": "the lab's 502", "when": {"starttls_reply": 502}},
                {"verdict": "NON-STRICT", "label": "another refusal", "when": {"starttls_reply": "5xx"}},
                {"verdict": "FAILED", "label": "anything else", "when": {}},
            ]
        },
        levels=("MUST", "SHOULD"),
        policies=["no"],
    )
    assert evaluate(case, "no", {"starttls_reply": 502}, external=False).verdict is Verdict.OK
    second = evaluate(case, "no", {"starttls_reply": 500}, external=False)
    assert (second.verdict, second.reason) == (Verdict.NON_STRICT, "another refusal")
    assert second.alternative is not None and second.alternative.label == "another refusal"
    assert evaluate(case, "no", {"starttls_reply": 220}, external=False).verdict is Verdict.FAILED


def test_policy_alternatives_come_before_any(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        {
            "required": [{"verdict": "INFORMATIONAL", "label": "refused: local policy", "when": {"delivered": False}}],
            "any": [{"verdict": "OK", "label": "delivered", "when": {"delivered": True}}],
        },
    )
    assert evaluate(case, "required", {"delivered": False}, external=False).verdict is Verdict.INFORMATIONAL
    assert evaluate(case, "required", {"delivered": True}, external=False).verdict is Verdict.OK
    # preferred has no own list: only "any" applies; not delivered falls back
    assert evaluate(case, "preferred", {"delivered": False}, external=False).verdict is Verdict.FAILED


@pytest.mark.parametrize(
    ("levels", "verdict"),
    [
        (("MUST",), Verdict.FAILED),
        (("SHOULD",), Verdict.NON_STRICT),
        (("local-policy",), Verdict.INFORMATIONAL),
        (("local-policy", "SHOULD"), Verdict.NON_STRICT),
        (("SHOULD", "MUST", "local-policy"), Verdict.FAILED),
    ],
)
def test_fallback_takes_the_strongest_level(tmp_path: Path, levels: tuple[str, ...], verdict: Verdict) -> None:
    case = make_case(tmp_path, {"any": [{"verdict": "OK", "label": "l", "when": {"tls": True}}]}, levels=levels)
    result = evaluate(case, "no", {"tls": False}, external=False)
    assert result.verdict is verdict
    assert result.alternative is None
    assert result.reason.startswith(NO_MATCH)


def test_fallback_names_the_closest_alternatives_unmet_conditions(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        {
            "any": [
                {"verdict": "OK", "label": "far", "when": {"tls": True, "delivered": True, "connections": 1}},
                {"verdict": "OK", "label": "near", "when": {"tls": True, "delivered": False}},
            ]
        },
    )
    result = evaluate(case, "preferred", {"tls": False, "delivered": False, "connections": 1}, external=False)
    assert result.verdict is Verdict.FAILED
    assert result.unmet == ("tls: wanted true (observed false)",)
    assert "closest: 'near' (OK)" in result.reason
    assert "tls: wanted true (observed false)" in result.reason
    absent = evaluate(case, "preferred", {"delivered": False}, external=False)
    assert absent.unmet == ("tls: wanted true (observed absent)",)


def test_ties_go_to_the_earlier_alternative(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        {
            "any": [
                {"verdict": "OK", "label": "first", "when": {"starttls_reply": 220}},
                {"verdict": "OK", "label": "second", "when": {"starttls_reply": 502}},
            ]
        },
    )
    result = evaluate(case, "no", {"starttls_reply": 454}, external=False)
    assert "closest: 'first'" in result.reason
    assert result.unmet == ("starttls_reply: wanted 220 (observed 454)",)


def test_external_target_and_lab_only_needs(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        {"any": [{"verdict": "OK", "label": "logged", "when": {"server_log": {"has": "TLS failed"}}}]},
    )
    assert case.requires == ("server-log",)  # derived from the condition on server_log
    external = evaluate(case, "preferred", {}, external=True)
    assert external.verdict is Verdict.UNIMPLEMENTED
    assert "the lab's mail log" in external.reason
    lab = evaluate(case, "preferred", {"server_log": ["ICID 1 TLS failed: x"]}, external=False)
    assert lab.verdict is Verdict.OK


def test_external_target_runs_cases_without_lab_needs(tmp_path: Path) -> None:
    case = make_case(tmp_path, {"any": [{"verdict": "OK", "label": "l", "when": {"starttls_reply": 220}}]})
    assert evaluate(case, "preferred", {"starttls_reply": 220}, external=True).verdict is Verdict.OK


def test_policy_outside_the_case_is_skipped(tmp_path: Path) -> None:
    case = make_case(tmp_path, {"any": [{"verdict": "OK", "label": "l"}]}, policies=["preferred", "required"])
    assert evaluate(case, "no", {}, external=False).verdict is Verdict.SKIPPED
    assert evaluate(case, "required", {}, external=False).verdict is Verdict.OK


def test_an_alternative_may_declare_unimplemented(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        {
            "any": [
                {"verdict": "UNIMPLEMENTED", "label": "target closed before the banner", "when": {"connected": False}}
            ]
        },
    )
    assert evaluate(case, "no", {"connected": False}, external=True).verdict is Verdict.UNIMPLEMENTED


def test_lookup_walks_dotted_keys() -> None:
    observed = {"replies": {"MAIL/tls": 250, "x.y": 1}, "plaintext_exposure": {"body": False}}
    assert lookup(observed, "replies.MAIL/tls") == 250
    assert lookup(observed, "replies.x.y") == 1
    assert lookup(observed, "plaintext_exposure.body") is False
    assert lookup(observed, "replies.RCPT") is lookup(observed, "nothing")  # both MISSING
    assert lookup(observed, "plaintext_exposure.body.deeper") is lookup(observed, "nothing")


@pytest.mark.parametrize(
    ("policy", "plaintext", "verdict"),
    [
        ("required", True, Verdict.FAILED),
        ("required", False, Verdict.OK),
        ("preferred", True, Verdict.OK),
        ("no", True, Verdict.OK),
    ],
)
def test_plaintext_delivery_under_required_always_fails(
    tmp_path: Path, policy: str, plaintext: bool, verdict: Verdict
) -> None:
    """Whatever a case's alternatives say, Required taking mail in plaintext is FAILED, and says so."""
    case = make_case(tmp_path, {"any": [{"verdict": "OK", "label": "anything goes", "when": {}}]}, levels=("SHOULD",))
    result = evaluate(case, policy, {"delivered_plaintext": plaintext}, external=True)
    assert result.verdict is verdict
    if verdict is Verdict.FAILED:
        assert "plaintext delivery accepted under Required" in result.reason


def test_a_refusal_the_case_does_not_test_is_inconclusive(tmp_path: Path) -> None:
    """A 451 after the dot (a deferring queue) shows nothing about the case's MUST: ERROR naming it, not FAILED."""
    case = make_case(tmp_path, {"any": [{"verdict": "OK", "label": "delivered", "when": {"delivered": True}}]})
    observed = {"delivered": False, "replies": {"MAIL": 250, "RCPT": 250, "DATA": 354, "DOT/tls": 451}}
    evaluation = evaluate(case, "preferred", observed, external=True)
    assert evaluation.verdict is Verdict.ERROR
    assert "inconclusive" in evaluation.reason and "DOT/tls: 451" in evaluation.reason
    gate = {"delivered": False, "replies": {"MAIL": 530}}  # the Required gate is what cases test: still judged
    assert evaluate(case, "preferred", gate, external=True).verdict is Verdict.FAILED


def test_a_failed_alternative_must_cite_a_must_ref(tmp_path: Path) -> None:
    from lab.errors import BadInput

    bad = {"any": [{"verdict": "FAILED", "label": "bad", "when": {"tls": True}}]}
    with pytest.raises(BadInput, match="must cite a MUST ref"):
        make_case(tmp_path, bad, levels=("SHOULD",))  # no MUST among the refs to cite
    cited = {"any": [{"verdict": "FAILED", "ref": "RFC 3207 4 (SHOULD)", "label": "bad", "when": {"tls": True}}]}
    with pytest.raises(BadInput, match="must cite a MUST ref"):
        make_case(tmp_path, cited, levels=("SHOULD",))
    good = {"any": [{"verdict": "FAILED", "ref": "RFC 3207 4 (MUST)", "label": "bad", "when": {"tls": True}}]}
    assert make_case(tmp_path, good, levels=("MUST",)).expect.for_policy("no")[0].ref == "RFC 3207 4 (MUST)"
