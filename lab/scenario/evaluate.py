"""Judge what one run observed against a case's expected alternatives (honest verdicts: docs/architecture.md).

Pure: no I/O, no clock. The first alternative whose conditions all hold decides; when none does, the verdict
is that of the strongest spec level among the case's refs (MUST -> FAILED, SHOULD -> NON-STRICT, local
policy -> INFORMATIONAL) and the reason names the closest alternative's unmet conditions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lab.scenario.facts import describe_missing
from lab.scenario.model import Alternative, Case
from lab.scenario.verdict import Level, Verdict

NO_MATCH = "no expected alternative matched"
PLAINTEXT_UNDER_REQUIRED = (
    "plaintext delivery accepted under Required: the message was taken without TLS (docs/rules.md §2)"
)


STARTTLS_GATE = 530  # "Must issue a STARTTLS command first": the Required gate, which cases test, not a side issue
INCONCLUSIVE = "inconclusive: the target refused the transaction for a reason this case does not test"
_TRANSACTION = re.compile(r"^(?:[^.]+\.)?(MAIL|RCPT|DATA|DOT)(?:/tls)?(?:#\d+)?$")


def unrelated_refusal(alternatives: Sequence[Alternative], observed: Mapping[str, Any]) -> str | None:
    """``DOT/tls: 451``: the first refused MAIL, RCPT, DATA or end of data whose reply no alternative names
    (greylisting, a queue that defers, a recipient or sender the target does not take), or ``None``."""
    replies = observed.get("replies")
    if not isinstance(replies, Mapping):
        return None
    named = {c.key.removeprefix("replies.") for alt in alternatives for c in alt.when if c.key.startswith("replies.")}
    for label, code in replies.items():
        if not isinstance(code, int) or code < 400 or code == STARTTLS_GATE or label in named:
            continue
        if _TRANSACTION.match(label):
            return f"{label}: {code}"
    return None


@dataclass(frozen=True)
class Evaluation:
    verdict: Verdict
    alternative: Alternative | None  # the alternative that decided, or None (fallback, not run)
    reason: str  # one sentence: why this verdict
    unmet: tuple[str, ...] = ()  # the closest alternative's unmet conditions, on a fallback


def evaluate(
    case: Case,
    policy: str,
    observed: Mapping[str, Any],
    *,
    external: bool,
    missing_facts: Sequence[str] = (),
    unshown: str | None = None,
) -> Evaluation:
    """The verdict of ``case`` under ``policy`` given ``observed``; ``external``: the target is not the lab's;
    ``missing_facts``: target facts the case needs that the target did not declare; ``unshown``: why the
    target's mail log cannot show an event the case reads (lab.scenario.logevents.unlogged)."""
    policy = str(policy)
    if policy not in case.policies:
        return Evaluation(Verdict.SKIPPED, None, f"the case does not run under policy {policy!r}")
    if external and case.requires:
        return Evaluation(Verdict.UNIMPLEMENTED, None, f"{case.lab_only_reason()} (lab targets only)")
    if missing_facts:
        return Evaluation(Verdict.UNIMPLEMENTED, None, describe_missing(list(missing_facts)))
    if unshown:
        return Evaluation(Verdict.UNIMPLEMENTED, None, unshown)
    if policy == "required" and observed.get("delivered_plaintext") is True and case.remote_mta is None:
        # docs/rules.md §2: Required refuses plaintext mail; whatever else a case expects, taking it is broken.
        return Evaluation(Verdict.FAILED, None, PLAINTEXT_UNDER_REQUIRED)
    return judge(case.expect.for_policy(policy), case.strongest_level, policy, observed)


def judge(alternatives: Sequence[Alternative], level: Level, policy: str, observed: Mapping[str, Any]) -> Evaluation:
    """The first alternative whose conditions hold, else ``level``'s verdict with the closest alternative's unmet
    conditions (listener cases through ``evaluate``, receiver cases through ``lab.sender.run``)."""
    for alt in alternatives:
        if not alt.unmet(observed):
            return Evaluation(alt.verdict, alt, alt.label)
    if not alternatives:  # the loader refuses this; kept total for hand-built cases
        return Evaluation(level.verdict, None, f"{NO_MATCH}: the case lists none for {policy!r}")
    refusal = unrelated_refusal(alternatives, observed)
    if refusal is not None and level.verdict in (Verdict.FAILED, Verdict.NON_STRICT):
        # A transaction the target refused for a reason the case does not test shows nothing about its rule.
        reason = f"{INCONCLUSIVE} ({refusal}); the case's {level} was not put to the test"
        return Evaluation(Verdict.ERROR, None, reason)
    ranked = sorted(enumerate(alternatives), key=lambda item: (len(item[1].unmet(observed)), item[0]))
    closest = ranked[0][1]
    unmet = tuple(closest.unmet(observed))
    reason = f"{NO_MATCH} ({level} at stake); closest: {closest.label!r} ({closest.verdict}) wanted " + "; ".join(unmet)
    return Evaluation(level.verdict, None, reason, unmet)
