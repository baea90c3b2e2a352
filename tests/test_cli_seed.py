"""The seed's steps through ``smtplab cli`` end to end: the file on disk, ``smtplab listeners``, and what a
served listener then does to a plaintext ``skip`` client as ``smtplab run`` judges it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from peers import free_port
from serving import fresh_loopback, serve

from lab.appliance.config import default_appliance_path, load_appliance
from lab.policy.modes import TLSMode

ROOT = Path(__file__).resolve().parent.parent
SEED = [line for line in (ROOT / "tests/golden/cli/seed.in").read_text().splitlines() if not line.startswith("#")]


def smtplab(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120
    )


def seed(config: Path) -> subprocess.CompletedProcess[str]:
    return smtplab("cli", "--config", str(config), stdin="\n".join(SEED) + "\n")


def test_seed_steps_write_required_and_listeners_shows_it(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    done = seed(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Do you want to allow encrypted TLS connections?\n1. No\n2. Preferred\n3. Required\n[1]> 3" in done.stdout
    assert "Please use the 'certconfig' command" in done.stdout
    assert "Changes committed to" in done.stdout
    appliance = load_appliance(config)
    assert appliance.listener("Inboundmail").defaults.tls is TLSMode.REQUIRED
    assert "# read top to bottom; the first group that matches decides" in config.read_text()  # comments kept
    shown = smtplab("listeners", "--config", str(config))
    assert shown.returncode == 0
    inbound = shown.stdout.split("Name: Outboundmail")[0]
    assert "TLS: Required" in inbound


def test_demo_certificate_reminder_when_tls_turns_on(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    text = default_appliance_path().read_text().replace("    certificate: esa-lab\n    rat:", "    rat:")
    config.write_text(text)
    done = seed(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "presents the INSECURE built-in demo certificate: create one with 'certconfig' and assign it with "
        "listenerconfig > edit > certificate." in done.stdout
    )


def test_invalid_commit_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    shutil.copy(default_appliance_path(), config)
    before = config.read_bytes()
    answers = ["listenerconfig", "edit", "Outboundmail", "interface", "1", "25", "", "", "commit", "quit", "y"]
    done = smtplab("cli", "--config", str(config), stdin="\n".join(answers) + "\n")
    assert done.returncode == 3
    refusal = [line for line in done.stdout.splitlines() if line.startswith("Error: commit refused:")]
    assert refusal == [
        f"Error: commit refused: {config}:40: listeners[1].port: listener 'Inboundmail' already uses interface "
        "PublicNet port 25"
    ]
    assert config.read_bytes() == before


def test_out_of_range_menu_number_reprompts_with_one_line(tmp_path: Path) -> None:
    answers = [*SEED[: SEED.index("3")], "9", *SEED[SEED.index("3") :]]
    done = smtplab("cli", "--config", str(tmp_path / "a.yaml"), stdin="\n".join(answers) + "\n")
    menu = "Do you want to allow encrypted TLS connections?\n1. No\n2. Preferred\n3. Required\n"
    assert f"{menu}[1]> 9\nError: '9' is not a choice: enter a number from 1 to 3\n\n{menu}[1]> 3\n" in done.stdout
    assert done.returncode == 3  # a scripted session with a refused answer says so
    assert load_appliance(tmp_path / "a.yaml").listener("Inboundmail").defaults.tls is TLSMode.REQUIRED


def test_bad_config_is_one_line_exit_3(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    config.write_text("hostname: esa.lab.example\ninterfaces: []\nlisteners: []\n")
    done = smtplab("cli", "--config", str(config))
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and str(config) in done.stderr and "Traceback" not in done.stderr


def _skip_verdict(config: Path, workdir: Path) -> str:
    """Serve ``config``'s Inboundmail and judge the ``skip`` client against it as a Required listener."""
    host = fresh_loopback()
    port = free_port(host)
    other = fresh_loopback()
    with serve(
        workdir,
        "--config",
        str(config),
        "--bind",
        f"Inboundmail={host}:{port}",
        "--bind",
        f"Outboundmail={other}:{free_port(other)}",
        host=host,
        port=port,
    ):
        report = workdir / "report"
        done = smtplab(
            "run",
            "--target",
            f"{host}:{port}",
            "--policy",
            "required",
            str(ROOT / "scenarios/clients/skip.yaml"),
            "--report-dir",
            str(report),
            "--no-timestamps",
        )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    runs = json.loads((report / "index.json").read_text())["runs"]
    return str(runs[0]["verdict"])


def test_run_verdict_of_skip_changes_after_the_cli_sets_required(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    shutil.copy(default_appliance_path(), config)
    assert _skip_verdict(config, tmp_path / "before") == "FAILED"  # No: the plaintext mail was delivered
    assert seed(config).returncode == 0
    assert _skip_verdict(config, tmp_path / "after") == "INFORMATIONAL"  # Required: MAIL refused with 530
