"""``smtplab demo``: every shipped lesson runs to its expected verdicts through the real CLI and runner, and a
teacher's bad or wrong lesson file gets exit 3 (one line) or 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lab.demo import builtin_lessons

ROOT = Path(__file__).resolve().parent.parent


def smtplab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_every_lesson_runs_as_expected() -> None:
    done = smtplab("demo", "--no-pause")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    out = done.stdout
    ids = [lesson.id for lesson in builtin_lessons()]
    assert ids == ["tls-settings", "stripping", "injection-and-smuggling", "outbound", "mta-sts"]
    for lesson_id in ids:
        assert f"=== Lesson {lesson_id}:" in out
    assert "lessons: 5 as expected, 0 not" in out
    assert "|------------------------>|   EHLO" in out  # a plaintext arrow
    assert "|~~~~~~~~~~~~~~~~~~~~~~~~>|   MAIL FROM" in out  # a TLS arrow
    assert "[=TLS=]" in out
    assert "lanes, left to right: client prefer | firewall | listener lab:Inboundmail" in out
    assert "  Info: ICID 1 TLS success protocol TLSv1.3" in out  # mail-log lines of the runs
    assert "  Warning: ICID 1 STARTTLS command injection: discarded" in out
    assert "530 5.7.0 Must issue a STARTTLS command first" in out
    assert "[1]> 2" in out and "Changes committed to appliance.yaml." in out  # the CLI transcript
    assert "verdict: INFORMATIONAL: downgraded" in out
    assert "! verdict" not in out


def test_the_lesson_schema_knows_every_receiver_mode() -> None:
    import json

    from lab.appliance_cli.delivery import RECEIVER_MODES

    schema = json.loads((ROOT / "lab" / "schemas" / "lesson.schema.json").read_text())
    delivery = schema["properties"]["steps"]["items"]["properties"]["delivery"]
    assert delivery["properties"]["receivers"]["additionalProperties"]["enum"] == list(RECEIVER_MODES)


def test_the_outbound_lesson_shows_each_delivery_on_the_wire() -> None:
    done = smtplab("demo", "--no-pause", "outbound")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    steps = done.stdout.split("--- outbound, step ")[1:]
    assert len(steps) == 4
    first, preferred, required, verify = steps
    # the destination controls, then a delivery over TLS under Required
    assert "    bank.example      Required            500" in first
    assert "|=========[=TLS=]=========|   TLS started with cipher TLSv1.3" in first
    assert "|~~~~~~~~~~~~~~~~~~~~~~~~>|   MAIL FROM:<postmaster@esa.lab.example>" in first
    assert "result: delivered (over TLS)" in first
    # Preferred to a receiver without STARTTLS: the message crosses in the clear
    assert "  [3]> 2" in preferred and "Changes committed to appliance.yaml." in preferred
    assert "destination control for bank.example: TLS Preferred" in preferred
    assert "|------------------------>|   MAIL FROM:<postmaster@esa.lab.example>" in preferred
    assert "Info: DCID 1 STARTTLS command not supported" in preferred
    assert "result: delivered (in the clear)" in preferred and "alert mailbox" not in preferred
    # Required, the same receiver: QUIT after EHLO, the warning, the Delayed line, the alert message
    assert "destination control for bank.example: TLS Required" in required
    assert "|------------------------>|   QUIT" in required and "MAIL FROM" not in required
    assert "Warning: DCID 1 IP 198.51.100.40 TLS was required but could not be successfully negotiated" in required
    assert "Info: Delayed: DCID 1 MID 1 to RID 0" in required
    assert "alert mailbox postmaster@example.com" in required
    assert "  Subject: Warning <System> esa.lab.example: TLS required for bank.example failed" in required
    assert "result: deferred (nothing sent)" in required
    # Required (Verify) against a certificate for another name: TLS up, then QUIT inside TLS
    assert "presents a lab-CA certificate for another name (wrong.name.example)" in verify
    assert "|~~~~~~~~~~~~~~~~~~~~~~~~>|   QUIT" in verify and "MAIL FROM" not in verify
    assert "Warning: DCID 1 TLS certificate unverified: certificate-host-mismatch" in verify
    assert "TLS required for secure.example failed" in verify
    assert "lessons: 1 as expected, 0 not" in done.stdout


def test_list_names_the_lessons() -> None:
    done = smtplab("demo", "--list")
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == [lesson.id for lesson in builtin_lessons()]


LESSON = """\
id: mine
title: a teacher's lesson
intro: one step
steps:
  - narration: the skip client under Required
    case: 3207-4-01
    policy: required
    expect: {expect}
    notice: the 530
