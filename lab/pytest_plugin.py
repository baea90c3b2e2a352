"""The smtplab pytest plugin (entry point ``pytest11``): the conformance suite as pytest items.

Loaded in every pytest run of an environment where smtplab is installed, so it does nothing (adds no item, imports
none of the lab) until ``--smtplab``, another ``--smtplab-*`` option or the ``conformance/`` conftest (``enable``)
asks for it. Then it adds one item per case x policy x target, named ``CASE[policy]`` under ``smtplab/TARGET``.

The first item that runs runs the whole selection once through ``lab.scenario.runner`` (after ``-k`` / ``-m``
deselection, so a deselected case is never run), and every item reports its own ``CaseRun``: FAILED, XPASS and
ERROR fail with Expected / Actual / the spec sentence / the transcript; UNIMPLEMENTED and SKIPPED skip with the
reason; OK, XFAIL, INFORMATIONAL and NON-STRICT pass, the last three with a note (``user_properties``, and a
``SmtplabShouldWarning`` for a missed SHOULD). ``--smtplab-report-dir`` also gets the session's smtplab reports.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lab.pipeline import Plan, RunRequest, TargetPlan
    from lab.scenario.model import Case
    from lab.scenario.result import CaseRun, RunResult

MARKER = "smtplab"
OPTIONS = (
    "smtplab_target",
    "smtplab_policy",
    "smtplab_profile",
    "smtplab_carrier",
    "smtplab_select",
    "smtplab_report_dir",
    "smtplab_maillog",
    "smtplab_maillog_dialect",
)
_ENABLED = pytest.StashKey[bool]()
_STATE = pytest.StashKey["SuiteState"]()


class SmtplabShouldWarning(UserWarning):
    """A case passed with NON-STRICT: the target missed a SHOULD of the spec (not a failure)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    from lab.net.carrier import LAB_CARRIERS

    group = parser.getgroup("smtplab", "smtplab conformance suite (off unless --smtplab or another --smtplab-* option)")
    group.addoption("--smtplab", action="store_true", default=False, help="run the smtplab conformance suite")
    group.addoption(
        "--smtplab-target",
        metavar="HOST:PORT",
        default=None,
        help="run against this MTA (needs --smtplab-policy, or puts --smtplab-profile on this address); "
        "default: the lab's own listeners",
    )
    group.addoption(
        "--smtplab-policy",
        metavar="LIST",
        default=None,
        help="lab: the policies to run under, comma-separated from no,preferred,required (Postfix none,may,encrypt "
        "too; default all); with --smtplab-target: the one policy the target is meant to have",
    )
    group.addoption(
        "--smtplab-profile",
        metavar="FILE",
        action="append",
        default=[],
        help="a target profile (conformance/targets/*.yaml); give it again for more targets",
    )
    group.addoption(
        "--smtplab-carrier",
        choices=LAB_CARRIERS,
        default=None,
        help="how bytes reach the lab's own listeners (default memory: virtual time); external targets use TCP",
    )
    group.addoption(
        "--smtplab-select",
        metavar="PREFIX",
        action="append",
        default=[],
        help="case id prefixes (3207-4, ATK) or scenario files, comma-separated or repeated (default: the catalogue)",
    )
    group.addoption(
        "--smtplab-report-dir",
        metavar="DIR",
        default=None,
        help="also write the smtplab reports (index.json, junit.xml, index.html, captures) here",
    )
    group.addoption(
        "--smtplab-maillog",
        metavar="FILE",
        default=None,
        help="the target's mail log: cases that look for log evidence read the lines each run adds",
    )
    group.addoption(
        "--smtplab-maillog-dialect",
        choices=["postfix", "exim", "smtplab"],
        default=None,
        help="how the target's mail log writes its lines",
    )


def enable(config: pytest.Config) -> None:
    """Switch the suite on without ``--smtplab`` (what ``conformance/conftest.py`` does in its folder)."""
    config.stash[_ENABLED] = True


def is_enabled(config: pytest.Config) -> bool:
    if config.stash.get(_ENABLED, False) or config.getoption("smtplab", False):
        return True
    return any(config.getoption(name, None) for name in OPTIONS)


# -- the plan (lab.pipeline, shared with ``smtplab run``) and what came of it

#: ``smtplab run``'s flags as this plugin spells them, for error messages.
_FLAG_NAMES = {
    "--policy": "--smtplab-policy",
    "--target": "--smtplab-target",
    "--profile": "--smtplab-profile",
    "--carrier": "--smtplab-carrier",
    "selectors": "--smtplab-select",
    "--maillog": "--smtplab-maillog",
    "--maillog-dialect": "--smtplab-maillog-dialect",
}


@dataclass
class SuiteState:
    """What the session runs (the pipeline's plan), and (once the first item asked) what came of it."""

    plan: Plan
    report_dir: Path | None
    ran: bool = False
    error: str | None = None
    runs: dict[tuple[str, str, str], CaseRun] = field(default_factory=dict)
    result: RunResult | None = None

    def describe(self) -> str:
        targets = "; ".join(
            f"{t.name} ({'policy' if t.external else 'policies'} {', '.join(t.policies)})" for t in self.plan.targets
        )
        count = len(self.plan.cases)
        cases = f"{count} case" + ("s" if count != 1 else "")
        return f"smtplab: {cases} against {targets}; carrier {self.plan.carrier}"


