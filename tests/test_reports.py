"""Every view of the record: terminal summary, junit.xml, index.html, write_reports and `smtplab report DIR`."""

from __future__ import annotations

import argparse
import io
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_result import HOSTILE, _run, sample_result

import lab.cli
from lab.commands import report as report_command
from lab.report import counts_line, failing_step, transcript_window, visible, write_reports
from lab.report.html import relative_href, render_html
from lab.report.junit import junit_bytes
from lab.report.terminal import ProgressReporter, make_console, render, summary_text
from lab.scenario.result import CaseRun, Expected, RunResult, Target
from lab.scenario.verdict import Verdict


def _result(runs: list[CaseRun], **kw: object) -> RunResult:
    fields: dict[str, object] = {"seed": 7, "carrier": "memory", "targets": [Target("lab:Inboundmail", "x", None)]}
    fields.update(kw)
    return RunResult(runs=runs, **fields)  # type: ignore[arg-type]


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- shared helpers ---------------------------------------------------------------------------------------------


def test_visible_escapes_control_characters_but_keeps_text() -> None:
    assert visible("a\x00b\x1b[31mc\r\x7f\x85\ud800") == "a\\x00b\\x1b[31mc\\x0d\\x7f\\x85\\ud800"
    assert visible("tab\tand ünïcode ✓") == "tab\tand ünïcode ✓"


def test_counts_line_form() -> None:
    assert counts_line(sample_result()) == "4 passed, 2 failed, 1 informational, 1 unimplemented, 1 error"
    runs = [_run(f"C-{i}", "required", Verdict.OK) for i in range(126)]
    runs += [_run(f"I-{i}", "required", Verdict.INFORMATIONAL) for i in range(3)]
    runs += [_run(f"U-{i}", "no", Verdict.UNIMPLEMENTED) for i in range(2)]
    assert counts_line(_result(runs)) == "126 passed, 0 failed, 3 informational, 2 unimplemented"
    assert counts_line(_result([])) == "0 passed, 0 failed"


def test_failing_step_is_the_command_the_expectation_names() -> None:
    filler = [" ~> NOOP", "<~  250 ok"] * 15
    transcript = [" -> EHLO a", "<-  250 STARTTLS", " -> STARTTLS", "<-  220 go", *filler]
    transcript += [" ~> MAIL FROM:<a@b>", "<~  250 ok", " ~> MAIL FROM:<c@d>", "<~  250 ok", " ~> QUIT"]
    run = _run(
        "X-1",
        "required",
        Verdict.FAILED,
        transcript=transcript,
        expected=Expected(Verdict.FAILED, "second MAIL accepted", {"replies": {"MAIL/tls#2": 250}}),
    )
    assert failing_step(run) == len(transcript) - 3
    start, entries = transcript_window(run)
    window = [entry.line for entry in entries]
    assert " ~> MAIL FROM:<c@d>" in window
    assert transcript[0] not in window
    assert start > 0
    no_hint = _run("X-2", "no", Verdict.ERROR, expected=None, transcript=[" -> EHLO a", "<** timeout after 30 s"])
    assert failing_step(no_hint) == 1


# --- terminal ---------------------------------------------------------------------------------------------------


def test_terminal_summary_ends_with_the_counts_line_alone() -> None:
    text = summary_text(sample_result())
    assert text.endswith("\n")
    assert text.rstrip("\n").splitlines()[-1] == "4 passed, 2 failed, 1 informational, 1 unimplemented, 1 error"


def test_terminal_spells_out_each_problem() -> None:
    text = summary_text(sample_result())
    block = text[text.index("FAILED 3207-4-03[required]") : text.index("XPASS ATK-STRIP-01")]
    assert "Expected: Under Required, MAIL before STARTTLS gets 530" in block
    assert "Actual:   MAIL was accepted in plaintext under Required" in block
    assert "replies.MAIL=250" in block
    assert 'Spec SPEC 2 Required (MUST): "before TLS is up only EHLO' in block
    assert " -> MAIL FROM:<a@example.net>" in block
    assert "Capture: captures/3207-4-03-required.pcap" in block
    assert "Declared deviation: postfix-may falls back" in text
    assert "ERROR 3207-4-12[no]" in text
    assert "<** connection refused" in text


