"""The runner: one record per case x policy with the observations, captures and verdicts; external targets.

In-process tests use the memory carrier (virtual time). The loopback carrier and external targets run in a
``smtplab run`` subprocess, which owns its reactor, against ``smtplab serve`` on its own 127.x address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from serving import serve

from lab.policy.modes import TLSMode
from lab.scenario.loader import load_case_file, load_cases
from lab.scenario.logevents import MailLogFile
from lab.scenario.result import CaseRun
from lab.scenario.runner import ExternalTarget, RunOptions, run_cases
from lab.scenario.verdict import Verdict


def run(cases: list[Any], tmp_path: Path, policies: tuple[str, ...] = ("no", "preferred", "required"), **kw: Any):
    options = RunOptions(carrier="memory", state_dir=tmp_path / "state", timestamps=False, **kw)
    return run_cases(cases, policies, options)


def one(result: Any, case: str, policy: str) -> CaseRun:
    (found,) = [r for r in result.runs if r.case == case and str(r.policy) == policy]
    return found


def test_a_run_records_observations_transcript_and_verdict(tmp_path: Path) -> None:
    result = run(load_cases(["3207-4-08"]), tmp_path)
    assert [(r.case, str(r.policy)) for r in result.runs] == [
        ("3207-4-08", "no"),
        ("3207-4-08", "preferred"),
        ("3207-4-08", "required"),
    ]
    tls = one(result, "3207-4-08", "preferred")
    assert tls.verdict is Verdict.OK and tls.reason == "delivered inside TLS"
    assert tls.client == "prefer" and tls.target == "lab:Inboundmail" and tls.carrier == "memory"
    assert tls.observed["delivered_tls"] is True and tls.observed["spooled"] == 1
    assert tls.observed["plaintext_exposure"] == {"envelope": False, "body": False}
    logged = tls.observed["server_log"]  # typed events, each with its rendered line
    assert any("TLS success protocol TLSv1.3" in event["line"] for event in logged)
    assert {
        "event": "tls_success",
        "fields": {"icid": 1, "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
    } in [{"event": e["event"], "fields": e["fields"]} for e in logged]
    assert tls.tls is not None and tls.tls.version == "TLSv1.3"
    assert any(line.startswith(" ~> MAIL FROM:") for line in tls.lines)
    assert tls.timings.virtual_s > 0 and tls.timings.wall_ms is None  # timestamps off: nothing wall-clock
    plain = one(result, "3207-4-08", "no")
    assert plain.observed["plaintext_exposure"] == {"envelope": True, "body": True}
    assert any(line.startswith(" -> MAIL FROM:<alice@example.net>") for line in plain.lines)
    assert result.exit_code() == 0


def test_runs_are_deterministic(tmp_path: Path) -> None:
    cases = load_cases(["3207-4.2-03", "ATK-STRIP-03"])
    first = [r.to_dict() for r in run(cases, tmp_path / "a", seed=7).runs]
    second = [r.to_dict() for r in run(cases, tmp_path / "b", seed=7).runs]
    assert first == second


def test_captures_are_written_beside_the_reports(tmp_path: Path) -> None:
    report = tmp_path / "report"
    result = run(load_cases(["3207-4-08"]), tmp_path, policies=("preferred",), report_dir=report)
    (tls,) = result.runs
    assert tls.capture == "captures/3207-4-08-preferred.pcap"
    assert (report / tls.capture).read_bytes()[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")  # pcap magic
    assert tls.keylog is not None and b"CLIENT_HANDSHAKE_TRAFFIC_SECRET" in (report / tls.keylog).read_bytes()


def test_a_policy_outside_the_case_is_not_run(tmp_path: Path) -> None:
    result = run(load_cases(["3207-4.1-07"]), tmp_path)  # policies: [preferred, required]
    assert [str(r.policy) for r in result.runs] == ["preferred", "required"]


def test_a_harness_fault_is_an_error_not_a_failure(tmp_path: Path) -> None:
    text = Path(load_cases(["3207-4-08"])[0].file or "").read_text(encoding="utf-8")
    path = tmp_path / "nohost.yaml"
    path.write_text(text.replace("host: mta-prefer", "host: no-such-host"), encoding="utf-8")
    result = run([load_case_file(path)], tmp_path, policies=("preferred",))
    (only,) = result.runs
    assert only.verdict is Verdict.ERROR
    assert "no-such-host" in only.reason
    assert result.exit_code() == 2


def test_lab_only_cases_are_unimplemented_against_an_external_target(tmp_path: Path) -> None:
    """No connection is even tried: the target's port has nothing behind it. (A middlebox is not lab-only: the
    relay runs it in front of the target, tests/test_relay.py.) A case that reads log events needs the target's
    mail log (a declared fact); with it, an event the log's dialect has no line for keeps it UNIMPLEMENTED."""
    target = ExternalTarget("nothing", "127.0.0.1", 9, TLSMode.PREFERRED)
    result = run(load_cases(["ATK-INJECT-01", "POL-HAT-03"]), tmp_path, target=target)
    assert [(r.case, str(r.policy), r.verdict) for r in result.runs] == [
        ("POL-HAT-03", "preferred", Verdict.UNIMPLEMENTED),
        ("ATK-INJECT-01", "preferred", Verdict.UNIMPLEMENTED),
    ]
    assert "the lab's mail log" in one(result, "POL-HAT-03", "preferred").reason
    reason = one(result, "ATK-INJECT-01", "preferred").reason
    assert "needs a declared target fact" in reason and "--maillog FILE" in reason
    logged = ExternalTarget(
        "nothing", "127.0.0.1", 9, TLSMode.PREFERRED,
        facts={"maillog": True}, maillog=MailLogFile(tmp_path / "maillog", "postfix"),
    )  # fmt: skip
    result = run(load_cases(["ATK-INJECT-01"]), tmp_path / "second", target=logged)
    (only,) = result.runs
    assert only.verdict is Verdict.UNIMPLEMENTED
    assert only.reason.startswith("the target's postfix mail log has no line for: plaintext pipelined behind")


