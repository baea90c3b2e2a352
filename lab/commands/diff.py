"""``smtplab diff OLD NEW``: what changed between two runs, case by case; exit 1 when anything regressed.

OLD and NEW are ``index.json`` files or the report directories holding them. One line per changed case
(REGRESSED / IMPROVED / added / removed), then ``N regressed, N improved, N unchanged``. The verdict ranking
is ``lab.conformance.baseline.RANK`` (docs/conformance.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lab.conformance.baseline import Kind, compare, exit_code_of, summary
from lab.errors import BadInput
from lab.report import INDEX_JSON
from lab.scenario.result import RunResult, load_index

HELP = "compare two result records (index.json) case by case; exit 1 if anything regressed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", metavar="OLD", type=Path, help="the baseline: index.json or its report directory")
    parser.add_argument("new", metavar="NEW", type=Path, help="the run to judge: index.json or its directory")
    parser.add_argument("--all", action="store_true", help="also list the unchanged cases")


def load_record(path: Path) -> RunResult:
    """``index.json`` itself, or the one inside a report directory; problems are ``BadInput`` (exit 3)."""
    return load_index(path / INDEX_JSON if path.is_dir() else path)


def run(args: argparse.Namespace) -> int:
    old, new = load_record(args.old), load_record(args.new)
    try:
        changes = compare(old, new)
    except BadInput as exc:
        exc.file = str(args.old if "old" in exc.problem else args.new)
        raise
    for change in changes:
        if change.kind is not Kind.UNCHANGED or args.all:
            print(change.line())
    print(summary(changes))
    return exit_code_of(changes)
