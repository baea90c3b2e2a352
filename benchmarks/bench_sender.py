"""The whole receiver-case catalogue against one sender: wall time, end to end. Prints figures.

    python3 benchmarks/bench_sender.py [--level encrypt] [--repeat 3]

1. ``smtplab run --sender lab`` (the lab's client engine, every destination control, in memory) in a child
   process, ``--repeat`` times.
2. ``smtplab run --sender PROFILE`` for a temporary Postfix whose smtp client runs at ``--level``
   (tests/peers/postfix_sender.py; root and Postfix needed), ``--repeat`` times: the receivers, the route files,
   one message per case through Postfix's sendmail, the wait for every outcome, the reports. The Postfix instance
   is started once, before the timing, and stopped by PID at the end; each repeat uses fresh receiver addresses.

The issue's bound is 60 s of wall time for the whole catalogue against one real sender.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the peers test-helper package (tests/peers)

from peers import make_peer_workdir, postfix  # noqa: E402
from peers.postfix_sender import PostfixSender  # noqa: E402

from lab.tls.certs import LabCA, default_state_dir  # noqa: E402

RUN_TIMEOUT = 300.0


def timed_run(sender: str, report: Path) -> tuple[float, int, Counter[str]]:
    argv = [sys.executable, "-m", "lab", "run", "--sender", sender, "--report-dir", str(report), "--no-timestamps"]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO, check=False)
    wall = time.perf_counter() - began
    if done.returncode not in (0, 1):
        raise SystemExit(f"{sender}: exit {done.returncode}\n{done.stderr}")
    runs = json.loads((report / "index.json").read_text())["runs"]
    return wall, done.returncode, Counter(run["verdict"] for run in runs)


def report_line(name: str, walls: list[float], code: int, verdicts: Counter[str]) -> None:
    spread = f"min {min(walls):.2f} s, max {max(walls):.2f} s" if len(walls) > 1 else ""
    counts = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
    print(f"{name:<28} median {statistics.median(walls):6.2f} s  {spread}  exit {code}  ({counts})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default="encrypt", choices=["none", "may", "encrypt", "verify", "secure"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smtplab-bench-sender-"))
    walls = []
    for i in range(args.repeat):
        wall, code, verdicts = timed_run("lab", work / f"lab-{i}")
        walls.append(wall)
    report_line("lab (5 policies x 17 cases)", walls, code, verdicts)
    reason = postfix.unavailable_reason()
    if reason:
        print(f"postfix-{args.level}: skipped ({reason})")
        return
    peer = PostfixSender(
        make_peer_workdir(), "127.77.240.2", level=args.level, ca_file=LabCA(default_state_dir()).ca_path
    )  # type: ignore[arg-type]
    peer.start()
    try:
        walls = []
        for i in range(args.repeat):
            profile = work / f"postfix-{i}.yaml"
            profile.write_text(peer.profile_yaml(f"postfix-{args.level}", args.level, f"127.77.{241 + i}.0/24"))
            wall, code, verdicts = timed_run(str(profile), work / f"postfix-{i}")
            walls.append(wall)
        report_line(f"postfix {args.level} (17 cases)", walls, code, verdicts)
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
