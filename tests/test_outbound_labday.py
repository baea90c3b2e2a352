"""One virtual day of the built-in lab's outbound mail (lab.outbound.labday), and ``smtplab demo mta-sts`` that
shows it: MTA-STS enforce holds a message back from an MX whose certificate names another host, the TLS-RPT
report reaches the rua address, and the mail log reads back with ``smtplab track`` and ``smtplab tls-report``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.cli import main
from lab.outbound.labday import DayResult, outbound_day


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> DayResult:
    return outbound_day(tmp_path_factory.mktemp("day"))


def test_enforce_holds_the_message_until_the_certificate_names_the_mx(day: DayResult) -> None:
    texts = [line.split(": ", 1)[1] for line in day.log]
    refused = [
        t
        for t in texts
        if t.endswith("MTA-STS enforce mx mx.secure.example: certificate-host-mismatch - not delivered")
    ]
    assert len(refused) == 3
    assert texts.index("MTA-STS domain secure.example policy enforce max_age 86400 fetched") < texts.index(refused[0])
    assert [m.rcpt_to for m in day.received["mx.secure.example"]] == [
        ["carol@secure.example"],
        ["tlsrpt@secure.example"],
    ]
    assert all(m.tls for m in day.received["mx.secure.example"])
    assert not any("MTA-STS" in t and "partner.example" in t for t in texts)  # partner.example publishes nothing


def test_the_days_report_reaches_the_rua(day: DayResult) -> None:
    [sent] = day.reports
    assert sent.rua == ("mailto:tlsrpt@secure.example",)
    [policy] = day.report_json()["policies"]
    assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 3}
    assert policy["failure-details"][0]["failure-reason-code"] == "the certificate does not name mx.secure.example"


def test_the_lesson_runs_and_its_mail_log_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "mail.log"
    assert main(["demo", "mta-sts", "--no-pause", "--log", str(log)]) == 0
    shown = capsys.readouterr().out
    assert "TLS-RPT report esa.lab.example!secure.example!1796169600!1796255999!" in shown
    assert main(["track", "--log", str(log), "--to", "carol@secure.example", "--json"]) == 0
    [message] = json.loads(capsys.readouterr().out)
    assert len(message["deliveries"]) == 4
    assert main(["tls-report", "--log", str(log), "--json"]) == 0
    outgoing = {row["domain"]: row for row in json.loads(capsys.readouterr().out)["outgoing"]}
    assert (outgoing["secure.example"]["req_failed"], outgoing["secure.example"]["req_success"]) == (3, 2)


def test_a_log_file_that_cannot_be_written_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "mta-sts", "--no-pause", "--log", str(tmp_path / "no" / "such" / "dir.log")]) == 3
    assert "cannot write the mail log" in capsys.readouterr().err


def test_a_step_runs_a_case_or_a_day_not_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lesson = tmp_path / "lesson.yaml"
    head = "id: mine\ntitle: t\nintro: i\nsteps:\n  - narration: n\n    notice: w\n"
    for extra, problem in (
        ("    day: outbound\n    case: 3207-4-01\n    policy: required\n", "runs one of a case"),
        ("", "runs one of a case"),
        ("    case: 3207-4-01\n", "that runs a case gives both case and policy"),
    ):
        lesson.write_text(head + extra)
        assert main(["demo", "--no-pause", "--lesson-file", str(lesson)]) == 3
        assert f"lesson.yaml:5: steps[0]: a step {problem}" in capsys.readouterr().err