def _selectors(values: list[str]) -> tuple[str, ...]:
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def make_request(config: pytest.Config) -> RunRequest:
    """The ``--smtplab-*`` options as the pipeline's typed request (the same one ``smtplab run`` builds)."""
    from lab.conformance.targets import TargetFlags
    from lab.pipeline import RunRequest
    from lab.scenario.model import parse_policies

    policy: str | None = config.getoption("smtplab_policy")
    report_dir = config.getoption("smtplab_report_dir")
    flags = TargetFlags(
        target=config.getoption("smtplab_target"),
        maillog=config.getoption("smtplab_maillog"),
        maillog_dialect=config.getoption("smtplab_maillog_dialect"),
    )
    return RunRequest(
        selectors=_selectors(config.getoption("smtplab_select")),
        policies=None if policy is None else tuple(parse_policies(policy, "--policy")),
        carrier=config.getoption("smtplab_carrier"),
        report_dir=Path(report_dir) if report_dir else None,
        jobs=1,  # one process: the runs share the session's reactor
        profiles=tuple(config.getoption("smtplab_profile")),
        flags=flags,
    )


def make_state(config: pytest.Config) -> SuiteState:
    """The options as targets and cases; a bad option or file is ``BadInput`` naming the ``--smtplab-*`` option."""
    from lab.errors import BadInput
    from lab.pipeline import make_plan

    try:
        request = make_request(config)
        # check_hosts off: a case naming a host the topology lacks fails its own items (ERROR), not the session
        return SuiteState(make_plan(request, check_hosts=False), request.report_dir)
    except BadInput as exc:
        exc.field = _FLAG_NAMES.get(exc.field or "", exc.field)
        raise


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not is_enabled(config):
        return
    from lab.errors import BadInput

    config.addinivalue_line("markers", f"{MARKER}: one smtplab conformance run (case x policy x target)")
    try:
        config.stash[_STATE] = make_state(config)
    except BadInput as exc:
        raise pytest.UsageError(f"smtplab: {exc}") from None


def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(_STATE, None)
    return state.describe() if state is not None else None


# -- collection: a collector per target, an item per case x policy