def test_terminal_matrix_has_behaviours_by_policy() -> None:
    text = summary_text(sample_result())
    row = next(line for line in text.splitlines() if "misbehaving-mail-first" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["misbehaving-mail-first", "", ".", ".F"]  # no / preferred / required
    assert "target postfix-may" in text
    assert re.search(r"│ prefer\s+│ Xx\s+│", text)


def test_terminal_plain_output_has_no_escape_codes_and_ignores_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    narrow = summary_text(sample_result())
    monkeypatch.setenv("COLUMNS", "300")
    wide = summary_text(sample_result())
    assert narrow == wide
    assert "\x1b" not in narrow
    assert "\x00" not in narrow
    assert "\\x00\\x1b[2J\\x1b]0;pwned\\x07" in narrow  # the hostile bytes, made visible
    assert all(line == line.rstrip() for line in narrow.splitlines() if not line.startswith("│"))


def test_terminal_colour_on_a_tty_still_neutralises_hostile_escapes() -> None:
    out = _FakeTTY()
    render(sample_result(), make_console(out))
    text = out.getvalue()
    assert "\x1b[" in text  # colour is on
    assert "\x1b[2J" not in text and "\x1b]0;" not in text and "\x00" not in text
    assert "[2J" in text  # shown, escaped


def test_progress_is_silent_off_a_tty() -> None:
    out = io.StringIO()
    with ProgressReporter(3, file=out) as progress:
        for name in ("a[no]", "b[no]", "c[no]"):
            progress.advance(name)
    assert progress.done == 3
    assert out.getvalue() == ""
    tty = _FakeTTY()
    with ProgressReporter(2, description="cases", file=tty) as progress:
        progress.advance("a[no]")
        progress.advance("b[no]")
    assert progress.enabled
    assert "cases" in tty.getvalue()


# --- junit ------------------------------------------------------------------------------------------------------


def _junit(result: RunResult) -> ET.Element:
    return ET.fromstring(junit_bytes(result))


def test_junit_counts_and_suites() -> None:
    root = _junit(sample_result())
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("9", "2", "1", "1")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["RFC 3207 4", "POL", "ATK"]
    rfc = suites["RFC 3207 4"]
    assert (rfc.get("tests"), rfc.get("failures"), rfc.get("errors"), rfc.get("skipped")) == ("6", "1", "1", "1")
    assert len(rfc.findall("testcase")) == 6
    atk = suites["ATK"]
    assert (atk.get("tests"), atk.get("failures"), atk.get("errors"), atk.get("skipped")) == ("2", "1", "0", "0")
    assert {c.get("classname") for c in rfc.iter("testcase")} == {"smtplab.RFC_3207_4"}


def test_junit_outcomes_per_verdict() -> None:
    root = _junit(sample_result())
    cases = {c.get("name"): c for c in root.iter("testcase")}
    failed = cases["3207-4-03[required@lab:Inboundmail]"].find("failure")
    assert failed is not None and failed.get("type") == "FAILED"
    assert failed.get("message") == "MAIL was accepted in plaintext under Required"
    assert "Expected: Under Required" in (failed.text or "")
    assert "Actual: MAIL was accepted" in (failed.text or "")
    assert 'SPEC 2 Required (MUST): "before TLS is up' in (failed.text or "")
    xpass = cases["ATK-STRIP-01[preferred@postfix-may]"].find("failure")
    assert xpass is not None and xpass.get("type") == "XPASS"
    assert "Declared deviation" in (xpass.text or "")
    error = cases["3207-4-12[no@lab:Inboundmail]"].find("error")
    assert error is not None and error.get("message") == "harness: the listener did not start"
    skipped = cases["3207-4-10[no@lab:Inboundmail]"].find("skipped")
    assert skipped is not None and "no certificate the lab CA can verify" in (skipped.get("message") or "")
    info = cases["POL-REQ-01[required@lab:Inboundmail]"]
    assert info.find("failure") is None and info.find("skipped") is None
    notes = {p.get("name"): p.get("value") for p in info.iter("property")}
    assert notes["verdict"] == "INFORMATIONAL"
    assert notes["note"].startswith("INFORMATIONAL: Required on a public MX")
    xfail = cases["ATK-STRIP-02[preferred@postfix-may]"]
    assert xfail.find("failure") is None and xfail.find("skipped") is None
    ok = cases["3207-4-02[required@lab:Inboundmail]"]
    assert [child.tag for child in ok] == ["properties", "system-out"]


def test_junit_survives_hostile_transcripts() -> None:
    result = sample_result()
    nasty = _run("3207-4-99", "no", Verdict.FAILED, transcript=[HOSTILE, "<-  lone \ud83d surrogate \ufffe"])
    result = RunResult(**{**result.__dict__, "runs": [*result.runs, nasty]})
    data = junit_bytes(result)
    assert b"\x00" not in data and b"\x1b" not in data
    root = ET.fromstring(data)  # would raise on any character XML 1.0 forbids
    out = next(c for c in root.iter("testcase") if c.get("name", "").startswith("3207-4-03")).find("system-out")
    assert out is not None
    assert "\\x00\\x1b[2J" in (out.text or "")
    assert "<script>alert(1)</script>" in (out.text or "")  # escaped by XML, restored by the parser
    assert b"<script>" not in data


def test_junit_names_with_one_target_are_case_and_policy() -> None:
    root = _junit(_result([_run("3207-4-02", "required", Verdict.OK), _run("3207-4-02", "no", Verdict.OK)]))
    assert [c.get("name") for c in root.iter("testcase")] == ["3207-4-02[required]", "3207-4-02[no]"]


# --- html -------------------------------------------------------------------------------------------------------


class _Tags(HTMLParser):
    """Counts start tags and checks that every non-void element is closed in order."""

    VOID = {"meta", "br", "input", "link", "img", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.starts: dict[str, int] = {}
        self.attrs: list[tuple[str, str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts[tag] = self.starts.get(tag, 0) + 1
        self.attrs += [(tag, name, value) for name, value in attrs]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def _parse(html: str) -> _Tags:
    tags = _Tags()
    tags.feed(html)
    tags.close()
    assert tags.stack == []
    return tags


def test_html_is_self_contained() -> None:
    benign = _result([_run("3207-4-02", "required", Verdict.OK, capture="captures/a.pcap")])
    html = render_html(benign)
    assert "http://" not in html and "https://" not in html
    tags = _parse(render_html(sample_result()))
    assert tags.starts.get("script") == 1  # the inline filter, nothing else
    assert "link" not in tags.starts and "img" not in tags.starts and "iframe" not in tags.starts
    assert not [a for a in tags.attrs if a[1] == "src"]
    hrefs = [value or "" for _, name, value in tags.attrs if name == "href"]
    assert hrefs and all(h.startswith(("#", "captures/")) for h in hrefs)
    assert "default-src 'none'" in html or "default-src 'none'" in render_html(sample_result())


def test_html_escapes_hostile_text() -> None:
    result = sample_result()
    evil = _run(
        "3207-4-98",
        "no",
        Verdict.FAILED,
        title='<img src=x onerror="alert(1)">',
        client="</table><script>alert(2)</script>",
        description="{{ 7*7 }} \x1b[31m",
        capture="javascript:alert(3)",
        keylog="/etc/passwd",
    )
    html = render_html(RunResult(**{**result.__dict__, "runs": [*result.runs, evil]}))
    assert "\x00" not in html and "\x1b" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # from the transcript
    assert "&lt;img src=x onerror=" in html
    assert "{{ 7*7 }} \\x1b[31m" in html
    assert 'href="javascript' not in html and 'href="/etc' not in html
    tags = _parse(html)
    assert tags.starts.get("script") == 1 and "img" not in tags.starts
    assert relative_href("captures/x y.pcap") == "captures/x%20y.pcap"
    assert relative_href("http://evil/x") is None and relative_href("C:\\x") is None


def test_html_shows_each_case_with_prose_refs_transcript_and_capture() -> None:
    html = render_html(sample_result())
    section = html[html.index('id="run-3-3207-4-03-required"') :]
    section = section[: section.index("</section>")]
    assert "DESCRIPTION" in section and "The client sends MAIL before STARTTLS." in section
    assert "EXPECTATION" in section and "MAIL before STARTTLS gets 530" in section
    assert '<b>RFC 3207 4</b> <span class="badge">SHOULD</span>' in section
    assert "MUST</span> <i>(at stake)</i>" in section
    assert "MAIL was accepted in plaintext under Required" in section
    assert '<a href="captures/3207-4-03-required.pcap">' in section
    assert '<a href="captures/3207-4-03-required.keys">' in section
    assert '<div class="line plain-sent"><span class="tag">PLAIN</span> -&gt; MAIL FROM:' in section
    tls = html[html.index('id="run-8-3207-4-11-preferred"') :]
    tls = tls[: tls.index("</section>")]
    assert '<div class="line tls-sent"><span class="tag">TLS</span> ~&gt; MAIL FROM:' in tls
    assert '<div class="line tls-recv"><span class="tag">TLS</span>&lt;~  250 2.1.0 ok' in tls
    assert "(10 lines, 5 in plaintext)" in tls
    assert '<p class="counts exit-1" id="counts">4 passed, 2 failed, 1 informational, 1 unimplemented, 1 error' in html
    assert 'href="#run-3-3207-4-03-required"' in html  # matrix and problem list link to the case


# --- files and the command ----------------------------------------------------------------------------------------


def test_write_reports_writes_three_deterministic_files(tmp_path: Path) -> None:
    first = write_reports(sample_result(), tmp_path / "a")
    second = write_reports(sample_result(), tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["index.html", "index.json", "junit.xml"]
    for kind in ("json", "junit", "html"):
        assert first[kind].read_bytes() == second[kind].read_bytes()


def test_report_command_rebuilds_views_from_index_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = write_reports(sample_result(), tmp_path)
    originals = {k: p.read_bytes() for k, p in written.items()}
    written["junit"].unlink()
    written["html"].write_text("stale")
    code = report_command.run(argparse.Namespace(dir=tmp_path))
    assert code == 1
    assert written["junit"].read_bytes() == originals["junit"]
    assert written["html"].read_bytes() == originals["html"]
    assert written["json"].read_bytes() == originals["json"]
    out = capsys.readouterr().out
    assert out.rstrip("\n").splitlines()[-1] == "4 passed, 2 failed, 1 informational, 1 unimplemented, 1 error"
    assert "\x1b" not in out


@pytest.mark.parametrize(
    ("verdicts", "code"),
    [([Verdict.OK, Verdict.XFAIL, Verdict.INFORMATIONAL], 0), ([Verdict.OK, Verdict.ERROR], 2), ([Verdict.XPASS], 1)],
)
def test_report_command_exit_code_is_the_records(tmp_path: Path, verdicts: list[Verdict], code: int) -> None:
    runs = [_run(f"C-{i}", "required", v, deviation="declared") for i, v in enumerate(verdicts)]
    write_reports(_result(runs), tmp_path)
    assert report_command.run(argparse.Namespace(dir=tmp_path)) == code


def _smtplab(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """Through the real dispatcher; registering the subcommand in lab/cli.py is the lead's."""
    monkeypatch.setitem(lab.cli.COMMANDS, "report", "report")
    return lab.cli.main(list(argv))


def test_smtplab_report_bad_input_is_one_line_and_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _smtplab(monkeypatch, "report", str(tmp_path)) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.json" in err and "no such file" in err
    (tmp_path / "index.json").write_text('{"schema_version": 5}')
    assert _smtplab(monkeypatch, "report", str(tmp_path)) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema_version: unsupported schema_version 5" in err
    (tmp_path / "index.json").write_text("{not json")
    assert _smtplab(monkeypatch, "report", str(tmp_path)) == 3
    assert "not JSON" in capsys.readouterr().err
    assert not (tmp_path / "junit.xml").exists()


def test_smtplab_report_exit_0_and_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_reports(sample_result(), tmp_path / "fail")
    write_reports(_result([_run("C-1", "no", Verdict.OK)]), tmp_path / "clean")
    assert _smtplab(monkeypatch, "report", str(tmp_path / "fail")) == 1
    assert _smtplab(monkeypatch, "report", str(tmp_path / "clean")) == 0
