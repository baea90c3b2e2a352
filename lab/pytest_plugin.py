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

import argparse
import dataclasses
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lab.scenario.model import Case
    from lab.scenario.result import CaseRun, RunResult
    from lab.scenario.runner import ExternalTarget

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
_PLAN = pytest.StashKey["Plan"]()


class SmtplabShouldWarning(UserWarning):
    """A case passed with NON-STRICT: the target missed a SHOULD of the spec (not a failure)."""


def pytest_addoption(parser: pytest.Parser) -> None:
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
        choices=["memory", "loopback"],
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


# -- the plan: which targets, which cases, under which policies


@dataclass(frozen=True)
class TargetPlan:
    """One system under test: the lab's listeners (``external`` None) or another MTA, and its policies."""

    name: str
    external: ExternalTarget | None
    policies: tuple[str, ...]

    def runs(self, case: Case) -> list[str]:
        """The policies ``case`` runs under against this target (as the runner picks them)."""
        if self.external is not None:
            return list(self.policies)
        return [p for p in self.policies if p in case.policies]


@dataclass
class Plan:
    """What the session runs, and (once the first item asked) what came of it."""

    cases: list[Case]
    targets: list[TargetPlan]
    carrier: str
    report_dir: Path | None
    ran: bool = False
    error: str | None = None
    runs: dict[tuple[str, str, str], CaseRun] = field(default_factory=dict)
    result: RunResult | None = None

    def describe(self) -> str:
        targets = "; ".join(
            f"{t.name} ({'policy' if t.external else 'policies'} {', '.join(t.policies)})" for t in self.targets
        )
        carrier = "tcp" if self.targets[0].external else self.carrier
        cases = f"{len(self.cases)} case" + ("s" if len(self.cases) != 1 else "")
        return f"smtplab: {cases} against {targets}; carrier {carrier}"


def _policies(text: str | None) -> list[str] | None:
    from lab.scenario.model import parse_policies

    return None if text is None else parse_policies(text, "--smtplab-policy")