def smtplab_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", "run", "--no-timestamps", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def verdicts(report: Path) -> dict[tuple[str, str], str]:
    index = json.loads((report / "index.json").read_text(encoding="utf-8"))
    return {(r["case"], r["policy"]): r["verdict"] for r in index["runs"]}


def test_an_external_target_is_judged_by_the_same_cases(tmp_path: Path) -> None:
    with serve(tmp_path / "served", "--tls", "preferred") as served:
        report = tmp_path / "report"
        done = smtplab_run(
            "--target",
            f"{served.host}:{served.port}",
            "--policy",
            "preferred",
            "--report-dir",
            str(report),
            "--to",
            "bob@example.com",
            "3207-4-08",
            "3207-4-04",
            "3207-4.2-03",
            "ATK-STRIP-01",
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert verdicts(report) == {
            ("3207-4-04", "preferred"): "OK",
            ("3207-4-08", "preferred"): "OK",
            ("3207-4.2-03", "preferred"): "OK",
            ("ATK-STRIP-01", "preferred"): "INFORMATIONAL",  # stripped by the relay in front of it: downgraded
        }
        assert served.maildir_new()  # the target really took mail


def test_a_target_that_does_not_behave_as_declared_fails(tmp_path: Path) -> None:
    """A server set to No, declared Required: the plaintext delivery it accepts breaks the expectation."""
    with serve(tmp_path / "served", "--tls", "no") as served:
        report = tmp_path / "report"
        done = smtplab_run(
            "--target", f"{served.host}:{served.port}", "--policy", "required", "--report-dir", str(report), "3207-4-01"
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert verdicts(report) == {("3207-4-01", "required"): "FAILED"}
        assert "plaintext delivery accepted under Required" in done.stdout  # the failure names what broke


@pytest.mark.parametrize("selection", [["3207-4.2-03", "ATK-STRIP-04"]])
def test_the_loopback_carrier_gives_the_same_verdicts(tmp_path: Path, selection: list[str]) -> None:
    loop, memory = tmp_path / "loop", tmp_path / "memory"
    assert smtplab_run("--carrier", "loopback", "--report-dir", str(loop), *selection).returncode == 0
    assert smtplab_run("--carrier", "memory", "--report-dir", str(memory), *selection).returncode == 0
    assert verdicts(loop) == verdicts(memory)
    assert len(verdicts(loop)) == 6


def test_parallel_jobs_give_the_serial_record(tmp_path: Path) -> None:
    """``-j 2`` runs in worker processes; the record (order, verdicts, transcripts) is the serial one."""
    cases = load_cases(["3207-4.2", "ATK-STRIP-01", "POL-HAT-01"])
    serial = [r.to_dict() for r in run(cases, tmp_path / "a").runs]
    parallel = [r.to_dict() for r in run(cases, tmp_path / "b", jobs=2).runs]
    assert len(serial) == len(parallel) > 10
    assert parallel == serial


def test_an_unreachable_target_is_a_harness_error_not_failed_cases(tmp_path: Path) -> None:
    """Nothing listens: one error for the whole run (exit 2), not a FAILED verdict per case."""
    from lab.errors import HarnessError

    target = ExternalTarget("nothing", "127.0.0.1", 9, TLSMode.PREFERRED)
    with pytest.raises(HarnessError, match=r"cannot reach nothing at 127\.0\.0\.1:9"):
        run(load_cases(["3207-4-01"]), tmp_path, target=target)
    done = smtplab_run("--target", "127.0.0.1:9", "--policy", "preferred", "3207-4-01", "--report-dir", str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip().endswith("cannot reach 127.0.0.1:9: Connection refused")


def test_run_with_a_baseline_fails_only_on_regressions(tmp_path: Path) -> None:
    """``--baseline``: the same results pass; a listener that drifted from Required to Preferred regresses."""
    cases = ["3207-4-01", "3207-4-06", "3207-4.2-01"]
    with serve(tmp_path / "good", "--tls", "required") as good:
        first = smtplab_run(
            "--target",
            f"{good.host}:{good.port}",
            "--policy",
            "required",
            "--report-dir",
            str(tmp_path / "base"),
            *cases,
        )
        assert first.returncode == 0, first.stdout + first.stderr
        baseline = str(tmp_path / "base" / "index.json")
        again = smtplab_run(
            "--target",
            f"{good.host}:{good.port}",
            "--policy",
            "required",
            "--name",
            f"{good.host}:{good.port}",
            "--baseline",
            baseline,
            "--report-dir",
            str(tmp_path / "again"),
            *cases,
        )
        assert again.returncode == 0, again.stdout + again.stderr
    with serve(tmp_path / "drifted", "--tls", "preferred") as drifted:
        worse = smtplab_run(
            "--target",
            f"{drifted.host}:{drifted.port}",
            "--policy",
            "required",
            "--name",
            f"{good.host}:{good.port}",
            "--baseline",
            baseline,
            "--report-dir",
            str(tmp_path / "worse"),
            *cases,
        )
    assert worse.returncode == 1, worse.stdout + worse.stderr
    diff = subprocess.run(
        [sys.executable, "-m", "lab", "diff", baseline, str(tmp_path / "worse" / "index.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert diff.returncode == 1 and "REGRESSED" in diff.stdout and "3207-4-01" in diff.stdout


def test_unwritable_places_are_one_line_errors(tmp_path: Path) -> None:
    """A report dir or state dir the machine refuses: one line naming it, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad_report = smtplab_run("--report-dir", str(blocker / "report"), "3207-4-01")
    assert bad_report.returncode == 3 and "Traceback" not in bad_report.stderr
    assert bad_report.stderr.strip() == (f"smtplab: --report-dir: cannot create {blocker / 'report'}: Not a directory")
    env = {**os.environ, "SMTPLAB_STATE": str(blocker / "state")}
    bad_state = subprocess.run(
        [sys.executable, "-m", "lab", "run", "--report-dir", str(tmp_path / "r"), "3207-4-01"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad_state.returncode == 2 and "Traceback" not in bad_state.stderr
    assert str(blocker / "state") in bad_state.stderr and len(bad_state.stderr.strip().splitlines()) == 1
