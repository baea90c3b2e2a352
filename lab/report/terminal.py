"""The terminal view: the behaviour x policy matrix, every problem spelt out, and the counts line last.

On a TTY it has colour; into a pipe or a CI log it is plain text of a fixed width (the same bytes whatever
``COLUMNS`` says), and the progress bar stays silent. Peer text is shown through ``visible`` and rich markup is
off, so a hostile transcript can neither move the cursor nor restyle the report.
"""

from __future__ import annotations

import io
import sys
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from lab.policy.modes import POLICY_ORDER
from lab.report import (
    GLYPHS,
    PROBLEMS,
    counts_line,
    ladder,
    line_kind,
    observed_facts,
    referenced_keys,
    refs_at_stake,
    transcript_window,
    visible,
)
from lab.scenario.result import CaseRun, RunResult, is_sender_run
from lab.scenario.verdict import ORDER, Verdict

#: Width of non-terminal output: fixed, so CI logs and golden files do not depend on the runner's terminal.
PLAIN_WIDTH = 100
#: A matrix cell lists one glyph per run up to this many runs, then switches to counts.
MAX_GLYPHS = 12

STYLES: dict[Verdict, str] = {
    Verdict.OK: "green",
    Verdict.FAILED: "bold red",
    Verdict.NON_STRICT: "yellow",
    Verdict.INFORMATIONAL: "cyan",
    Verdict.UNIMPLEMENTED: "dim",
    Verdict.XFAIL: "green",
    Verdict.XPASS: "bold red",
    Verdict.ERROR: "bold magenta",
    Verdict.SKIPPED: "dim",
}
LINE_STYLES = {
    "plain-sent": "bold yellow",
    "plain-recv": "yellow",
    "tls-sent": "bold green",
    "tls-recv": "green",
    "error": "bold red",
    "note": "dim",
}


def make_console(file: IO[str] | None = None) -> Console:
    """Colour and the real width on a TTY; otherwise no escape codes at all and ``PLAIN_WIDTH`` columns."""
    out = sys.stdout if file is None else file
    tty = bool(getattr(out, "isatty", lambda: False)())
    return Console(
        file=out,
        force_terminal=tty,
        color_system="auto" if tty else None,
        width=None if tty else PLAIN_WIDTH,
        markup=False,
        emoji=False,
        highlight=False,
        soft_wrap=False,
    )


def _policies(runs: list[CaseRun]) -> list[str]:
    present = {str(r.policy) for r in runs}
    return [p for p in POLICY_ORDER if p in present]


def _cell(runs: list[CaseRun]) -> Text:
    if len(runs) <= MAX_GLYPHS:
        return Text.assemble(*((GLYPHS[r.verdict], STYLES[r.verdict]) for r in runs))
    parts: list[tuple[str, str] | str] = []
    for verdict in ORDER:
        n = sum(r.verdict is verdict for r in runs)
        if n:
            parts += [" " if parts else "", (f"{n}{GLYPHS[verdict]}", STYLES[verdict])]
    return Text.assemble(*parts)


def matrix(result: RunResult) -> list[tuple[str, Table]]:
    """``(target, table)`` per target: rows client behaviours (in run order), columns policies, cells glyphs."""
    by_target: dict[str, list[CaseRun]] = {}
    for run in result.runs:
        by_target.setdefault(run.target, []).append(run)
    tables = []
    for target, runs in by_target.items():
        policies = _policies(runs)
        table = Table()
        table.add_column("receiver case" if is_sender_run(runs[0]) else "client behaviour")
        for policy in policies:
            table.add_column(str(policy))
        behaviours = list(dict.fromkeys(r.client for r in runs))
        for behaviour in behaviours:
            cells = [_cell([r for r in runs if r.client == behaviour and r.policy == p]) for p in policies]
            table.add_row(visible(behaviour), *cells)
        tables.append((target, table))
    return tables


def legend() -> Text:
    return Text("  ").join(Text.assemble((GLYPHS[v], STYLES[v]), f" {v}") for v in ORDER)