def _selectors(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def make_plan(config: pytest.Config) -> Plan:
    """The options as targets and cases; a bad option or file is ``BadInput`` (shown as a usage error)."""
    from lab.conformance.targets import target_from_args, target_from_profile
    from lab.errors import BadInput
    from lab.scenario.model import POLICIES

    address: str | None = config.getoption("smtplab_target")
    profiles: list[str] = config.getoption("smtplab_profile")
    policies = _policies(config.getoption("smtplab_policy"))
    carrier: str | None = config.getoption("smtplab_carrier")
    externals: list[ExternalTarget] = []
    if profiles:
        if address and len(profiles) > 1:
            raise BadInput("--smtplab-target moves one profile; it cannot place several", field="--smtplab-target")
        externals = [target_from_profile(path, _run_flags(address, config)) for path in profiles]
        for target in externals:
            if policies is not None and policies != [str(target.policy)]:
                raise BadInput(
                    f"the profile {target.name!r} declares policy {target.policy}; its cases are judged under that",
                    field="--smtplab-policy",
                )
    elif address:
        if policies is None or len(policies) != 1:
            raise BadInput("an external target needs the one policy it is meant to have", field="--smtplab-policy")
        try:
            externals = [target_from_args(_run_flags(address, config), policies[0])]
        except BadInput as exc:
            exc.field = "--smtplab-target" if exc.field == "--target" else exc.field
            raise
    if externals and carrier is not None:
        raise BadInput(
            "applies to the lab's own listeners; an external target is reached over TCP", field="--smtplab-carrier"
        )
    names = [t.name for t in externals]
    if len(set(names)) != len(names):
        raise BadInput(f"two targets share a name: {', '.join(names)}", field="--smtplab-profile")
    if externals:
        targets = [TargetPlan(t.name, t, (str(t.policy),)) for t in externals]
    else:
        from lab.scenario.runner import lab_target_name

        targets = [TargetPlan(lab_target_name(), None, tuple(policies or POLICIES))]
    report_dir = config.getoption("smtplab_report_dir")
    return Plan(
        cases=_load_cases(_selectors(config.getoption("smtplab_select"))),
        targets=targets,
        carrier=carrier or "memory",
        report_dir=Path(report_dir) if report_dir else None,
    )


def _run_flags(address: str | None, config: pytest.Config | None = None) -> argparse.Namespace:
    """``smtplab run --target ADDRESS [--maillog FILE --maillog-dialect D]`` as its parser reads it, every other
    flag at its default: what ``lab.conformance.targets`` builds targets from."""
    from lab.commands.run import add_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    argv = ["--target", address] if address else []
    for option, flag in (("smtplab_maillog", "--maillog"), ("smtplab_maillog_dialect", "--maillog-dialect")):
        value = config.getoption(option) if config is not None else None
        argv += [flag, value] if value else []
    return parser.parse_args(argv)


def _load_cases(selectors: list[str]) -> list[Case]:
    from lab.errors import BadInput
    from lab.scenario.loader import load_cases

    cases = load_cases(selectors or None)
    if not cases:
        raise BadInput("no case matches " + " ".join(selectors), field="--smtplab-select")
    return cases


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not is_enabled(config):
        return
    from lab.errors import BadInput

    config.addinivalue_line("markers", f"{MARKER}: one smtplab conformance run (case x policy x target)")
    try:
        config.stash[_PLAN] = make_plan(config)
    except BadInput as exc:
        raise pytest.UsageError(f"smtplab: {exc}") from None


def pytest_report_header(config: pytest.Config) -> str | None:
    plan = config.stash.get(_PLAN, None)
    return plan.describe() if plan is not None else None


# -- collection: a collector per target, an item per case x policy


class TargetSuite(pytest.Collector):
    """The items of one target, ``smtplab/TARGET::CASE[policy]``."""

    def __init__(self, *, target: TargetPlan, plan: Plan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.plan = plan

    def collect(self) -> list[pytest.Item]:
        return [
            CaseItem.from_parent(self, name=f"{case.id}[{policy}]", case=case, policy=policy)
            for case in self.plan.cases
            for policy in self.target.runs(case)
        ]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the suite's items before ``-k`` / ``-m`` deselect, through the ordinary collection reports."""
    plan = config.stash.get(_PLAN, None)
    if plan is None:
        return
    for target in plan.targets:
        suite = TargetSuite.from_parent(
            session, name=target.name, nodeid=f"smtplab/{target.name}", target=target, plan=plan
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

        plan = self.suite.plan
        if not plan.ran:
            run_selection(plan, [i for i in self.session.items if isinstance(i, CaseItem)])
        run = plan.runs.get(self.key())
        if run is None:
            raise CaseFailure(
                f"Verdict: ERROR\nharness error: {plan.error or 'the runner returned no run for this item'}"
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
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """An item's duration is its own run's wall time (the first item ran the whole selection), and a skip points
    at the scenario file, not at this module."""
    report = yield
    if isinstance(item, CaseItem) and call.when == "call":
        run = item.suite.plan.runs.get(item.key())
        if run is not None and run.timings.wall_ms is not None:
            report.duration = run.timings.wall_ms / 1000
        if report.skipped and isinstance(report.longrepr, tuple):
            path, line, _ = item.reportinfo()
            report.longrepr = (str(path), (line or 0) + 1, report.longrepr[2])
    return report


# -- running the selection once


def run_selection(plan: Plan, items: list[CaseItem]) -> None:
    """Run every selected case x policy x target once; a fault of the lab fails the items, not the session."""
    from lab.errors import BadInput, HarnessError

    plan.ran = True
    try:
        _run(plan, items)
    except (HarnessError, BadInput) as exc:
        plan.error = str(exc)
    except Exception as exc:  # any other fault of the lab is a harness error too, reported on each item
        plan.error = f"{type(exc).__name__}: {exc}"


def _run(plan: Plan, items: list[CaseItem]) -> None:
    from lab.scenario.result import RunResult
    from lab.scenario.runner import RunOptions, run_cases

    several = len(plan.targets) > 1
    results: list[RunResult] = []
    for target in plan.targets:
        mine = [i for i in items if i.suite.target is target]
        report_dir = plan.report_dir
        if report_dir is not None and several:
            report_dir = report_dir / _safe(target.name)
        for policy in dict.fromkeys(i.policy for i in mine):
            cases = list({i.case.id: i.case for i in mine if i.policy == policy}.values())
            options = RunOptions(carrier=plan.carrier, report_dir=report_dir, target=target.external)
            result = run_cases(cases, [policy], options)
            results.append(result)
            for run in result.runs:
                if several:
                    run = _relocated(run, _safe(target.name))
                plan.runs[(target.name, run.case, str(run.policy))] = run
    if results:
        ordered = [plan.runs[i.key()] for i in items if i.key() in plan.runs]
        first = results[0]
        plan.result = RunResult(
            seed=first.seed,
            carrier=first.carrier,
            started=first.started,
            targets=list({t.name: t for r in results for t in r.targets}.values()),
            address_map=first.address_map,
            runs=ordered,
        )


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
    plan = session.config.stash.get(_PLAN, None)
    if plan is None or plan.result is None or plan.report_dir is None:
        return
    from lab.errors import HarnessError
    from lab.report import write_reports

    try:
        write_reports(plan.result, plan.report_dir)
    except HarnessError as exc:
        plan.error = f"cannot write the smtplab reports: {exc}"
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    plan = config.stash.get(_PLAN, None)
    if plan is None or not plan.ran:
        return
    from lab.report import counts_line, visible
    from lab.scenario.verdict import Verdict

    tr = terminalreporter
    tr.section("smtplab")
    if plan.result is not None:
        notes = [r for r in plan.result.runs if r.verdict in (Verdict.NON_STRICT, Verdict.INFORMATIONAL, Verdict.XFAIL)]
        for run in notes:
            tr.line(f"{run.verdict} smtplab/{visible(run.target)}::{run.name}: {note_text(run).partition(': ')[2]}")
        tr.line(f"verdicts: {counts_line(plan.result)}")
        if plan.report_dir is not None and plan.error is None:
            tr.line(f"reports: {plan.report_dir / 'index.html'}, {plan.report_dir / 'index.json'}")
    if plan.error is not None:
        tr.line(f"harness error: {plan.error}", red=True)
