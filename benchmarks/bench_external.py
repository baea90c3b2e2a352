"""The whole catalogue against one external loopback target: wall time, and where it goes. Prints figures.

    python3 benchmarks/bench_external.py [--peer auto|postfix-may|aiosmtpd-tls] [--repeat 3] [--jobs 1,2,4]

1. End to end, as a user runs it: ``smtplab run --target HOST:PORT --policy preferred --ca CA -j N`` in a
   child process, ``--repeat`` times for each N in ``--jobs``: wall time, runs, verdicts, the slowest cases.
2. In this process, once each: loading the catalogue; the runner with no report directory (no capture files);
   the runner writing pcaps and keylogs as ``smtplab run`` does. The difference is the cost of the captures.

The peer is Postfix with smtpd_tls_security_level = may (root and Postfix needed), else aiosmtpd with a TLS
context, on its own 127.x address and a free port (``peers``), stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the peers test-helper package (tests/peers)

from peers import Peer, aiosmtpd_peer, make_peer_workdir, next_address, postfix  # noqa: E402
from peers.aiosmtpd_peer import AiosmtpdPeer  # noqa: E402
from peers.postfix import PostfixPeer, postfix_version  # noqa: E402

from lab.tls.certs import LabCA  # noqa: E402

RUN_TIMEOUT = 300.0  # one catalogue run; the target is well under 30 s


def choose_peer(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    return "postfix-may" if postfix.available() else "aiosmtpd-tls"


def build_peer(name: str, root: Path, ca: LabCA) -> Peer:
    address = next_address()
    if name == "postfix-may":
        reason = postfix.unavailable_reason()
        if reason:
            raise SystemExit(f"postfix-may: {reason}")
        cert = ca.issue(name, ["postfix.peer.test", address])
        return PostfixPeer(root / name, address, None, "may", cert.cert_pem, cert.key_pem)
    reason = aiosmtpd_peer.unavailable_reason()
    if reason:
        raise SystemExit(f"aiosmtpd-tls: {reason}")
    cert = ca.issue(name, ["aiosmtpd.peer.test", address])
    return AiosmtpdPeer(root / name, address, None, "tls", cert.cert_pem, cert.key_pem)


def peer_version(name: str) -> str:
    if name.startswith("postfix"):
        version = postfix_version()
        return "Postfix " + (".".join(map(str, version)) if version else "?")
    from importlib.metadata import version as dist_version

    return f"aiosmtpd {dist_version('aiosmtpd')}"


def end_to_end(peer: Peer, ca: LabCA, root: Path, repeat: int, jobs: int) -> list[dict[str, Any]]:
    """``smtplab run`` in a child process, as a user runs it; every run bounded by RUN_TIMEOUT."""
    env = {**os.environ, "SMTPLAB_STATE": str(root / "lab-state"), "PYTHONPATH": str(REPO)}
    rows = []
    for i in range(repeat):
        report = root / f"report-{i}"
        argv = [
            sys.executable, "-m", "lab", "run", "--target", f"{peer.address}:{peer.port}", "--policy", "preferred",
            "--ca", str(ca.ca_path), "--report-dir", str(report), "-j", str(jobs),
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        wall = time.monotonic() - started
        index = json.loads((report / "index.json").read_text())
        runs = index["runs"]
        case_ms = [(r["timings"]["wall_ms"] or 0.0, r["case"]) for r in runs]
        rows.append(
            {
                "wall": wall,
                "exit": proc.returncode,
                "runs": len(runs),
                "verdicts": Counter(r["verdict"] for r in runs),
                "cases_s": sum(ms for ms, _ in case_ms) / 1000,
                "slowest": sorted(case_ms, reverse=True)[:3],
            }
        )
    return rows


def in_process(peer: Peer, ca: LabCA, root: Path) -> dict[str, float]:
    """The same catalogue through ``lab.scenario.runner`` directly: load, run without and with capture files."""
    from lab.policy.modes import TLSMode
    from lab.scenario.loader import load_cases
    from lab.scenario.runner import ExternalTarget, RunOptions, run_cases

    os.environ["SMTPLAB_STATE"] = str(root / "lab-state")
    started = time.perf_counter()
    cases = load_cases(None)
    load = time.perf_counter() - started
    target = ExternalTarget(
        name="bench", host=peer.address, port=peer.port, policy=TLSMode.PREFERRED,
        rcpt_to="postmaster@example.com", trust_pems=(ca.ca_pem,), timeout=15.0,
    )  # fmt: skip
    figures = {"load": load, "cases": float(len(cases))}
    for label, report_dir in (("no_captures", None), ("captures", root / "report-inproc")):
        started = time.perf_counter()
        run_cases(cases, ["preferred"], RunOptions(target=target, report_dir=report_dir, state_dir=root / "lab-state"))
        figures[label] = time.perf_counter() - started
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=["auto", "postfix-may", "aiosmtpd-tls"], default="auto")
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end runs (default 3)")
    parser.add_argument("--jobs", default="1,2,4", help="values of smtplab run -j, comma-separated (default 1,2,4)")
    args = parser.parse_args()
    try:
        jobs = [int(j) for j in args.jobs.split(",")]
    except ValueError:
        parser.error("--jobs is a comma-separated list of numbers")
    if not 1 <= args.repeat <= 20 or not all(1 <= j <= 64 for j in jobs):
        parser.error("--repeat must be 1-20 and each --jobs value 1-64")
    name = choose_peer(args.peer)
    root = make_peer_workdir(prefix="smtplab-bench-external-")
    ca = LabCA(root / "state")
    peer = build_peer(name, root, ca)
    try:
        started = time.monotonic()
        peer.start()
        up = time.monotonic() - started
        print(f"peer: {name} ({peer_version(name)}) on {peer.address}:{peer.port}, up in {up:.1f} s")
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
        for n in jobs:
            rows = end_to_end(peer, ca, root, args.repeat, n)
            print(f"\nsmtplab run --target ... --policy preferred -j {n}")
            for i, row in enumerate(rows, 1):
                verdicts = ", ".join(f"{v} {c}" for v, c in sorted(row["verdicts"].items()))
                slowest = ", ".join(f"{case} {ms / 1000:.2f} s" for ms, case in row["slowest"])
                print(
                    f"  run {i}: {row['wall']:.2f} s wall, exit {row['exit']}, {row['runs']} runs "
                    f"({verdicts}); sum of case times {row['cases_s']:.2f} s; slowest: {slowest}"
                )
            walls = [row["wall"] for row in rows]
            print(f"  -j {n}: median {statistics.median(walls):.2f} s, min {min(walls):.2f} s, max {max(walls):.2f} s")
        figures = in_process(peer, ca, root)
        print(f"\nin process ({figures['cases']:.0f} cases)")
        print(f"  load the catalogue       {figures['load']:.2f} s")
        print(f"  run, no capture files    {figures['no_captures']:.2f} s")
        print(f"  run, pcaps and keylogs   {figures['captures']:.2f} s")
        print(f"  so the capture files add {figures['captures'] - figures['no_captures']:.2f} s")
    finally:
        peer.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
