"""The appliance as a sender (docs/senders.md, "Sender kinds"): its delivery engine under each destination
control, judged against every receiver case by the same table as any other sender."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.cli import main
from lab.errors import BadInput
from lab.policy.modes import DeliveryTLS
from lab.scenario.result import load_index
from lab.scenario.verdict import Verdict
from lab.sender.appliancesender import ApplianceSender
from lab.sender.cases import load_sender_cases
from lab.sender.command import senders_for

CASES = load_sender_cases()


def test_the_appliance_meets_every_receiver_case(tmp_path: Path) -> None:
    code = main(["run", "--sender", "appliance", "--report-dir", str(tmp_path), "--no-timestamps"])
    assert code == 0
    result = load_index(tmp_path / "index.json")
    assert len(result.runs) == len(CASES) * len(DeliveryTLS)
    assert {run.target for run in result.runs} == {"appliance"}
    assert not [run.name for run in result.runs if run.verdict not in (Verdict.OK, Verdict.INFORMATIONAL)]
    # the local choices are INFORMATIONAL, never OK or FAILED: after a 421 a Preferred appliance keeps the message
    informational = sorted((run.case, str(run.policy)) for run in result.runs if run.verdict is Verdict.INFORMATIONAL)
    assert informational == [("SND-3207-4-03", "preferred"), ("SND-3207-4-03", "preferred-verify")]
    kept = next(r for r in result.runs if r.case == "SND-3207-4-03" and str(r.policy) == "preferred")
    assert kept.observed["outcome"] == "deferred" and kept.observed["delivered"] is False
    # what the appliance did is in its own mail log, in the transcript
    wrong_name = next(r for r in result.runs if r.case == "SND-DC-04" and str(r.policy) == "required-verify")
    lines = [entry.text for entry in wrong_name.transcript if entry.text.startswith("mail log: ")]
    assert any("TLS certificate unverified: certificate-host-mismatch" in line for line in lines)
    assert wrong_name.observed["plaintext_exposure"] == {"envelope": False, "body": False}
    assert (tmp_path / "captures" / "SND-3207-4-02-required.pcap").is_file()


def test_appliance_policies_are_chosen_like_the_lab_engines() -> None:
    assert senders_for("appliance:verify,may") == [
        ApplianceSender(DeliveryTLS.PREFERRED),
        ApplianceSender(DeliveryTLS.REQUIRED_VERIFY),
    ]
    with pytest.raises(BadInput, match="'sometimes' is not one of"):
        senders_for("appliance:sometimes")
