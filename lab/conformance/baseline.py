"""Baselines: compare two result records case by case, so CI fails on what got worse, not on what was known.

A run against another MTA may carry known failures. ``compare`` keys every run by (case, policy, target) and
ranks verdicts from best to worst (``RANK``); a run whose verdict moved down the ranking REGRESSED, one that
moved up IMPROVED. ``smtplab diff`` prints the changes; ``smtplab run --baseline FILE`` exits with
``baseline_exit_code``: 1 only when something regressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from lab.errors import EXIT_FAILED, EXIT_OK, BadInput
from lab.policy.modes import DeliveryTLS, TLSMode
from lab.scenario.result import CaseRun, RunResult
from lab.scenario.verdict import Verdict

#: Verdicts from best to worst. Why this order (docs/conformance.md, "Baselines"):
#: OK and INFORMATIONAL (a local-policy difference) are clean; SKIPPED and UNIMPLEMENTED ran nothing, which is
#: less than a pass; XFAIL is a declared failure; NON-STRICT an undeclared SHOULD miss; XPASS a stale profile
#: (it fails the run); FAILED a MUST broken; ERROR is last because it means no verdict at all, so any verdict
#: turning into a harness fault is a regression and any fault turning into a verdict an improvement.
RANK: tuple[Verdict, ...] = (
    Verdict.OK,
    Verdict.INFORMATIONAL,
    Verdict.SKIPPED,
    Verdict.UNIMPLEMENTED,
    Verdict.XFAIL,
    Verdict.NON_STRICT,
    Verdict.XPASS,
    Verdict.FAILED,
    Verdict.ERROR,
)
_POSITION = {verdict: i for i, verdict in enumerate(RANK)}

#: A case new in this run with one of these verdicts is a new failure: it counts as a regression.
NEW_FAILURES = frozenset({Verdict.XPASS, Verdict.FAILED, Verdict.ERROR})

Key = tuple[str, TLSMode | DeliveryTLS, str]


class Kind(StrEnum):
    REGRESSED = "REGRESSED"
    IMPROVED = "IMPROVED"
    UNCHANGED = "unchanged"
    ADDED = "added"
    REMOVED = "removed"


def rank(verdict: Verdict) -> int:
    """0 for the best verdict (OK), larger is worse."""
    return _POSITION[verdict]


@dataclass(frozen=True)
class Change:
    """One (case, policy, target) across the two runs; ``old``/``new`` is None where the run has no such case."""

    case: str
    policy: TLSMode | DeliveryTLS
    target: str
    kind: Kind
    old: CaseRun | None
    new: CaseRun | None

    @property
    def name(self) -> str:
        return f"{self.case}[{self.policy}]@{self.target}"

    @property
    def regressed(self) -> bool:
        """Worse than the baseline: a verdict that went down, or a new case that fails."""
        if self.kind is Kind.REGRESSED:
            return True
        return self.kind is Kind.ADDED and self.new is not None and self.new.verdict in NEW_FAILURES

    def line(self) -> str:
        """One line for ``smtplab diff``."""
        old = self.old.verdict if self.old is not None else None
        new = self.new.verdict if self.new is not None else None
        if self.kind is Kind.ADDED:
            assert self.new is not None
            note = " (a new failure: counts as regressed)" if self.regressed else ""
            return f"added      {self.name}: {new}{note} -- {self.new.reason}"
        if self.kind is Kind.REMOVED:
            return f"removed    {self.name}: was {old}"
        assert self.new is not None
        return f"{self.kind.value:<10} {self.name}: {old} -> {new} -- {self.new.reason}"


def _index(result: RunResult, which: str) -> dict[Key, CaseRun]:
    out: dict[Key, CaseRun] = {}
    for run in result.runs:
        key = (run.case, run.policy, run.target)
        if key in out:
            raise BadInput(f"{which} record has two runs of {run.name}@{run.target}; cannot compare", field="runs")
        out[key] = run
    return out


def compare(old: RunResult, new: RunResult) -> list[Change]:
    """Every (case, policy, target) of either run, in the new run's order, then the removed ones in the old order.

    Two runs of one key in one record cannot be paired: ``BadInput``.
    """
    before, after = _index(old, "the old"), _index(new, "the new")
    changes: list[Change] = []
    for key, run in after.items():
        prior = before.get(key)
        if prior is None:
            kind = Kind.ADDED
        elif rank(run.verdict) > rank(prior.verdict):
            kind = Kind.REGRESSED
        elif rank(run.verdict) < rank(prior.verdict):
            kind = Kind.IMPROVED
        else:
            kind = Kind.UNCHANGED
        changes.append(Change(*key, kind, prior, run))
    changes += [Change(*key, Kind.REMOVED, run, None) for key, run in before.items() if key not in after]
    return changes


def summary(changes: Sequence[Change]) -> str:
    """``N regressed, N improved, N unchanged`` and, when there are any, the added and removed counts."""
    regressed = sum(c.regressed for c in changes)
    counts = {kind: sum(c.kind is kind for c in changes) for kind in Kind}
    text = f"{regressed} regressed, {counts[Kind.IMPROVED]} improved, {counts[Kind.UNCHANGED]} unchanged"
    if counts[Kind.ADDED] or counts[Kind.REMOVED]:
        text += f"; {counts[Kind.ADDED]} added, {counts[Kind.REMOVED]} removed"
    return text


def exit_code_of(changes: Sequence[Change]) -> int:
    return EXIT_FAILED if any(c.regressed for c in changes) else EXIT_OK


def baseline_exit_code(old: RunResult, new: RunResult) -> int:
    """For ``smtplab run --baseline FILE``: 1 when anything regressed against the baseline, else 0."""
    return exit_code_of(compare(old, new))