class TargetSuite(pytest.Collector):
    """The items of one target, ``smtplab/TARGET::CASE[policy]``."""

    def __init__(self, *, target: TargetPlan, state: SuiteState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.state = state

    def collect(self) -> list[pytest.Item]:
        return [
            CaseItem.from_parent(self, name=f"{case.id}[{policy}]", case=case, policy=policy)
            for case in self.state.plan.cases
            for policy in self.target.runs(case)
        ]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the suite's items before ``-k`` / ``-m`` deselect, through the ordinary collection reports."""
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    for target in state.plan.targets:
        suite = TargetSuite.from_parent(
            session, name=target.name, nodeid=f"smtplab/{target.name}", target=target, state=state
        )
        items.extend(item for item in session.genitems(suite) if isinstance(item, pytest.Item))


class CaseFailure(Exception):
    """A run whose verdict is a failure (FAILED, XPASS) or a harness ERROR; ``str()`` is the whole report."""


class CaseItem(pytest.Item):
    """One case under one policy against one target; its verdict decides the outcome."""

    def __init__(self, *, case: Case, policy: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.policy = policy
        self.add_marker(MARKER)

    @property
    def suite(self) -> TargetSuite:
        assert isinstance(self.parent, TargetSuite)
        return self.parent

    def key(self) -> tuple[str, str, str]:
        return (self.suite.target.name, self.case.id, self.policy)

    def runtest(self) -> None:
        from lab.scenario.verdict import Verdict

        state = self.suite.state
        if not state.ran:
            run_selection(state, [i for i in self.session.items if isinstance(i, CaseItem)])
        run = state.runs.get(self.key())
        if run is None:
            raise CaseFailure(
                f"Verdict: ERROR\nharness error: {state.error or 'the runner returned no run for this item'}"
            )
        self.user_properties += [("verdict", str(run.verdict)), ("target", run.target), ("client", run.client)]
        if run.verdict in (Verdict.UNIMPLEMENTED, Verdict.SKIPPED):
            pytest.skip(f"{run.verdict}: {run.reason}")
        if run.verdict in (Verdict.FAILED, Verdict.XPASS, Verdict.ERROR):
            raise CaseFailure(failure_text(run))
        if run.verdict in (Verdict.NON_STRICT, Verdict.INFORMATIONAL, Verdict.XFAIL):
            self.user_properties.append(("note", note_text(run)))
        if run.deviation:
            self.user_properties.append(("deviation", run.deviation))
        if run.verdict is Verdict.NON_STRICT:
            path, line, _ = self.reportinfo()
            message = SmtplabShouldWarning(f"{self.name} against {run.target}: {run.reason}")
            try:
                warnings.warn_explicit(message, SmtplabShouldWarning, str(path), (line or 0) + 1)
            except SmtplabShouldWarning:  # -W error::lab.pytest_plugin.SmtplabShouldWarning: a missed SHOULD fails
                raise CaseFailure(failure_text(run)) from None

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, CaseFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Path | str, int | None, str]:
        """The scenario file and line, so a failure points at the case a reader would edit."""
        line = self.case.line - 1 if self.case.line else None
        return (Path(self.case.file) if self.case.file else self.path), line, self.name


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """An item's duration is its own run's wall time (the first item ran the whole selection), and a skip points
    at the scenario file, not at this module."""
    report = yield
    if isinstance(item, CaseItem) and call.when == "call":
        run = item.suite.state.runs.get(item.key())
        if run is not None and run.timings.wall_ms is not None:
            report.duration = run.timings.wall_ms / 1000
        if report.skipped and isinstance(report.longrepr, tuple):
            path, line, _ = item.reportinfo()
            report.longrepr = (str(path), (line or 0) + 1, report.longrepr[2])
    return report


# -- running the selection once


def run_selection(state: SuiteState, items: list[CaseItem]) -> None:
    """Run every selected case x policy x target once; a fault of the lab fails the items, not the session."""
    from lab.errors import BadInput, HarnessError

    state.ran = True
    try:
        _run(state, items)
    except (HarnessError, BadInput) as exc:
        state.error = str(exc)
    except Exception as exc:  # any other fault of the lab is a harness error too, reported on each item
        state.error = f"{type(exc).__name__}: {exc}"


def _run(state: SuiteState, items: list[CaseItem]) -> None:
    """The selected items of each target through ``lab.pipeline.execute``; one record of them all."""
    from lab.pipeline import combine, execute

    several = len(state.plan.targets) > 1
    results: list[RunResult] = []
    for target in state.plan.targets:
        selected = [(i.case.id, i.policy) for i in items if i.suite.target is target]
        if not selected:
            continue
        report_dir = state.report_dir
        if report_dir is not None and several:
            report_dir = report_dir / _safe(target.name)
        result = execute(state.plan, target, selected, report_dir=report_dir)
        results.append(result)
        for run in result.runs:
            if several:
                run = _relocated(run, _safe(target.name))
            state.runs[(target.name, run.case, str(run.policy))] = run
    if results:
        state.result = combine(results, [state.runs[i.key()] for i in items if i.key() in state.runs])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _relocated(run: CaseRun, folder: str) -> CaseRun:
    """Capture paths relative to the session's report dir when each target has its own folder in it."""
    capture = f"{folder}/{run.capture}" if run.capture else None
    keylog = f"{folder}/{run.keylog}" if run.keylog else None
    return dataclasses.replace(run, capture=capture, keylog=keylog)


# -- what an item says


def failure_text(run: CaseRun) -> str:
    """Expected / Actual / spec sentence (the JUnit view's text), then the whole transcript, failing step marked."""
    from lab.report import failing_step, visible
    from lab.report.junit import problem_text
    from lab.scenario.verdict import Verdict

    title = run.title if run.verdict is Verdict.FAILED else f"{run.title} ({run.verdict})"
    lines = [visible(title), visible(f"{run.name} against {run.target}, {run.client} client, carrier {run.carrier}")]
    lines.append(problem_text(run))
    if run.transcript:
        step = failing_step(run)
        lines.append(
            f"Transcript ({len(run.transcript)} lines" + (", > marks the failing step):" if step is not None else "):")
        )
        lines += [("> " if i == step else "  ") + visible(line) for i, line in enumerate(run.lines)]
    return "\n".join(lines)


def note_text(run: CaseRun) -> str:
    from lab.report import visible

    declared = f" (declared deviation: {run.deviation})" if run.deviation else ""
    return visible(f"{run.verdict}: {run.reason}{declared}")


# -- the end of the session


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None or state.result is None or state.report_dir is None:
        return
    from lab.errors import HarnessError
    from lab.report import write_reports

    try:
        write_reports(state.result, state.report_dir)
    except HarnessError as exc:
        state.error = f"cannot write the smtplab reports: {exc}"
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.ran:
        return
    from lab.report import counts_line, visible
    from lab.scenario.verdict import Verdict

    tr = terminalreporter
    tr.section("smtplab")
    if state.result is not None:
        noted = (Verdict.NON_STRICT, Verdict.INFORMATIONAL, Verdict.XFAIL)
        notes = [r for r in state.result.runs if r.verdict in noted]
        for run in notes:
            tr.line(f"{run.verdict} smtplab/{visible(run.target)}::{run.name}: {note_text(run).partition(': ')[2]}")
        tr.line(f"verdicts: {counts_line(state.result)}")
        if state.report_dir is not None and state.error is None:
            tr.line(f"reports: {state.report_dir / 'index.html'}, {state.report_dir / 'index.json'}")
    if state.error is not None:
        tr.line(f"harness error: {state.error}", red=True)
