"""Verdicts and how they map to exit codes (DESIGN.md principle 5)."""

from __future__ import annotations

from enum import StrEnum


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
