"""``smtplab cli`` driven by answers on stdin: every dialog against a golden transcript (tests/golden/cli).

Each ``NAME.in`` is a script of answers; ``NAME.txt`` is what the CLI printed for it, then ``exit: N`` and the
appliance file as the session left it. Regenerate after an intended change with ``SMTPLAB_REGOLD=1``.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from lab.cli import main

GOLDEN = Path(__file__).parent / "golden" / "cli"
SCRIPTS = sorted(path.stem for path in GOLDEN.glob("*.in"))


def run_cli(
    tmp_path: Path,
    script: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config: str = "appliance.yaml",
) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = main(["cli", "--config", config])
    return code, capsys.readouterr().out


def transcript(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    code, out = run_cli(tmp_path, (GOLDEN / f"{name}.in").read_text(), monkeypatch, capsys)
    config = tmp_path / "appliance.yaml"
    written = config.read_text() if config.exists() else "(not written)\n"
    return f"{out}exit: {code}\n--- appliance.yaml\n{written}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_dialog_matches_golden_transcript(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    got = transcript(tmp_path, name, monkeypatch, capsys)
    golden = GOLDEN / f"{name}.txt"
    if os.environ.get("SMTPLAB_REGOLD"):
        golden.write_text(got)
    assert got == golden.read_text()


def test_every_dialog_has_a_golden_transcript() -> None:
    covered = "\n".join((GOLDEN / f"{name}.in").read_text().lower() for name in SCRIPTS)
    for word in (
        "listenerconfig",
        "certconfig",
        "destconfig",
        "alertconfig",
        "tlsverify",
        "commit",
        "clear",
        "hostaccess",
        "default",
        "move",
        "import",
        "export",
        "certificate",
        "new",
        "delete",
        "setup",
    ):
        assert f"\n{word}\n" in covered, word
