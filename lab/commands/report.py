"""``smtplab report DIR``: rebuild junit.xml and index.html from DIR/index.json and print the summary.

Nothing is re-run: the record is the only input, so the views of an old run can be redrawn (or drawn by a newer
smtplab) from the file alone. The exit code is the record's: 0 clean, 1 failures, 2 harness errors.
``--ladder NAME`` prints the ladder diagrams of the named runs instead of the summary; ``--ladder`` alone, those
of the failed runs (FAILED, XPASS, ERROR).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lab.errors import BadInput
from lab.report import INDEX_JSON, PROBLEMS, write_views
from lab.report.terminal import make_console, print_ladder, render
from lab.scenario.result import CaseRun, RunResult, load_index

HELP = "rebuild junit.xml and index.html from DIR/index.json, print the summary, exit with the run's code"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="a report directory written by `smtplab run`")
    parser.add_argument(
        "--ladder",
        action="append",
        nargs="?",
        const="",
        metavar="RUN",
        help="print the ladder diagram of RUN (CASE[POLICY], CASE[POLICY@TARGET] or a case id for all its runs) "
        "instead of the summary; repeatable; without RUN: every FAILED, XPASS and ERROR run",
    )


def select_runs(result: RunResult, wanted: list[str]) -> list[CaseRun]:
    """The runs ``--ladder`` names, in run order; an unknown name is bad input (exit 3)."""
    chosen: list[CaseRun] = []
    for name in wanted:
        if not name:
            found = [run for run in result.runs if run.verdict in PROBLEMS]
        else:
            found = [
                run for run in result.runs if name in (run.case, run.name, f"{run.case}[{run.policy}@{run.target}]")
            ]
            if not found:
                raise BadInput(f"--ladder: no run named {name!r} (CASE[POLICY] or a case id)")
        chosen += [run for run in found if run not in chosen]
    return chosen


def run(args: argparse.Namespace) -> int:
    """``BadInput`` (missing or malformed index.json) propagates: the dispatcher prints one line and exits 3."""
    report_dir = Path(args.dir)
    result = load_index(report_dir / INDEX_JSON)
    wanted = getattr(args, "ladder", None)  # callers that build the Namespace themselves may leave it out
    runs = select_runs(result, wanted) if wanted else None
    write_views(result, report_dir)
    console = make_console()
    if runs is None:
        render(result, console)
    elif not runs:
        console.print("no FAILED, XPASS or ERROR run to draw", soft_wrap=True)
    for case_run in runs or []:
        print_ladder(case_run, console)
    return result.exit_code()
