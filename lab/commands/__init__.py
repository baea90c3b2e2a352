"""One module per ``smtplab`` subcommand; each has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse


def add_case_selectors(parser: argparse.ArgumentParser) -> None:
    """The positional case selection ``smtplab run`` and ``smtplab list`` share (``args.selectors``)."""
    parser.add_argument(
        "selectors",
        nargs="*",
        metavar="PATH-or-ID-PREFIX",
        help="scenario files or directories, or case id prefixes (3207-4, POL, ATK-STRIP); default: all cases",
    )