"""


def test_bad_lesson_file_is_one_line_and_exit_3(tmp_path: Path) -> None:
    lesson = tmp_path / "bad.yaml"
    lesson.write_text(LESSON.format(expect="OK").replace("policy: required", "policy: sometimes"))
    done = smtplab("demo", "--no-pause", "--lesson-file", str(lesson))
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"smtplab: {lesson}:7: steps[0].policy: 'sometimes' is not one of no, preferred, required"
    ]


def test_a_delivery_step_expecting_otherwise_fails_the_lesson(tmp_path: Path) -> None:
    lesson = tmp_path / "mine.yaml"
    lesson.write_text(
        "id: mine\ntitle: t\nintro: i\nsteps:\n  - narration: n\n    notice: o\n"
        "    delivery: {domain: bank.example, receivers: {mx.bank.example: no-starttls}, expect: delivered}\n"
    )
    done = smtplab("demo", "--no-pause", "--lesson-file", str(lesson))
    assert done.returncode == 1
    assert "! the message was deferred, the lesson expects delivered" in done.stdout


def test_a_step_with_a_case_and_a_delivery_is_one_line_and_exit_3(tmp_path: Path) -> None:
    lesson = tmp_path / "bad.yaml"
    lesson.write_text(LESSON.format(expect="OK") + "    delivery: {domain: bank.example}\n")
    done = smtplab("demo", "--no-pause", "--lesson-file", str(lesson))
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        f"smtplab: {lesson}:5: steps[0]: a step runs one of a case (case, policy), a delivery or a day"
    ]
    lesson.write_text(
        "id: mine\ntitle: t\nintro: i\nsteps:\n  - narration: n\n    notice: o\n"
        "    delivery: {domain: bank.example, receivers: {mx.bank.example: sometimes}}\n"
    )
    done = smtplab("demo", "--no-pause", "--lesson-file", str(lesson))
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        f"smtplab: {lesson}:7: steps[0].delivery.receivers.mx.bank.example: 'sometimes' is not one of tls, "
        "no-starttls, 454, garbage-after-220, handshake-fail, wrong-name, untrusted"
    ]


def test_unknown_case_is_named_at_its_line(tmp_path: Path) -> None:
    lesson = tmp_path / "bad.yaml"
    lesson.write_text(LESSON.format(expect="OK").replace("3207-4-01", "NOPE-1"))
    done = smtplab("demo", "--no-pause", "--lesson-file", str(lesson))
    assert done.returncode == 3
    assert done.stderr.startswith(f"smtplab: {lesson}:6: steps[0].case: no case 'NOPE-1' in the catalogue")
    assert len(done.stderr.splitlines()) == 1


def test_wrong_expectation_exits_1(tmp_path: Path) -> None:
    lesson = tmp_path / "wrong.yaml"
    lesson.write_text(LESSON.format(expect="OK"))
    done = smtplab("demo", "--no-pause", "--lesson-file", str(lesson))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "! verdict INFORMATIONAL, the lesson expects OK" in done.stdout
    assert "lessons: 0 as expected, 1 not (mine)" in done.stdout
    right = tmp_path / "right.yaml"
    right.write_text(LESSON.format(expect="INFORMATIONAL"))
    done = smtplab("demo", "--lesson-file", str(right))  # no --no-pause: stdin is not a terminal, so no waiting
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[Enter]" not in done.stdout
