"""Declared deviations of a target: XFAIL when a case fails as declared, XPASS when the deviation is gone.

Other MTAs differ from the lab's rules (docs/rules.md) in known ways (Postfix answers 454 where the lab answers
502, ...). A target profile lists them with a reason, so a run against that target stays clean while the
deviation is there and says so when it disappears (honest verdicts: docs/architecture.md). Pure functions over
``CaseRun``: no I/O.

Rules (docs/conformance.md):

- a deviation *covers* a run when its ``case`` is the run's case ID or an ID prefix ending at a separator
  (``3207-4`` covers ``3207-4-01`` and ``3207-4.2-01``, not ``3207-41-01``), and its ``policy`` (if any) is the
  run's policy;
- a covered FAILED or NON-STRICT run whose reason or transcript shows ``match`` (if given) failed *as declared*:
  it becomes XFAIL;
- a deviation is *gone* when no run it covers failed as declared; then every covered OK run becomes XPASS.
  (So a prefix deviation leaves the OK cases of a partly failing section alone.)
- every other verdict (INFORMATIONAL, UNIMPLEMENTED, ERROR, SKIPPED, XFAIL, XPASS) is left as it is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lab.policy.modes import TLSMode
from lab.scenario.result import CaseRun
from lab.scenario.verdict import Verdict

SEPARATORS = "-._"
FAILING = frozenset({Verdict.FAILED, Verdict.NON_STRICT})


@dataclass(frozen=True)
class Deviation:
    """One declared deviation; ``line`` is where the profile declares it, for messages."""

    case: str
    reason: str
    policy: TLSMode | None = None
    match: re.Pattern[str] | None = None
    line: int | None = None

    def covers(self, run: CaseRun) -> bool:
        """Is ``run`` one of the runs this deviation speaks about?"""
        if self.policy is not None and run.policy is not self.policy:
            return False
        return covers_case(self.case, run.case)

    def shown_by(self, run: CaseRun) -> bool:
        """Did ``run`` fail the way this deviation declares?"""
        if run.verdict not in FAILING:
            return False
        if self.match is None:
            return True
        return any(self.match.search(text) for text in [run.reason, *run.lines])

    @property
    def label(self) -> str:
        where = f"[{self.policy}]" if self.policy is not None else ""
        return f"{self.case}{where}"


def covers_case(pattern: str, case: str) -> bool:
    """``pattern`` is ``case`` itself or a prefix of it that ends at an ID separator (``-``, ``.``, ``_``)."""
    if case == pattern:
        return True
    if not case.startswith(pattern):
        return False
    return pattern[-1] in SEPARATORS or case[len(pattern)] in SEPARATORS


def apply_deviations(
    runs: Sequence[CaseRun], deviations: Sequence[Deviation], *, target: str | None = None
) -> list[CaseRun]:
    """The runs with XFAIL / XPASS and ``deviation`` set as the rules above say; the input is not changed.

    ``target``: only runs against this target are considered (a profile's deviations are its own).
    """
    mine = [run for run in runs if target is None or run.target == target]
    gone = {d for d in deviations if not any(d.covers(run) and d.shown_by(run) for run in mine)}
    out: list[CaseRun] = []
    for run in runs:
        if target is not None and run.target != target:
            out.append(run)
            continue
        covering = [d for d in deviations if d.covers(run)]
        if run.verdict in FAILING:
            declared = next((d for d in covering if d.shown_by(run)), None)
            if declared is not None:
                run = dataclasses.replace(run, verdict=Verdict.XFAIL, deviation=declared.reason)
        elif run.verdict is Verdict.OK:
            stale = next((d for d in covering if d in gone), None)
            if stale is not None:
                run = dataclasses.replace(run, verdict=Verdict.XPASS, deviation=stale.reason)
        out.append(run)
    return out


def unknown_deviations(deviations: Iterable[Deviation], case_ids: Iterable[str]) -> list[Deviation]:
    """Deviations that cover no case of the catalogue (a typo, or a case that was renamed)."""
    ids = list(case_ids)
    return [d for d in deviations if not any(covers_case(d.case, case) for case in ids)]
