"""The scenario runner's speed: runs per second in memory, and the wall time of ``smtplab run``. Asserts nothing.

    python3 benchmarks/bench_runner.py [--repeat 5] [--profile 20]

1. Runs (case x policy) per second of the whole catalogue in one process over the memory carrier, with no
   report directory (the runner, client engine, listener and real TLS only), then with captures written as
   ``smtplab run`` writes them (pcap + key log per run). The median of ``--repeat`` runs, after one warm-up.
2. The wall time of the default ``python3 -m lab run`` as a subprocess in a fresh working directory
   (interpreter start-up, imports, lab CA, every run, captures, all reports), median of ``--repeat``.
3. With ``--profile N``: the top N functions by own time and by cumulative time of one in-process run with
   captures (cProfile), to say where the time goes.

Targets (issue 9): > 400 runs/s in memory (no captures), < 2 s for the default run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.scenario.loader import load_cases  # noqa: E402
from lab.scenario.model import POLICIES  # noqa: E402
from lab.scenario.runner import RunOptions, run_cases  # noqa: E402

RUNS_PER_SECOND_TARGET = 400
CLI_SECONDS_TARGET = 2.0
CLI_TIMEOUT = 300.0  # one default run may not take longer than this


def in_memory(cases: list, state: Path, report: Path | None) -> tuple[int, float, float]:
    """One run of the catalogue: (runs, wall seconds, CPU seconds of this process)."""
    options = RunOptions(state_dir=state, report_dir=report, timestamps=False)
    begin, cpu = time.perf_counter(), time.process_time()
    result = run_cases(cases, list(POLICIES), options)
    return len(result.runs), time.perf_counter() - begin, time.process_time() - cpu


def cli_default(scratch: Path, index: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``python3 -m lab run`` in a fresh working directory; it must exit 0."""
    cwd = scratch / f"cli-{index}"
    cwd.mkdir()
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run"], cwd=cwd, env=env, capture_output=True, timeout=CLI_TIMEOUT
    )
    seconds = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"smtplab run exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def profile(cases: list, state: Path, report: Path, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run_cases(cases, list(POLICIES), RunOptions(state_dir=state, report_dir=report, timestamps=False))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="measurements per figure (median; default 5)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions")
    parser.add_argument("--no-cli", action="store_true", help="skip the subprocess figure")
    args = parser.parse_args()
    repeat = max(1, min(args.repeat, 50))

    cases = load_cases(None)
    with tempfile.TemporaryDirectory(prefix="smtplab-bench-") as tmp:
        scratch = Path(tmp)
        state = scratch / "state"
        in_memory(cases, state, None)  # warm-up: imports, the lab CA, the listener's TLS context
        bare = [in_memory(cases, state, None) for _ in range(repeat)]
        captured = [in_memory(cases, state, scratch / f"report-{i}") for i in range(repeat)]
        runs = bare[0][0]
        print(f"catalogue: {len(cases)} cases, {runs} runs (case x policy); load average {os.getloadavg()[0]:.2f}")
        target = f"   target > {RUNS_PER_SECOND_TARGET}"  # the target is for the runs alone, without captures
        for label, figures, wanted in (("no captures", bare, target), ("with captures", captured, "")):
            rates = [n / wall for n, wall, _ in figures]
            per_cpu = statistics.median(n / cpu for n, _, cpu in figures)
            print(
                f"in memory, {label:>13}: {statistics.median(rates):6.0f} runs/s (median of {repeat}; "
                f"min {min(rates):.0f}, max {max(rates):.0f}); {per_cpu:.0f} runs per CPU second{wanted}"
            )
        if not args.no_cli:
            walls = [cli_default(scratch, i) for i in range(repeat)]
            wall = [w for w, _ in walls]
            print(
                f"python3 -m lab run (default, subprocess): {statistics.median(wall):.2f} s (median of {repeat}; "
                f"min {min(wall):.2f}, max {max(wall):.2f}); CPU {statistics.median(c for _, c in walls):.2f} s"
                f"   target < {CLI_SECONDS_TARGET:.0f} s"
            )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        if args.profile:
            print(profile(cases, state, scratch / "report-profile", args.profile))


if __name__ == "__main__":
    main()
