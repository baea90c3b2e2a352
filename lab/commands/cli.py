"""``smtplab cli``: an appliance-style command line (listenerconfig, certconfig, commit ...) over an appliance
file (docs/cli.md). Interactive at a terminal; answers from ``--script FILE`` or stdin otherwise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from lab.appliance_cli.context import Context
from lab.appliance_cli.delivery import RECEIVER_MODES, parse_receivers
from lab.appliance_cli.document import ConfigDocument
from lab.appliance_cli.shell import Shell
from lab.appliance_cli.terminal import Terminal, script_lines
from lab.errors import BadInput
from lab.net.topology import default_topology, load_topology

HELP = (
    "appliance-style configuration CLI (listenerconfig, hostaccess, certconfig, destconfig, alertconfig, "
    "tlsverify, commit) over an appliance file"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default="appliance.yaml",
        help="the appliance file to edit (default ./appliance.yaml); while it does not exist, the CLI starts "
        "from the built-in appliance and the first commit creates it",
    )
    parser.add_argument(
        "--topology",
        metavar="FILE",
        help="tlsverify resolves MX hosts in this topology's virtual DNS (default: the built-in topology)",
    )
    parser.add_argument(
        "--receiver",
        metavar="HOST=MODE",
        action="append",
        default=[],
        help=f"tlsverify: what the lab serves at MX host HOST; MODE one of {', '.join(RECEIVER_MODES)} "
        "(default: tls, or no-starttls for a host whose behaviour is skip); repeatable",
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
    receivers = parse_receivers(args.receiver)
    topology = load_topology(args.topology) if args.topology else default_topology()
    label = f"topology {args.topology}" if args.topology else "the built-in topology"
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
        return Shell(Context(term, doc, topology, label, receivers)).run()
    finally:
        if stream is not sys.stdin:
            stream.close()
