"""``smtplab cli`` outbound dialogs driven through stdin: destconfig and alertconfig write what the loader then
reads (comments kept), and tlsverify really delivers through the lab's engine to the topology's MX host."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from lab.appliance.config import load_appliance
from lab.appliance.model import AlertRecipient
from lab.cli import main
from lab.policy.destinations import DestinationControl, DestinationTLS


def cli(
    tmp_path: Path,
    answers: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *options: str,
) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{a}\n" for a in [*answers, "quit"])))
    code = main(["cli", "--config", "appliance.yaml", *options])
    return code, capsys.readouterr().out


def test_destconfig_new_edit_default_delete_write_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = [
        "destconfig",
        "new",
        "shop.example",
        "3",
        "20",
        "",
        "1000",
        "",  # Required, 20 connections, 1000 recipients an hour
        "edit",
        "bank.example",
        "5",
        "",
        "7",
        "",
        "",  # Required (Verify), 7 messages per connection
        "default",
        "1",
        "",
        "",
        "",
        "",  # the default: No
        "delete",
        ".partner.example",
        "y",
        "",
        "commit",
    ]
    code, out = cli(tmp_path, answers, monkeypatch, capsys)
    assert code == 0, out
    assert "Changes committed to appliance.yaml." in out
    text = (tmp_path / "appliance.yaml").read_text()
    assert "# TLS with a certificate that verifies, or nothing" in text  # secure.example's comment survives
    destinations = load_appliance(tmp_path / "appliance.yaml").outbound.destinations
    assert destinations.default.tls is DestinationTLS.NO
    assert set(destinations.entries) == {"bank.example", "secure.example", "shop.example"}
    assert destinations.entries["shop.example"] == DestinationControl(
        "shop.example", DestinationTLS.REQUIRED, 20, 50, 1000, "Default"
    )
    assert destinations.entries["bank.example"].tls is DestinationTLS.REQUIRED_VERIFY
    assert destinations.entries["bank.example"].max_messages_per_connection == 7
    assert destinations.lookup("a.partner.example").tls is DestinationTLS.NO  # the entry is gone: the default


def test_destconfig_taking_every_default_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        tmp_path,
        ["destconfig", "edit", "1", "", "", "", "", "", "default", "", "", "", "", "", "", "commit"],
        monkeypatch,
        capsys,
    )
    assert code == 0
    assert "no data to commit" in out
    assert not (tmp_path / "appliance.yaml").exists()


def test_alertconfig_new_edit_delete_setup_write_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = [
        "alertconfig",
        "new",
        "noc@example.com",
        "system, 6",
        "3",  # System and Antispam, Warning
        "edit",
        "postmaster@example.com",
        "",
        "1",
        "1",  # every class and severity
        "setup",
        "n",
        "",
        "commit",
        "alertconfig",
        "delete",
        "2",
        "y",
        "",
        "commit",
    ]
    code, out = cli(tmp_path, answers, monkeypatch, capsys)
    assert code == 0, out
    outbound = load_appliance(tmp_path / "appliance.yaml").outbound
    assert outbound.alerts_enabled is False
    assert outbound.alert_recipients == (AlertRecipient("postmaster@example.com"),)
    assert "Alerts: disabled (logged only)" in out
    assert "  noc@example.com         System, Antispam  Warning" in out


def test_a_refused_answer_is_one_line_and_exit_3_in_a_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        tmp_path, ["destconfig", "new", "x@y", "z.example", "9", "2", "", "", "", "", ""], monkeypatch, capsys
    )
    assert code == 3
    assert "Error: 'x@y' is not a domain (example.com) or .domain (its subdomains)" in out
    assert "Error: '9' is not a choice: enter a number from 1 to 5" in out


def test_tlsverify_preferred_falls_back_to_the_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        tmp_path, ["tlsverify partner.example"], monkeypatch, capsys, "--receiver", "mx.partner.example=no-starttls"
    )
    assert code == 0, out
    assert "Destination control for partner.example: TLS Preferred (the default destination)" in out
    assert "which offers no STARTTLS" in out
    assert "TLS connection to 198.51.100.10 failed: STARTTLS not advertised (starttls-not-supported)." in out
    assert "Verdict under Preferred: the test message was delivered in the clear" in out
    assert "Info: Message done DCID 1 MID 1 to RID [0]" in out


def test_tlsverify_required_verify_refuses_a_wrong_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(
        tmp_path, ["tlsverify secure.example"], monkeypatch, capsys, "--receiver", "mx.secure.example=wrong-name"
    )
    assert code == 0, out
    assert "Destination control for secure.example: TLS Required (Verify) (its own entry)" in out
    assert "TLS connection established: protocol TLSv1.3" in out
    assert "TLS certificate not verified: certificate-host-mismatch." in out
    assert (
        "Verdict under Required (Verify): deferred: Required (Verify) demands TLS with a verified certificate, "
        "so nothing was sent" in out
    )
    assert "an alert went to postmaster@example.com" in out
    assert "Warning: DCID 1 IP 198.51.100.50 TLS was required but could not be successfully negotiated" in out
    assert "Message done" not in out


def test_tlsverify_preferred_verify_logs_an_unverified_certificate_and_delivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        "networks: [{name: n, subnet: 198.51.100.0/24}, {name: p, subnet: 192.168.0.0/16}]\n"
        "hosts:\n"
        "  - {name: esa, role: appliance, addresses: [192.168.2.1, 192.168.1.1], appliance: builtin}\n"
        "  - {name: a, role: mta, addresses: [198.51.100.10], dns_names: [a.mx.test]}\n"
        "dns:\n"
        "  - {type: MX, domain: eu.partner.example, preference: 10, exchange: a.mx.test}\n"
    )
    code, out = cli(
        tmp_path,
        ["tlsverify eu.partner.example"],
        monkeypatch,
        capsys,
        "--topology",
        str(topology),
        "--receiver",
        "a.mx.test=untrusted",
    )
    assert code == 0, out
    assert "TLS Preferred (Verify) (the .partner.example entry)" in out
    assert f"MX a.mx.test (preference 10) [198.51.100.10] in the virtual DNS of topology {topology}" in out
    assert "TLS certificate not verified: certificate-not-trusted." in out
    assert "Verdict under Preferred (Verify): the test message was delivered over TLS." in out


def test_a_bad_receiver_flag_is_one_line_and_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cli", "--config", str(tmp_path / "a.yaml"), "--receiver", "mx.bank.example=sometimes"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--receiver" in err and "'mx.bank.example=sometimes'" in err
