"""The ``smtplab`` command: a thin dispatcher over ``lab.commands``.

Errors a user can cause print one line and exit 3; a fault of the lab itself exits 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from lab import __version__
from lab.errors import EXIT_BAD_INPUT, EXIT_HARNESS, BadInput, HarnessError

#: subcommand -> module in lab.commands, in the order ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "run": "run",
    "list": "list",
    "report": "report",
    "diff": "diff",
    "probe": "probe",
    "serve": "serve",
    "listeners": "listeners",
    "track": "track",
    "tls-report": "tls_report",
    "cli": "cli",
    "demo": "demo",
    "netns": "netns",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smtplab", description="SMTP STARTTLS policy lab and conformance suite")
    parser.add_argument("--version", action="version", version=f"smtplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"lab.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["run"] if "run" in COMMANDS else ["--help"]
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args._run(args))
    except BadInput as exc:
        print(f"smtplab: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except HarnessError as exc:
        print(f"smtplab: harness error: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except OSError as exc:  # the machine said no (a directory that cannot be written, a full disk ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"smtplab: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_HARNESS
    except KeyboardInterrupt:
        return 130