def problem_block(run: CaseRun) -> list[Text]:
    """What failed, in the order a reader asks: which case, expected, actual, which sentence, the wire."""
    title = Text.assemble((f"{run.verdict} ", STYLES[run.verdict]), visible(f"{run.name} {run.title}"))
    lines = [title, Text(visible(f"  target {run.target}, client {run.client}, carrier {run.carrier}"))]
    lines.append(Text(visible(f"  Expected: {run.expectation}")))
    if run.expected is not None:
        lines.append(Text(visible(f"  Decided by: [{run.expected.verdict}] {run.expected.label}")))
    lines.append(Text(visible(f"  Actual:   {run.reason}")))
    facts = ", ".join(f"{k}={v}" for k, v in observed_facts(run, referenced_keys(run)))
    if facts:
        lines.append(Text(visible(f"  Observed: {facts}")))
    for ref in refs_at_stake(run):
        lines.append(Text(visible(f'  Spec {ref.ref} ({ref.level}): "{ref.text}"')))
    if run.deviation:
        lines.append(Text(visible(f"  Declared deviation: {run.deviation}")))
    start, window = transcript_window(run)
    if window:
        lines.append(Text(f"  Transcript (lines {start + 1}-{start + len(window)} of {len(run.transcript)}):"))
        for entry in window:
            lines.append(Text("    ") + Text(visible(entry.line), LINE_STYLES.get(line_kind(entry), "")))
    if run.capture:
        keylog = f" (keylog {run.keylog})" if run.keylog else ""
        lines.append(Text(visible(f"  Capture: {run.capture}{keylog}")))
    return lines


def render(result: RunResult, console: Console) -> None:
    """The whole summary; the last line is the counts line and nothing else."""
    seed = f"seed {result.seed}, carrier {result.carrier}" + (f", started {result.started}" if result.started else "")
    console.print(Text(visible(f"{result.tool}: {len(result.runs)} runs, {seed}")), soft_wrap=True)
    for target, table in matrix(result):
        console.print(Text(visible(f"target {target}"), "bold"), soft_wrap=True)
        console.print(table)
    console.print(legend(), soft_wrap=True)
    problems = [r for r in result.runs if r.verdict in PROBLEMS]
    if problems:
        console.print()
        console.print(Text("Problems", "bold"), soft_wrap=True)
        for run in problems:
            console.print()
            for line in problem_block(run):
                console.print(line, soft_wrap=True)
    weak = [r for r in result.runs if r.verdict is Verdict.NON_STRICT]
    if weak:
        console.print()
        console.print(Text("SHOULD not met (NON-STRICT)", "bold"), soft_wrap=True)
        for run in weak:
            console.print(Text(visible(f"  {run.name} {run.target}: {run.reason}")), soft_wrap=True)
    console.print()
    counts_style = "bold red" if result.exit_code() == 1 else ("bold magenta" if result.exit_code() else "bold green")
    console.print(Text(counts_line(result), counts_style), soft_wrap=True)


def print_ladder(run: CaseRun, console: Console) -> None:
    """One run's ladder diagram (``smtplab report DIR --ladder RUN``), coloured like its transcript on a TTY."""
    title = Text.assemble((f"{run.verdict} ", STYLES[run.verdict]), visible(f"{run.name} {run.title}"))
    console.print(title, soft_wrap=True)
    for line, style in ladder.text_lines(ladder.of_run(run), console.width):
        console.print(Text(line, LINE_STYLES.get(style, "bold")), soft_wrap=True)
    console.print()


def summary_text(result: RunResult) -> str:
    """The summary as a CI log would hold it (no colour, ``PLAIN_WIDTH`` columns)."""
    buffer = io.StringIO()
    render(result, make_console(buffer))
    return buffer.getvalue()


class ProgressReporter:
    """A progress bar while cases run, on a TTY only: CI logs get no bar and no carriage returns."""

    def __init__(self, total: int, description: str = "cases", file: IO[str] | None = None) -> None:
        self.console = make_console(file)
        self.enabled = self.console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self.total = total
        self.description = description
        self.done = 0

    def __enter__(self) -> ProgressReporter:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[current]}"),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, current="")
        return self

    def advance(self, current: str = "") -> None:
        """One more run done; ``current`` names it (e.g. ``3207-4-02[required]``)."""
        self.done += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, current=visible(current))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
