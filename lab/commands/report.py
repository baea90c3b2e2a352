"""``smtplab report DIR``: rebuild junit.xml and index.html from DIR/index.json and print the summary.

Nothing is re-run: the record is the only input, so the views of an old run can be redrawn (or drawn by a newer
smtplab) from the file alone. The exit code is the record's: 0 clean, 1 failures, 2 harness errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lab.report import INDEX_JSON, write_views
from lab.report.terminal import make_console, render
from lab.scenario.result import load_index

HELP = "rebuild junit.xml and index.html from DIR/index.json, print the summary, exit with the run's code"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="a report directory written by `smtplab run`")


def run(args: argparse.Namespace) -> int:
    """``BadInput`` (missing or malformed index.json) propagates: the dispatcher prints one line and exits 3."""
    report_dir = Path(args.dir)
    result = load_index(report_dir / INDEX_JSON)
    write_views(result, report_dir)
    render(result, make_console())
    return result.exit_code()
