"""``smtplab listeners`` prints the outbound side after the listeners: the default destination and each
destination control (TLS, limits, bounce profile), the bounce profiles and the alert recipients."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.appliance.config import default_appliance_path
from lab.cli import main


def test_the_built_in_appliance_ends_with_its_outbound_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["listeners"]) == 0
    out = capsys.readouterr().out
    listeners, _, outbound = out.partition("\n\nOutbound delivery\n")
    assert "Host Access Table of Outboundmail" in listeners
    assert outbound.splitlines() == [
        "Interface: PublicNet (192.168.2.1/24)",
        "Certificate: esa-lab",
        "Destination controls (an entry inherits what it leaves out from Default):",
        "  Destination       TLS                 Max Conns  Msgs/Conn  Rcpts/Hour  Bounce Profile",
        "  Default           Preferred           500        50         unlimited   Default",
        "  bank.example      Required            500        50         unlimited   Default",
        "  secure.example    Required (Verify)   500        50         unlimited   Default",
        "  .partner.example  Preferred (Verify)  500        50         unlimited   Default",
        "Bounce profiles:",
        "  Default: first retry after 60s, waits up to 3600s, 100 retries, at most 259200s in queue, DSN sent",
        "Alerts: enabled",
        "  Recipient               Classes  Severities",
        "  postmaster@example.com  System   Critical, Warning",
    ]


def test_entries_inherit_the_default_and_alerts_can_be_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = default_appliance_path().read_text()
    head = text[: text.index("outbound:")]
    config = tmp_path / "appliance.yaml"
    config.write_text(
        head + "outbound:\n"
        "  default_destination: {tls: no, max_concurrency: 20, max_recipients_per_hour: 600}\n"
        "  destination_controls:\n"
        "    - {domain: slow.example, bounce_profile: Patient, max_messages_per_connection: 1}\n"
        "  bounce_profiles:\n"
        "    - {name: Patient, initial_wait: 300, max_wait: 7200, max_retries: 10, max_time_in_queue: 86400,\n"
        "       send_bounces: false}\n"
        "  alerts: {enabled: false}\n"
    )
    assert main(["listeners", "--config", str(config)]) == 0
    outbound = capsys.readouterr().out.partition("\n\nOutbound delivery\n")[2].splitlines()
    assert "Certificate: none (no client certificate is presented)" in outbound
    assert "  Default       No   20         50         600         Default" in outbound
    assert "  slow.example  No   20         1          600         Patient" in outbound
    assert (
        "  Patient: first retry after 300s, waits up to 7200s, 10 retries, at most 86400s in queue, DSN not sent"
    ) in outbound
    assert outbound[-2:] == ["Alerts: disabled (logged only)", "  (no alert recipients)"]
