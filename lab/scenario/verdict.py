"""Verdicts, the spec levels that decide them, and how they map to exit codes (docs/rules.md, verdicts).

``Level`` and ``SpecRef`` live here, once, because both the scenario model (cases cite them) and the result
record (runs carry them) need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    OK = "OK"
    NON_STRICT = "NON-STRICT"  # a SHOULD was missed
    FAILED = "FAILED"  # a MUST was broken
    INFORMATIONAL = "INFORMATIONAL"  # a local-policy difference
    UNIMPLEMENTED = "UNIMPLEMENTED"  # the case cannot run against this target (with a reason)
    ERROR = "ERROR"  # the harness failed, not the target
    XFAIL = "XFAIL"  # a declared deviation, seen as declared
    XPASS = "XPASS"  # a declared deviation that is gone
    SKIPPED = "SKIPPED"

    @property
    def is_failure(self) -> bool:
        return self in (Verdict.FAILED, Verdict.XPASS)


#: The order of columns in count lines and reports.
ORDER = [
    Verdict.OK,
    Verdict.FAILED,
    Verdict.NON_STRICT,
    Verdict.INFORMATIONAL,
    Verdict.UNIMPLEMENTED,
    Verdict.XFAIL,
    Verdict.XPASS,
    Verdict.ERROR,
    Verdict.SKIPPED,
]


def exit_code(verdicts: list[Verdict]) -> int:
    """0 clean, 1 any FAILED or XPASS, 2 any harness ERROR (and no failure)."""
    if any(v.is_failure for v in verdicts):
        return 1
    if any(v is Verdict.ERROR for v in verdicts):
        return 2
    return 0


class Level(StrEnum):
    """How binding the spec sentence at stake is; decides the verdict when no alternative matched."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    LOCAL_POLICY = "local-policy"

    @property
    def rank(self) -> int:
        return {Level.MUST: 3, Level.SHOULD: 2, Level.LOCAL_POLICY: 1}[self]

    @property
    def verdict(self) -> Verdict:
        """MUST -> FAILED, SHOULD -> NON-STRICT, local policy -> INFORMATIONAL."""
        return {Level.MUST: Verdict.FAILED, Level.SHOULD: Verdict.NON_STRICT}.get(self, Verdict.INFORMATIONAL)


@dataclass(frozen=True)
class SpecRef:
    """A spec sentence a case checks: ``RFC 3207 4.2`` / ``MUST`` / the sentence, in our words."""

    ref: str
    level: Level
    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", Level(self.level))  # a record read back from JSON gives the string

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "level": str(self.level), "text": self.text}
