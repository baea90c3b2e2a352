"""Views of one result record: terminal, index.json, junit.xml, index.html.

This module holds what every view shares (how hostile text is made visible, the counts line, which transcript
lines travelled in plaintext, where a failure happened) so that the four views tell the same story.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lab.errors import HarnessError
from lab.scenario.result import CaseRun, Level, RunResult
from lab.scenario.verdict import SpecRef, Verdict
from lab.smtp.transcript import Direction, Entry

INDEX_JSON = "index.json"
JUNIT_XML = "junit.xml"
INDEX_HTML = "index.html"

#: One letter per verdict, pytest-like, for the matrix and the legend.
GLYPHS: dict[Verdict, str] = {
    Verdict.OK: ".",
    Verdict.FAILED: "F",
    Verdict.NON_STRICT: "N",
    Verdict.INFORMATIONAL: "I",
    Verdict.UNIMPLEMENTED: "U",
    Verdict.XFAIL: "x",
    Verdict.XPASS: "X",
    Verdict.ERROR: "E",
    Verdict.SKIPPED: "s",
}

#: Verdicts whose details every view spells out (Expected / Actual / spec sentence / transcript).
PROBLEMS = (Verdict.FAILED, Verdict.XPASS, Verdict.ERROR)

_PASSED = (Verdict.OK, Verdict.XFAIL)
_FAILED = (Verdict.FAILED, Verdict.XPASS)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """Control characters (NUL, ESC, C1, lone surrogates) as ``\\xNN``: never executed by a terminal, valid XML."""
    return _CONTROL.sub(_escape_char, text)


def counts_line(result: RunResult) -> str:
    """``126 passed, 0 failed, 3 informational`` ("passed" = OK + XFAIL, "failed" = FAILED + XPASS)."""
    counts = result.counts()
    parts = [f"{sum(counts[v] for v in _PASSED)} passed", f"{sum(counts[v] for v in _FAILED)} failed"]
    for verdict, n in counts.items():
        if n and verdict not in _PASSED + _FAILED:
            parts.append(f"{n} {verdict.value.lower()}")
    return ", ".join(parts)


def line_kind(entry: Entry) -> str:
    """How a view marks a transcript entry: ``plain-sent``, ``tls-sent``, ``plain-recv``, ``tls-recv``, ``error``,
    ``note``: ``->`` / ``<-`` travelled unencrypted, ``~>`` / ``<~`` inside TLS, ``<**`` is an error, ``===`` a note.
    """
    if entry.direction is Direction.SENT:
        return "tls-sent" if entry.tls else "plain-sent"
    if entry.direction is Direction.RECEIVED:
        return "tls-recv" if entry.tls else "plain-recv"
    return "error" if entry.direction is Direction.ERROR else "note"


def _walk(value: Any) -> Iterable[str]:
    """Every key and string inside a conditions structure (whose shape belongs to the scenario format)."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield str(key)
            if str(key) == "replies" and isinstance(sub, dict):
                yield from (f"replies.{label}" for label in sub)
            yield from _walk(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from _walk(sub)
    elif isinstance(value, str):
        yield value


def referenced_keys(run: CaseRun) -> list[str]:
    """The observed keys the deciding expectation talks about, in observed order (all of them if none)."""
    words = set(_walk(run.expected.conditions)) if run.expected else set()
    named = {w.split(".")[0] for w in words} | words
    keys = [k for k in run.observed if k in named]
    return keys or list(run.observed)


def observed_facts(run: CaseRun, keys: list[str] | None = None) -> list[tuple[str, str]]:
    """``(key, value)`` pairs for display; mappings flattened one level (``replies.MAIL = 530``)."""
    out: list[tuple[str, str]] = []
    for key in keys if keys is not None else list(run.observed):
        value = run.observed[key]
        if isinstance(value, dict):
            out.extend((f"{key}.{sub}", _fact(v)) for sub, v in value.items())
        elif key == "server_log" and isinstance(value, list):
            out.append((key, f"{len(value)} events"))
        else:
            out.append((key, _fact(value)))
    return out


def _fact(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_fact(v) for v in value)
    return visible(str(value))


def refs_at_stake(run: CaseRun) -> list[SpecRef]:
    """The spec sentences the verdict rests on: MUST for FAILED, SHOULD for NON-STRICT, local policy for INFO."""
    level = {Verdict.FAILED: Level.MUST, Verdict.NON_STRICT: Level.SHOULD, Verdict.INFORMATIONAL: Level.LOCAL_POLICY}
    wanted = level.get(run.verdict)
    picked = [r for r in run.spec_refs if r.level is wanted]
    return picked or list(run.spec_refs)


def failing_step(run: CaseRun) -> int | None:
    """Index of the transcript entry where the case went wrong, or None when nothing points at one.

    First the command the deciding expectation names (``replies.MAIL``, ``MAIL/tls#2``), then the first error.
    """
    words = _walk(run.expected.conditions) if run.expected else []
    labels = [w.split(".", 1)[1] for w in words if w.startswith("replies.")]
    for label in labels:
        index = _sent_entry(run.transcript, label)
        if index is not None:
            return index
    return next((i for i, e in enumerate(run.transcript) if e.direction is Direction.ERROR), None)


def _sent_entry(transcript: list[Entry], label: str) -> int | None:
    """The entry that sent the command a reply label names (``MAIL/tls#2``: the second MAIL inside TLS)."""
    base, _, nth = label.partition("#")
    verb, _, layer = base.partition("/")
    wanted = int(nth) if nth.isdigit() else 1
    seen = 0
    for i, entry in enumerate(transcript):
        if entry.direction is not Direction.SENT or entry.tls != (layer == "tls"):
            continue
        words = entry.text.split()
        if words and words[0].upper() == verb.upper():
            seen += 1
            if seen == wanted:
                return i
    return None


def transcript_window(run: CaseRun, before: int = 6, after: int = 4) -> tuple[int, list[Entry]]:
    """``(first index, entries)`` around the failing step; the closing entries (where it ended) when none is known."""
    step = failing_step(run)
    if step is None:
        start = max(0, len(run.transcript) - before - after - 1)
        return start, run.transcript[start:]
    start = max(0, step - before)
    return start, run.transcript[start : step + after + 1]


def atomic_write(path: Path, data: bytes) -> Path:
    """Write beside the target and rename, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise HarnessError(f"cannot write {path}: {exc.strerror}") from None
    return path


def write_views(result: RunResult, report_dir: Path) -> dict[str, Path]:
    """junit.xml and index.html from the record (what ``smtplab report DIR`` rebuilds)."""
    # imported here: the view modules import the helpers above from this package
    from lab.report.html import write_html
    from lab.report.junit import write_junit

    report_dir = Path(report_dir)
    return {"junit": write_junit(result, report_dir / JUNIT_XML), "html": write_html(result, report_dir / INDEX_HTML)}


def write_reports(result: RunResult, report_dir: Path) -> dict[str, Path]:
    """index.json, junit.xml and index.html in ``report_dir`` (captures are the runner's, in captures/)."""
    from lab.report.jsonreport import write_index

    report_dir = Path(report_dir)
    return {"json": write_index(result, report_dir / INDEX_JSON), **write_views(result, report_dir)}
