"""``junit.xml``: one ``<testsuite>`` per spec section, one ``<testcase>`` per case x policy (x target).

CI systems read this; the mapping of verdicts to JUnit outcomes is in docs/report-format.md. Transcripts come
from hostile peers, so every string goes through ``visible`` first: XML 1.0 cannot carry NUL or ESC at all.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from lab.report import PROBLEMS, atomic_write, observed_facts, referenced_keys, refs_at_stake, visible
from lab.scenario.result import CaseRun, RunResult
from lab.scenario.verdict import Verdict

_SKIPS = (Verdict.UNIMPLEMENTED, Verdict.SKIPPED)
_NOTES = (Verdict.INFORMATIONAL, Verdict.NON_STRICT, Verdict.XFAIL)


def classname(section: str) -> str:
    """``smtplab.RFC_3207_4_1``: CI tools split class names at dots, so the section's own dots must go."""
    return "smtplab." + re.sub(r"[^A-Za-z0-9_-]+", "_", section).strip("_")


def testcase_name(run: CaseRun, several_targets: bool) -> str:
    """``CASE[policy]``; with several targets ``CASE[policy@target]`` so names stay unique."""
    return f"{run.case}[{run.policy}@{run.target}]" if several_targets else run.name


def _seconds(run: CaseRun) -> float:
    wall = run.timings.wall_ms
    return wall / 1000 if wall is not None else float(run.timings.virtual_s)


def _time(value: float) -> str:
    return f"{value:.3f}"


def problem_text(run: CaseRun) -> str:
    """Expected / Actual / the spec sentence at stake, as the body of ``<failure>`` and ``<error>``."""
    lines = [f"Verdict: {run.verdict}", f"Expected: {run.expectation}"]
    if run.expected is not None:
        lines.append(f"Decided by: [{run.expected.verdict}] {run.expected.label}")
    lines.append(f"Actual: {run.reason}")
    lines += [f"  {key} = {value}" for key, value in observed_facts(run, referenced_keys(run))]
    lines += [f'Spec: {ref.ref} ({ref.level}): "{ref.text}"' for ref in refs_at_stake(run)]
    if run.deviation:
        lines.append(f"Declared deviation: {run.deviation}")
    if run.capture:
        lines.append(f"Capture: {run.capture}" + (f" (keylog {run.keylog})" if run.keylog else ""))
    return visible("\n".join(lines))


def _property(parent: ET.Element, name: str, value: str) -> None:
    ET.SubElement(parent, "property", name=name, value=visible(value))


def _testcase(suite: ET.Element, run: CaseRun, several_targets: bool) -> None:
    case = ET.SubElement(
        suite,
        "testcase",
        name=visible(testcase_name(run, several_targets)),
        classname=classname(run.section),
        time=_time(_seconds(run)),
    )
    props = ET.SubElement(case, "properties")
    _property(props, "verdict", str(run.verdict))
    _property(props, "target", run.target)
    _property(props, "client", run.client)
    if run.verdict in _NOTES:
        _property(props, "note", f"{run.verdict}: {run.reason}" + (f" ({run.deviation})" if run.deviation else ""))
    for ref in run.spec_refs:
        _property(props, f"spec {ref.level}", f"{ref.ref}: {ref.text}")
    if run.verdict in PROBLEMS:
        tag = "error" if run.verdict is Verdict.ERROR else "failure"
        outcome = ET.SubElement(case, tag, message=visible(run.reason), type=str(run.verdict))
        outcome.text = problem_text(run)
    elif run.verdict in _SKIPS:
        ET.SubElement(case, "skipped", message=visible(f"{run.verdict}: {run.reason}"))
    out = ET.SubElement(case, "system-out")
    out.text = visible("\n".join(run.lines)) + "\n" if run.transcript else ""


def _totals(element: ET.Element, runs: list[CaseRun]) -> None:
    element.set("tests", str(len(runs)))
    element.set("failures", str(sum(r.verdict.is_failure for r in runs)))
    element.set("errors", str(sum(r.verdict is Verdict.ERROR for r in runs)))
    element.set("skipped", str(sum(r.verdict in _SKIPS for r in runs)))
    element.set("time", _time(sum(_seconds(r) for r in runs)))


def build_junit(result: RunResult) -> ET.Element:
    """The ``<testsuites>`` tree; suites in the order their section first appears in the run."""
    sections: dict[str, list[CaseRun]] = {}
    for run in result.runs:
        sections.setdefault(run.section, []).append(run)
    several_targets = len({r.target for r in result.runs}) > 1
    root = ET.Element("testsuites", name=visible(result.tool))
    _totals(root, result.runs)
    for section, runs in sections.items():
        suite = ET.SubElement(root, "testsuite", name=visible(section))
        _totals(suite, runs)
        if result.started:
            suite.set("timestamp", visible(result.started))
        props = ET.SubElement(suite, "properties")
        _property(props, "seed", str(result.seed))
        _property(props, "carrier", result.carrier)
        for run in runs:
            _testcase(suite, run, several_targets)
    ET.indent(root)
    return root


def junit_bytes(result: RunResult) -> bytes:
    data: bytes = ET.tostring(build_junit(result), encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def write_junit(result: RunResult, path: Path) -> Path:
    return atomic_write(Path(path), junit_bytes(result))
