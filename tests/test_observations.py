"""The typed result record: one definition of the observations, from which the schema, the docs table and the
evaluator's key list come; transcript entries whose text view is the swaks-style lines; older records upgraded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lab.cli import main
from lab.errors import BadInput
from lab.scenario.model import LAB_ONLY_KEYS, OBSERVATION_KEYS
from lab.scenario.observations import Observations, ValueKind, docs_table, json_schema, value_kinds
from lab.scenario.result import SCHEMA_VERSION, index_schema, load_index
from lab.smtp.transcript import Direction, Entry, Kind, Transcript, from_legacy_line

ROOT = Path(__file__).resolve().parent.parent
OLD_INDEX = Path(__file__).parent / "data" / "index-v1.json"


def test_the_shipped_schema_is_the_derived_one() -> None:
    assert index_schema()["$defs"]["observed"] == json_schema()


def test_the_docs_table_is_the_derived_one() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert docs_table() in text, (
        "regenerate with: python -c 'from lab.scenario.observations import *; print(docs_table())'"
    )


def test_the_evaluator_keys_are_the_derived_ones() -> None:
    assert value_kinds() == OBSERVATION_KEYS
    assert OBSERVATION_KEYS["replies"] is ValueKind.CODES and OBSERVATION_KEYS["replies"] == "codes"
    assert LAB_ONLY_KEYS == {"spooled": "spool", "server_log": "server-log"}


def test_the_schema_lists_every_entry_kind() -> None:
    entry = index_schema()["$defs"]["entry"]["properties"]
    assert entry["kind"]["enum"] == [*(str(k) for k in Kind), None]
    assert entry["direction"]["enum"] == [str(d) for d in Direction]


def test_observations_read_as_a_mapping_of_the_present_keys() -> None:
    obs = Observations.for_client()
    obs.replies = {"EHLO": 250, "MAIL/tls": 530}
    obs.plaintext_exposure = {"envelope": False, "body": False}
    assert "banner" not in obs and obs.get("banner") is None
    assert obs["replies"]["MAIL/tls"] == 530
    assert list(obs)[:2] == ["connected", "tls"]  # definition order
    again = Observations.from_dict({**obs.to_dict(), "vendor_note": "kept"})
    assert again == {**obs.to_dict(), "vendor_note": "kept"} and again.extra == {"vendor_note": "kept"}


def test_entries_render_the_swaks_lines() -> None:
    transcript = Transcript()
    transcript.note("Trying 192.0.2.1:25...", Kind.TRYING)
    transcript.received(b"220 mx ESMTP", tls=False, size=14)
    transcript.sent(b"EHLO a\r\nX\x00\n", tls=True)
    transcript.error("timeout: no reply", Kind.TIMEOUT)
    assert transcript.lines == [
        "=== Trying 192.0.2.1:25...",
        "<-  220 mx ESMTP",
        " ~> EHLO a",
        " ~> X\\x00\\n",
        "<** timeout: no reply",
    ]
    assert [e.size for e in transcript.entries] == [None, 14, 8, 3, None]
    for entry in transcript.entries:
        assert Entry.from_dict(entry.to_dict()) == entry
        assert from_legacy_line(entry.line).line == entry.line


def test_a_long_body_is_summarised_by_a_summary_entry() -> None:
    transcript = Transcript()
    transcript.sent(b"".join(b"line %d\r\n" % i for i in range(30)), tls=False, max_lines=20)
    last = transcript.entries[-1]
    assert last.kind is Kind.SUMMARY and last.line == " -> [... 10 more lines, 260 bytes in all]"


def test_a_version_1_record_is_upgraded_for_report_and_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = json.loads(OLD_INDEX.read_text())
    assert old["schema_version"] == 1 and isinstance(old["runs"][0]["transcript"][0], str)
    result = load_index(OLD_INDEX)
    assert result.schema_version == SCHEMA_VERSION
    for run, stored in zip(result.runs, old["runs"], strict=True):
        assert run.lines == stored["transcript"]  # the same text, now from entries
    tls = [e for e in result.runs[1].transcript if e.direction is Direction.SENT and e.tls]
    assert tls and tls[0].text.startswith("EHLO")
    logged = result.runs[1].observed["server_log"]  # server-log lines (versions 1 and 2) read back as events
    assert [e["line"] for e in logged] == old["runs"][1]["observed"]["server_log"]
    assert logged[2] == {
        "event": "tls_success",
        "fields": {"icid": 1, "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        "line": "Info: ICID 1 TLS success protocol TLSv1.3 cipher TLS_AES_256_GCM_SHA384",
    }
    report = tmp_path / "old"
    report.mkdir()
    shutil.copy(OLD_INDEX, report / "index.json")
    assert main(["report", str(report)]) == result.exit_code()
    assert "<~  " in (report / "junit.xml").read_text() or "~&gt;" in (report / "junit.xml").read_text()
    capsys.readouterr()
    assert main(["diff", str(report), str(report)]) == 0
    assert "unchanged" in capsys.readouterr().out


def test_a_version_2_record_with_a_foreign_server_log_line_names_it(tmp_path: Path) -> None:
    data = json.loads(OLD_INDEX.read_text())
    data["schema_version"] = 2
    data["runs"][1]["observed"]["server_log"][1] = "Info: something the grammar does not know"
    path = tmp_path / "index.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadInput) as caught:
        load_index(path)
    assert caught.value.field == "runs[1].observed.server_log[1]"
    assert "unknown mail log event" in str(caught.value)
