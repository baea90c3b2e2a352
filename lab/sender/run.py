"""Run the receiver cases against one sender and judge each from the receivers' side (docs/senders.md).

The sender (``lab.sender.seam.ISender``) delivers; this module turns each case's ``Delivery`` into observations
(``lab.sender.observe``: what crossed in plaintext comes from the capture), judges them against the case's
alternatives for the sender's declared destination control, and builds the one result record every report is a
view of. Whatever the harness could not decide (the sender could not be started, never connected within the
bounded wait) is an ERROR with its reason, never a FAILED.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from lab import __version__
from lab.errors import HarnessError
from lab.net.pcap import write_pcap
from lab.scenario.evaluate import Evaluation, judge
from lab.scenario.result import CaseRun, Expected, RunResult, Target, Timings, TLSInfo
from lab.scenario.verdict import Verdict
from lab.sender.cases import SenderCase
from lab.sender.observe import observe
from lab.sender.receivers import Staged
from lab.sender.seam import MAIL_FROM, Delivery, ISender
from lab.smtp.transcript import Entry, Kind, error, note
from lab.tls.certs import LabCA, default_state_dir

NEVER_TRIED = "the sender never connected to this case's receiver within the wait: nothing to judge"


def run_sender(
    sender: ISender,
    cases: Sequence[SenderCase],
    *,
    report_dir: Path | None = None,
    state_dir: Path | None = None,
    seed: int = 0,
    timestamps: bool = True,
) -> RunResult:
    ca = LabCA(state_dir or default_state_dir())
    started = time.perf_counter()
    wanted = [case for case in cases if str(sender.policy) in case.policies]
    try:
        deliveries: list[Delivery | None] = list(sender.deliver(wanted, ca))
        failure = None
    except HarnessError as exc:
        deliveries, failure = [None] * len(wanted), str(exc)
    wall = (time.perf_counter() - started) * 1000 / max(len(wanted), 1)
    runs = [
        _case_run(sender, case, delivery, failure, report_dir, seed, wall if timestamps else None)
        for case, delivery in zip(wanted, deliveries, strict=True)
    ]
    return RunResult(
        tool=f"smtplab {__version__}",
        seed=seed,
        carrier=sender.carrier,
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if timestamps else None,
        targets=[Target(sender.name, sender.address, sender.policy)],
        runs=runs,
    )


def _case_run(
    sender: ISender,
    case: SenderCase,
    delivery: Delivery | None,
    failure: str | None,
    report_dir: Path | None,
    seed: int,
    wall_ms: float | None,
) -> CaseRun:
    policy = str(sender.policy)
    transcript = list(delivery.entries) if delivery is not None else []
    capture = keylog = None
    if delivery is None:
        evaluation = Evaluation(Verdict.ERROR, None, f"harness error: {failure}")
        observed = None
    else:
        staged = delivery.staged
        observed = observe(case, staged.factory, staged.capture, MAIL_FROM, staged.box_notes())
        if not observed["delivered"] and delivery.sender_outcome is not None:
            observed.outcome = delivery.sender_outcome
        if delivery.error is not None:
            evaluation = Evaluation(Verdict.ERROR, None, f"harness error: {delivery.error}")
        elif not observed["connections"]:
            evaluation = Evaluation(Verdict.ERROR, None, f"harness error: {NEVER_TRIED}")
        else:
            evaluation = judge(case.expect.for_policy(policy), case.strongest_level, policy, observed)
        capture, keylog = _write_capture(case, policy, delivery, report_dir, seed)
        if sender.carrier != "memory":  # the lab engine's own transcript says it all; another sender's does not
            transcript += receiver_view(staged)
    if evaluation.verdict is Verdict.ERROR:
        transcript.append(error(evaluation.reason, Kind.HARNESS))
    alt = evaluation.alternative
    tls = None
    if observed is not None and observed.get("tls") and observed.get("tls_version"):
        tls = TLSInfo(observed["tls_version"], "")
    return CaseRun(
        case=case.id,
        title=case.title,
        section=case.section,
        spec_refs=list(case.refs),
        description=case.description,
        expectation=case.expectation,
        client=case.label,
        target=sender.name,
        policy=policy,  # type: ignore[arg-type]  # coerced to DeliveryTLS by CaseRun
        carrier=sender.carrier,
        verdict=evaluation.verdict,
        reason=evaluation.reason,
        expected=None if alt is None else Expected(alt.verdict, alt.label, alt.to_dict()["conditions"]),
        observed=observed if observed is not None else {},  # type: ignore[arg-type]
        transcript=transcript,
        tls=tls,
        timings=Timings(
            virtual_s=round(delivery.seconds, 6) if delivery is not None else 0.0,
            wall_ms=None if wall_ms is None else round(wall_ms, 3),
        ),
        capture=capture,
        keylog=keylog,
    )


def receiver_view(staged: Staged) -> list[Entry]:
    """What the receiver read, connection by connection: the sender's commands as the remote MTA saw them."""
    out = []
    for number, session in enumerate(staged.factory.sessions, 1):
        for tls, line in session.commands:
            out.append(note(f"receiver, connection {number}, {'TLS' if tls else 'plaintext'}: {line}", Kind.RECEIVER))
        if session.tls_error:
            out.append(note(f"receiver, connection {number}: handshake failed ({session.tls_error})", Kind.RECEIVER))
    return out


def _write_capture(
    case: SenderCase, policy: str, delivery: Delivery, report_dir: Path | None, seed: int
) -> tuple[str | None, str | None]:
    staged = delivery.staged
    if report_dir is None or not staged.capture.flows:
        return None, None
    stem = f"{case.id}-{policy}"
    write_pcap(staged.capture, report_dir / "captures" / f"{stem}.pcap", seed=seed)
    if not staged.keylog:
        return f"captures/{stem}.pcap", None
    staged.keylog.write(report_dir / "captures" / f"{stem}.keys.log")
    return f"captures/{stem}.pcap", f"captures/{stem}.keys.log"
