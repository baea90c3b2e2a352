"""A person at a terminal: tmux types into the interactive ``smtplab cli`` (readline, Tab completion) and reads
the screen back. tmux is a tool dependency like swaks: missing skips locally, fails under CI=true."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from serving import need_tool

from lab.appliance.config import load_appliance
from lab.policy.modes import TLSMode


def test_typing_the_seed_steps_into_the_interactive_cli(tmp_path: Path) -> None:
    tmux = need_tool("tmux")
    socket = str(tmp_path / "tmux.sock")
    config = tmp_path / "appliance.yaml"
    session = "smtplabcli"

    def tm(*args: str) -> str:
        return subprocess.run([tmux, "-S", socket, *args], capture_output=True, text=True, timeout=30).stdout

    def screen() -> str:
        return tm("capture-pane", "-p", "-J", "-S", "-200", "-t", session)

    def wait_for(check: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + 30  # an upper bound only, for a loaded machine
        while time.monotonic() < deadline:
            text = screen()
            if check(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"{what} never appeared:\n{screen()}")

    def answer(keys: str, expect: str) -> str:
        before = screen()  # the prompt answered may end like the next one ([1]> after [1]>): wait for a change
        tm("send-keys", "-t", session, keys, "Enter")
        return wait_for(lambda text: text.rstrip() != before.rstrip() and text.rstrip().endswith(expect), repr(expect))

    command = f"{shlex.quote(sys.executable)} -m lab cli --config {shlex.quote(str(config))}"
    tm("new-session", "-d", "-s", session, "-x", "200", "-y", "50", command)
    try:
        wait_for(lambda text: text.rstrip().endswith("esa.lab.example>"), "the prompt")
        tm("send-keys", "-t", session, "listenerc", "Tab")  # readline completes the command
        wait_for(lambda text: text.rstrip().endswith("listenerconfig"), "the completed command")
        answer("", "[]>")
        answer("edit", "[]>")
        answer("1", "[]>")
        answer("hostaccess", "[]>")
        text = answer("default", "[10M]>")
        for expect in ("[10]>", "[10]>", "[1000]>", "[N]>", "[N]>", "[N]>"):
            text = answer("", expect)
        text = answer("", "[1]>")
        assert "Do you want to allow encrypted TLS connections?\n1. No\n2. Preferred\n3. Required\n[1]>" in text
        tm("send-keys", "-t", session, "7", "Enter")  # the same prompt comes back: wait for the error above it
        wait_for(lambda text: "Error: '7' is not a choice: enter a number from 1 to 3" in text, "the error")
        wait_for(lambda text: text.rstrip().endswith("[1]>"), "the prompt again")
        answer("3", "[N]>")
        text = answer("", "[]>")  # back from the walk to hostaccess
        assert "Use TLS: Required" in text
        text = answer("", "[]>")  # to the listener's operations, under its summary
        assert "TLS: Required" in text
        answer("", "[]>")  # to listenerconfig
        answer("", "esa.lab.example>")
        text = answer("commit", "esa.lab.example>")
        assert f"Changes committed to {config}." in text
        tm("send-keys", "-t", session, "quit", "Enter")
    finally:
        tm("kill-server")
    assert load_appliance(config).listener("Inboundmail").defaults.tls is TLSMode.REQUIRED
