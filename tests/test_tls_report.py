"""``smtplab tls-report``: incoming and outgoing TLS per domain, counted from a served mail log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_track import write_lab_log

from lab.cli import main

Row = dict[str, object]


@pytest.fixture(scope="module")
def lab_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_lab_log(tmp_path_factory.mktemp("served"))


def by_domain(rows: list[Row]) -> dict[object, Row]:
    return {row["domain"]: row for row in rows}


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, list[Row]]:
    assert main(["tls-report", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_incoming_counts_required_apart_from_preferred(
    lab_log: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = report_json(capsys, "--log", str(lab_log[0]), "--config", str(lab_log[1]))
    rows = by_domain(data["incoming"])
    assert set(rows) == {"partner.example", "secure.example", "198.51.100.20", "Total"}  # the blocked peer: none
    assert rows["partner.example"] == {
        "domain": "partner.example",
        "req_failed": 1,  # the session that sent MAIL without STARTTLS (530)
        "req_success": 1,
        "pref_failed": 0,
        "pref_success": 0,
        "total_tls": 2,
        "unencrypted": 0,
        "messages_tls": 1,
        "percent_tls": 100.0,
    }
    assert (rows["secure.example"]["pref_success"], rows["secure.example"]["messages_tls"]) == (1, 1)
    assert (rows["198.51.100.20"]["unencrypted"], rows["198.51.100.20"]["percent_tls"]) == (1, 0.0)
    assert data["incoming"][-1] == {
        "domain": "Total",
        "req_failed": 1,
        "req_success": 1,
        "pref_failed": 0,
        "pref_success": 1,
        "total_tls": 3,
        "unencrypted": 1,
        "messages_tls": 2,
        "percent_tls": 75.0,
    }


def test_outgoing_counts_by_destination_control(lab_log: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = report_json(capsys, "--log", str(lab_log[0]), "--config", str(lab_log[1]))
    [row, total] = data["outgoing"]
    assert row == {
        "domain": "example.com",
        "req_failed": 1,  # Required (Verify), certificate unverified: delayed
        "req_success": 1,
        "pref_failed": 0,
        "pref_success": 0,
        "total_tls": 2,
        "unencrypted": 1,  # Preferred, STARTTLS not offered: delivered in clear
        "messages_tls": 1,
        "percent_tls": 66.7,
    }
    assert total == {**row, "domain": "Total"}


def test_without_config_the_default_appliance_decides(
    lab_log: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The built-in appliance has no policy of WHITELIST's at Required: its TLS sessions count as preferred."""
    rows = by_domain(report_json(capsys, "--log", str(lab_log[0]))["incoming"])
    assert rows["partner.example"]["req_success"] == 0
    assert rows["Total"]["total_tls"] + rows["Total"]["unencrypted"] == 4


def test_terminal_and_html(lab_log: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "tls.html"
    code = main(["tls-report", "--log", str(lab_log[0]), "--config", str(lab_log[1]), "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Incoming TLS connections" in out and "Outgoing TLS connections" in out
    assert re.search(r"partner\.example +1 +1 +0 +0 +2 +0 +1 +100\.0", out)
    assert re.search(r"Total +1 +1 +0 +1 +3 +1 +2 +75\.0", out)
    assert all(len(line) <= 100 for line in out.splitlines())
    html = page.read_text()
    assert "default-src 'none'" in html and "<svg" in html and "http" not in html.replace("http-equiv", "")
    assert "<th>TLS Req. Failed</th>" in html and "<th>% TLS attempted</th>" in html
    assert "<title>Required, success: 1</title>" in html and "<title>Unencrypted: 1</title>" in html


def test_hostile_names_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "mail.log"
    log.write_text(
        "Tue Dec  1 09:00:00 2026 Info: New SMTP ICID 1 interface PublicNet (192.168.2.1) address 192.0.2.9"
        " reverse dns host mx.<script>.example verified yes\n"
        "Tue Dec  1 09:00:00 2026 Info: ICID 1 ACCEPT SG ALL match ALL\n"
    )
    page = tmp_path / "t.html"
    assert main(["tls-report", "--log", str(log), "--html", str(page)]) == 0
    html = page.read_text()
    assert "<script>" not in html and '<td class="mono">&lt;script&gt;.example</td>' in html
    assert "<title>Unencrypted: 1</title>" in html


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "mail.log"
    log.write_text("Tue Dec  1 09:00:00 2026 Info: DCID 1 close\nnot a log line\n")
    assert main(["tls-report", "--log", str(log)]) == 3
    assert capsys.readouterr().err == f"smtplab: {log}:2: not a mail log line: 'not a log line\\n'\n"
