"""Mail-log evidence (lab.scenario.logevents): events per dialect, gaps, and reading what a run appended."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import BadInput
from lab.scenario.loader import _CaseReader
from lab.scenario.logevents import DIALECTS, EVENTS, MailLogFile, observe, unlogged

#: Lines as Postfix 3.7.11 wrote them for lab.peers.postfix (smtpd_tls_loglevel = 1).
POSTFIX = [
    "Dec 02 07:55:05 postfix postfix/smtpd[22164]: connect from unknown[127.0.0.1]",
    "Dec 02 07:55:05 postfix postfix/smtpd[22164]: Anonymous TLS connection established from unknown[127.0.0.1]: "
    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519",
    "Dec 02 07:55:07 postfix postfix/qmgr[21270]: 4F0C820ECD5: from=<probe@smtplab.invalid>, size=312, nrcpt=1 "
    "(queue active)",
    "Dec 02 07:55:05 postfix postfix/smtpd[22164]: SSL_accept error from unknown[127.0.0.1]: -1",
    "Dec 02 08:01:12 postfix postfix/smtpd[26834]: Untrusted TLS connection established from unknown[127.0.0.1]: "
    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
]


def test_every_dialect_covers_every_event() -> None:
    for table in DIALECTS.values():
        assert set(table) == set(EVENTS)


def test_postfix_lines_give_the_events() -> None:
    seen = observe(POSTFIX, "postfix")
    assert seen == {
        "tls_success": True,
        "tls_failed": True,
        "client_cert_verified": False,
        "client_cert_unverified": True,
        "message_queued": 1,
    }
    assert observe(POSTFIX[:1], "postfix")["tls_success"] is False


def test_an_event_without_a_line_is_named_with_the_reason() -> None:
    assert unlogged("smtplab", ["injection_discarded"]) is None
    gap = unlogged("postfix", ["tls_success", "injection_discarded"])
    assert gap is not None and gap.startswith("the target's postfix mail log has no line for: plaintext pipelined")
    assert "tls_success" not in gap


def test_lines_since_reads_only_what_was_appended(tmp_path: Path) -> None:
    log = MailLogFile(tmp_path / "maillog", "postfix")
    log.path.write_text("old line\n")
    offset = log.settle()
    with log.path.open("a") as handle:
        handle.write(POSTFIX[0] + "\n" + POSTFIX[1] + "\n")
    assert log.lines_since(offset) == POSTFIX[:2]
    log.path.write_text("rotated\n")  # shorter than the offset: read from the start
    assert log.lines_since(offset + 1000) == ["rotated"]


def test_a_log_condition_names_a_known_event() -> None:
    doc = {
        "id": "POL-LOG-99",
        "title": "a test case",
        "refs": [{"ref": "RFC 3207 4", "level": "MUST", "text": "a sentence at stake"}],
        "description": "a description",
        "expectation": "an expectation",
        "client": {"host": "mta-prefer", "behaviour": "prefer"},
        "expect": {"any": [{"verdict": "OK", "label": "x", "when": {"log.tls_sucess": True}}]},
    }
    with pytest.raises(BadInput, match="log names an event"):
        _CaseReader(doc, "x.yaml").build()
    doc["expect"]["any"][0]["when"] = {"log.message_queued": True}
    with pytest.raises(BadInput, match="is a number"):
        _CaseReader(doc, "x.yaml").build()
    doc["expect"]["any"][0]["when"] = {"log.message_queued": 1, "log.tls_success": True}
    case = _CaseReader(doc, "x.yaml").build()
    assert case.log_events() == ["message_queued", "tls_success"]
    assert case.missing_facts({}) == ["maillog"] and case.missing_facts({"maillog": True}) == []
