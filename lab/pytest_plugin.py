"""The smtplab pytest plugin (entry point ``pytest11``): the conformance suite as pytest items.

Loaded in every pytest run of an environment where smtplab is installed, so it does nothing (adds no item, imports
none of the lab) until ``--smtplab``, another ``--smtplab-*`` option or the ``conformance/`` conftest (``enable``)
asks for it. Then it adds one item per case x policy x target, named ``CASE[policy]`` under ``smtplab/TARGET``,
and, for each ``--smtplab-sender SPEC`` (``smtplab run --sender``'s syntax), one per receiver case x destination
control, named ``CASE[policy]`` under ``smtplab/sender:NAME``.

The first item that runs runs the whole selection once through ``lab.scenario.runner`` and ``lab.sender.run``
(after ``-k`` / ``-m`` deselection, so a deselected case is never run), and every item reports its own
``CaseRun``: FAILED, XPASS and ERROR fail with Expected / Actual / the spec sentence / the transcript;
UNIMPLEMENTED and SKIPPED skip with the reason; OK, XFAIL, INFORMATIONAL and NON-STRICT pass, the last three
with a note (``user_properties``, and a ``SmtplabShouldWarning`` for a missed SHOULD). ``--smtplab-report-dir``
also gets the session's smtplab reports.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lab.pipeline import Plan, RunRequest, TargetPlan
    from lab.scenario.model import Case
    from lab.scenario.result import CaseRun, RunResult
    from lab.sender.cases import SenderCase
    from lab.sender.seam import ISender

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
    "smtplab_sender",
)
#: Options that name what the listener items run against: with one of them, ``--smtplab-sender`` adds to the
#: listener items; without, it replaces them.
LISTENER_OPTIONS = ("smtplab_target", "smtplab_profile", "smtplab_policy", "smtplab_carrier", "smtplab_maillog")
_ENABLED = pytest.StashKey[bool]()
_DEFAULT_SENDERS = pytest.StashKey[tuple[str, ...]]()
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
        help="how bytes reach the lab's own listeners (default memory: virtual time); external targets use TCP, "
        "or netns for one inside the kept namespace set (docs/netns.md)",
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
    group.addoption(
        "--smtplab-sender",
        metavar="SPEC",
        action="append",
        default=[],
        help="judge a sender's outbound TLS with the receiver cases, as smtplab run --sender: lab[:POLICY,...], "
        "appliance[:POLICY,...] or a sender profile (conformance/senders/*.yaml); repeat for more senders",
    )


def enable(config: pytest.Config, senders: Sequence[str] = ()) -> None:
    """Switch the suite on without ``--smtplab`` (what ``conformance/conftest.py`` does in its folder).

    ``senders``: the ``--smtplab-sender`` values judged next to the lab's listeners when the session names no
    target, profile or sender of its own.
    """
    config.stash[_ENABLED] = True
    config.stash[_DEFAULT_SENDERS] = tuple(senders)


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
    "--sender": "--smtplab-sender",
    "selection": "--smtplab-select",
}


@dataclass(frozen=True)
class SenderPlan:
    """One ``--smtplab-sender`` value: its senders, one per destination control it names."""

    spec: str
    senders: tuple[ISender, ...]

    @property
    def name(self) -> str:
        return f"sender:{self.senders[0].name}"

    def runs(self, case: SenderCase) -> list[str]:
        return [str(s.policy) for s in self.senders if str(s.policy) in case.policies]


@dataclass
class SuiteState:
    """What the session runs (the pipeline's plan), and (once the first item asked) what came of it."""

    plan: Plan | None  # None: the selection names receiver cases only
    report_dir: Path | None
    senders: tuple[SenderPlan, ...] = ()
    sender_cases: tuple[SenderCase, ...] = ()
    ran: bool = False
    error: str | None = None
    runs: dict[tuple[str, str, str], CaseRun] = field(default_factory=dict)
    result: RunResult | None = None

    def describe(self) -> list[str]:
        lines = []
        if self.plan is not None:
            targets = "; ".join(
                f"{t.name} ({'policy' if t.external else 'policies'} {', '.join(t.policies)})"
                for t in self.plan.targets
            )
            lines.append(
                f"smtplab: {_count(len(self.plan.cases), 'case')} against {targets}; carrier {self.plan.carrier}"
            )
        for sender in self.senders:
            policies = ("policy " if len(sender.senders) == 1 else "policies ") + ", ".join(
                str(s.policy) for s in sender.senders
            )
            cases = _count(len(self.sender_cases), "receiver case")
            lines.append(f"smtplab: {cases} against {sender.name} ({policies}); carrier {sender.senders[0].carrier}")
        return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("s" if number != 1 else "")


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
    """The options as targets, senders and cases; a bad option or file is ``BadInput`` naming the ``--smtplab-*``
    option.

    Listener items come unless only senders are named; ``enable``'s default senders join the lab's listeners when
    nothing is named. With both kinds, a ``--smtplab-select`` that names cases of one catalogue only drops the other.
    """
    from lab.errors import BadInput
    from lab.pipeline import make_plan
    from lab.sender.cases import load_sender_cases
    from lab.sender.command import senders_for

    try:
        request = make_request(config)
        specs: list[str] = config.getoption("smtplab_sender")
        listeners = not specs or any(config.getoption(name, None) for name in LISTENER_OPTIONS)
        if not specs and not any(config.getoption(name, None) for name in LISTENER_OPTIONS):
            defaults: tuple[str, ...] = config.stash.get(_DEFAULT_SENDERS, ())
            specs = list(defaults)
        listener_selection, sender_selection = request.selectors, request.selectors
        if specs and listeners and request.selectors:
            sender_selection = tuple(s for s in request.selectors if _names_receiver_cases(s))
            listener_selection = tuple(s for s in request.selectors if s not in sender_selection)
            listeners = bool(listener_selection)
            specs = specs if sender_selection else []
        senders = tuple(SenderPlan(spec, tuple(senders_for(spec))) for spec in specs)
        names = [s.name for s in senders]
        if len(set(names)) != len(names):
            raise BadInput(f"two senders share a name: {', '.join(names)}", field="--sender")
        # check_hosts off: a case naming a host the topology lacks fails its own items (ERROR), not the session
        plan = (
            make_plan(dataclasses.replace(request, selectors=listener_selection), check_hosts=False)
            if listeners
            else None
        )
        cases = tuple(load_sender_cases(sender_selection)) if senders else ()
        return SuiteState(plan, request.report_dir, senders, cases)
    except BadInput as exc:
        exc.field = _FLAG_NAMES.get(exc.field or "", exc.field)
        raise


def _names_receiver_cases(selector: str) -> bool:
    """Does this ``--smtplab-select`` value pick receiver cases (scenarios/senders/) rather than listener cases?"""
    from lab.errors import BadInput
    from lab.sender.cases import load_sender_cases

    try:
        return bool(load_sender_cases([selector]))
    except BadInput:
        return False


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


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    state = config.stash.get(_STATE, None)
    return state.describe() if state is not None else None


# -- collection: a collector per target or sender, an item per case x policy


class Suite(pytest.Collector):
    """The items of one target (``smtplab/TARGET::CASE[policy]``) or sender (``smtplab/sender:NAME::...``)."""

    def __init__(self, *, state: SuiteState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state


class TargetSuite(Suite):
    def __init__(self, *, target: TargetPlan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target

    def collect(self) -> list[pytest.Item]:
        assert self.state.plan is not None
        return [
            CaseItem.from_parent(self, name=f"{case.id}[{policy}]", case=case, policy=policy)
            for case in self.state.plan.cases
            for policy in self.target.runs(case)
        ]


class SenderSuite(Suite):
    def __init__(self, *, sender: SenderPlan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sender = sender

    def collect(self) -> list[pytest.Item]:
        return [
            CaseItem.from_parent(self, name=f"{case.id}[{policy}]", case=case, policy=policy)
            for case in self.state.sender_cases
            for policy in self.sender.runs(case)
        ]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the suite's items before ``-k`` / ``-m`` deselect, through the ordinary collection reports."""
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    suites: list[Suite] = [
        TargetSuite.from_parent(session, name=target.name, nodeid=f"smtplab/{target.name}", target=target, state=state)
        for target in (state.plan.targets if state.plan is not None else ())
    ]
    suites += [
        SenderSuite.from_parent(session, name=sender.name, nodeid=f"smtplab/{sender.name}", sender=sender, state=state)
        for sender in state.senders
    ]
    for suite in suites:
        items.extend(item for item in session.genitems(suite) if isinstance(item, pytest.Item))


class CaseFailure(Exception):
    """A run whose verdict is a failure (FAILED, XPASS) or a harness ERROR; ``str()`` is the whole report."""


class CaseItem(pytest.Item):
    """One case under one policy against one target (or receiver case against one sender); its verdict decides
    the outcome."""

    def __init__(self, *, case: Case | SenderCase, policy: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.policy = policy
        self.add_marker(MARKER)

    @property
    def suite(self) -> Suite:
        assert isinstance(self.parent, Suite)
        return self.parent

    def key(self) -> tuple[str, str, str]:
        return (self.suite.name, self.case.id, self.policy)

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
    """The selected items of each target through ``lab.pipeline.execute``, of each sender through
    ``lab.sender.run``; one record of them all."""
    from lab.pipeline import combine, execute
    from lab.sender.command import merge_results
    from lab.sender.run import run_sender

    targets = state.plan.targets if state.plan is not None else ()
    several = len(targets) + len(state.senders) > 1
    results: list[RunResult] = []

    def keep(name: str, result: RunResult) -> None:
        results.append(result)
        for run in result.runs:
            if several:
                run = _relocated(run, _safe(name))
            state.runs[(name, run.case, str(run.policy))] = run

    def folder(name: str) -> Path | None:
        return state.report_dir / _safe(name) if state.report_dir is not None and several else state.report_dir

    for target in targets:
        selected = [
            (i.case.id, i.policy) for i in items if isinstance(i.suite, TargetSuite) and i.suite.target is target
        ]
        if selected and state.plan is not None:
            keep(target.name, execute(state.plan, target, selected, report_dir=folder(target.name)))
    for sender in state.senders:
        chosen = {(i.case.id, i.policy) for i in items if isinstance(i.suite, SenderSuite) and i.suite.sender is sender}
        per_control = [
            run_sender(one, cases, report_dir=folder(sender.name))
            for one in sender.senders
            if (cases := [c for c in state.sender_cases if (c.id, str(one.policy)) in chosen])
        ]
        if per_control:
            keep(sender.name, merge_results(per_control))
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
        for (suite, _, _), run in state.runs.items():
            if run.verdict in noted:
                tr.line(f"{run.verdict} smtplab/{visible(suite)}::{run.name}: {note_text(run).partition(': ')[2]}")
        tr.line(f"verdicts: {counts_line(state.result)}")
        if state.report_dir is not None and state.error is None:
            tr.line(f"reports: {state.report_dir / 'index.html'}, {state.report_dir / 'index.json'}")
    if state.error is not None:
        tr.line(f"harness error: {state.error}", red=True)
