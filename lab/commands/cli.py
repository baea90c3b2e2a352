"""``smtplab cli``: an appliance-style command line (listenerconfig, certconfig, commit ...) over an appliance
file (docs/cli.md). Interactive at a terminal; answers from ``--script FILE`` or stdin otherwise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from lab.appliance_cli.context import Context
from lab.appliance_cli.document import ConfigDocument
from lab.appliance_cli.shell import Shell
from lab.appliance_cli.terminal import Terminal, script_lines
from lab.errors import BadInput

HELP = "appliance-style configuration CLI (listenerconfig, hostaccess, certconfig, commit) over an appliance file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default="appliance.yaml",
        help="the appliance file to edit (default ./appliance.yaml); while it does not exist, the CLI starts "
        "from the built-in appliance and the first commit creates it",
    )
    parser.add_argument(
        "--script",
        metavar="FILE",
        help="read the answers from FILE, one per line (default: stdin; interactive when stdin is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if path.exists() and not path.is_file():
        raise BadInput("not a regular file", file=str(path), field="--config")
    doc = ConfigDocument(path)
    stream: TextIO
    if args.script:
        try:
            stream = open(args.script, encoding="utf-8")  # noqa: SIM115 - closed below, after the session
        except OSError as exc:
            raise BadInput(exc.strerror or str(exc), file=args.script, field="--script") from None
    else:
        stream = sys.stdin
    try:
        answers = None if stream.isatty() else script_lines(stream)
        term = Terminal(answers)
        if not doc.exists:
            term.say(f"{path} does not exist yet: editing a copy of the built-in appliance; commit creates it.")
        return Shell(Context(term, doc)).run()
    finally:
        if stream is not sys.stdin:
            stream.close()
