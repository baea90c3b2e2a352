"""``smtplab run --sender SPEC``: the receiver cases against a sender, and the same reports as for listeners.

``SPEC`` is ``lab`` (the lab's client engine under every destination control), ``lab:POLICY[,POLICY...]``,
``appliance[:POLICY,...]`` (the appliance's own delivery engine), or a sender profile
(conformance/senders/*.yaml). Selectors pick receiver cases by id prefix (``SND-DC``) or file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lab.errors import BadInput
from lab.policy.modes import DELIVERY_TLS_SPELLINGS, DeliveryTLS, parse_delivery_tls
from lab.scenario.result import RunResult, Target
from lab.sender.appliancesender import ApplianceSender
from lab.sender.cases import load_sender_cases
from lab.sender.external import ExternalSender, load_sender_profile
from lab.sender.labsender import LabSender
from lab.sender.run import run_sender
from lab.sender.seam import ISender


def senders_for(spec: str) -> list[ISender]:
    """The senders a ``--sender`` value names; a bad one is ``BadInput`` naming ``--sender``."""
    kind, _, rest = spec.partition(":")
    built_in: dict[str, Callable[[DeliveryTLS], ISender]] = {"lab": LabSender, "appliance": ApplianceSender}
    if kind in built_in:
        if not rest:
            return [built_in[kind](policy) for policy in DeliveryTLS]
        chosen = []
        for word in rest.split(","):
            policy = parse_delivery_tls(word)
            if policy is None:
                raise BadInput(f"{word!r} is not one of {DELIVERY_TLS_SPELLINGS}", field="--sender")
            chosen.append(policy)
        return [built_in[kind](policy) for policy in DeliveryTLS if policy in chosen]
    if not Path(spec).is_file():
        raise BadInput(
            f"{spec!r} is neither lab[:POLICY], appliance[:POLICY] nor a sender profile file", field="--sender"
        )
    return [ExternalSender(load_sender_profile(spec))]


def run_senders(
    spec: str, selectors: list[str], *, report_dir: Path | None, seed: int = 0, timestamps: bool = True
) -> RunResult:
    senders = senders_for(spec)
    cases = load_sender_cases(selectors)
    if not cases:
        raise BadInput("no receiver case matches " + " ".join(selectors), field="selectors")
    return merge_results(
        [run_sender(s, cases, report_dir=report_dir, seed=seed, timestamps=timestamps) for s in senders]
    )


def merge_results(results: list[RunResult]) -> RunResult:
    """One record of one ``--sender`` value's runs (a result per destination control it names)."""
    first = results[0]
    targets = first.targets
    if len(results) > 1:  # several controls (lab, appliance): one target whose policy varies per run
        targets = [Target(targets[0].name, targets[0].address, None)]
    return RunResult(
        seed=first.seed,
        carrier=first.carrier,
        started=first.started,
        targets=targets,
        runs=[run for result in results for run in result.runs],
    )
