"""``index.html``: one self-contained page a student can open from disk (no network, no external files).

jinja2 with autoescape renders ``templates/report.html.j2``; the context is built here, so the template only
lays out values that are already visible text. Links go only to relative paths (the captures beside the report).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from lab.policy.modes import POLICY_ORDER
from lab.report import (
    GLYPHS,
    PROBLEMS,
    atomic_write,
    counts_line,
    ladder,
    line_kind,
    observed_facts,
    referenced_keys,
    refs_at_stake,
    visible,
)
from lab.scenario.result import CaseRun, RunResult
from lab.scenario.verdict import ORDER, Verdict
from lab.smtp.transcript import Entry

#: Which verdict colours a matrix cell holding several: the most serious one present.
SEVERITY = (
    Verdict.FAILED,
    Verdict.XPASS,
    Verdict.ERROR,
    Verdict.NON_STRICT,
    Verdict.INFORMATIONAL,
    Verdict.UNIMPLEMENTED,
    Verdict.SKIPPED,
    Verdict.XFAIL,
    Verdict.OK,
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_LINE_LABELS = {
    "plain-sent": "PLAIN",
    "plain-recv": "PLAIN",
    "tls-sent": "TLS",
    "tls-recv": "TLS",
    "error": "ERROR",
    "note": "",
    "other": "",
}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lab.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["visible"] = visible
    return env


def relative_href(path: str | None) -> str | None:
    """A link target for a capture file, or None when the path is not a plain relative path (no scheme, no root)."""
    if not path or path.startswith(("/", "\\")) or _SCHEME.match(path) or "\\" in path:
        return None
    return quote(path, safe="/._-~")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def _line(entry: Entry) -> dict[str, str]:
    kind = line_kind(entry)
    return {"text": entry.line, "kind": kind, "label": _LINE_LABELS[kind]}


def _run_view(index: int, run: CaseRun) -> dict[str, Any]:
    diagram = ladder.of_run(run)
    return {
        "anchor": f"run-{index}-{_slug(run.name)}",
        "run": run,
        "glyph": GLYPHS[run.verdict],
        "problem": run.verdict in PROBLEMS,
        "key_facts": observed_facts(run, referenced_keys(run)),
        "all_facts": observed_facts(run),
        "server_log": run.observed.get("server_log") if isinstance(run.observed.get("server_log"), list) else [],
        "at_stake": refs_at_stake(run),
        "conditions": None
        if run.expected is None
        else json.dumps(run.expected.conditions, sort_keys=True, ensure_ascii=False),
        "lines": [_line(line) for line in run.transcript],
        "middlebox": diagram.middlebox,
        "ladder": ladder.svg(diagram, title=f"ladder diagram of {run.name} against {run.target}"),
        "plaintext_lines": sum(entry.plaintext for entry in run.transcript),
        "capture_href": relative_href(run.capture),
        "keylog_href": relative_href(run.keylog),
    }


def _matrices(result: RunResult, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_target: dict[str, list[dict[str, Any]]] = {}
    for view in views:
        by_target.setdefault(view["run"].target, []).append(view)
    out = []
    for target, items in by_target.items():
        present = {str(v["run"].policy) for v in items}
        policies = [p for p in POLICY_ORDER if p in present]
        behaviours = list(dict.fromkeys(v["run"].client for v in items))
        rows = [
            {
                "behaviour": behaviour,
                "cells": [
                    _cell([v for v in items if (v["run"].client, v["run"].policy) == (behaviour, p)]) for p in policies
                ],
            }
            for behaviour in behaviours
        ]
        out.append({"target": target, "policies": [str(p) for p in policies], "rows": rows})
    return out


def _cell(views: list[dict[str, Any]]) -> dict[str, Any]:
    """A matrix cell: its runs (glyph links), the count per verdict, and the most serious verdict (its colour)."""
    verdicts = [v["run"].verdict for v in views]
    worst = next((v for v in SEVERITY if v in verdicts), None)
    counts = [(verdict, verdicts.count(verdict)) for verdict in SEVERITY if verdict in verdicts]
    return {"runs": views, "counts": counts, "worst": worst}


def render_html(result: RunResult) -> str:
    views = [_run_view(i, run) for i, run in enumerate(result.runs, start=1)]
    counts = result.counts()
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            result=result,
            counts_line=counts_line(result),
            counts=[(v, counts[v]) for v in ORDER],
            glyphs=[(v, GLYPHS[v]) for v in ORDER],
            exit_code=result.exit_code(),
            matrices=_matrices(result, views),
            views=views,
            problems=[v for v in views if v["problem"]],
        )
    )


def write_html(result: RunResult, path: Path) -> Path:
    return atomic_write(Path(path), render_html(result).encode("utf-8"))
