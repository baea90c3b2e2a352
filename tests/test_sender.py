"""Judging senders (docs/senders.md): the receiver cases against the lab's own client engine, against real
Postfix smtp clients at each smtp_tls_security_level and against swaks, and bad sender profiles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peers import make_peer_workdir, require_kind, require_peer, start_all, stop_all
from peers.postfix_sender import PostfixSender

from lab.cli import main
from lab.net.capture import Direction, Endpoint, Flow
from lab.policy.modes import DeliveryTLS, parse_delivery_tls
from lab.scenario.result import CaseRun, RunResult, load_index
from lab.scenario.verdict import Verdict
from lab.sender.cases import load_sender_cases
from lab.sender.command import run_senders
from lab.sender.external import load_sender_profile
from lab.sender.observe import plaintext_after_220
from lab.tls.certs import LabCA, default_state_dir

CASES = load_sender_cases()
SENDER_PROFILES = Path(__file__).resolve().parent.parent / "conformance" / "senders"
ROOT_CASES = Path(__file__).resolve().parent.parent / "scenarios" / "senders"


def run_cli(profile: Path, report: Path, *selectors: str) -> tuple[int, RunResult | None, str]:
    """``smtplab run --sender PROFILE`` in its own process (a real reactor: this one's belongs to pytest)."""
    argv = [sys.executable, "-m", "lab", "run", "--sender", str(profile), "--report-dir", str(report)]
    done = subprocess.run([*argv, "--no-timestamps", *selectors], capture_output=True, text=True, timeout=180)
    index = report / "index.json"
    return done.returncode, load_index(index) if index.is_file() else None, done.stderr


def verdicts(result: RunResult) -> dict[str, Verdict]:
    return {run.case: run.verdict for run in result.runs}


def test_policy_names_accept_esa_and_postfix_spellings() -> None:
    assert parse_delivery_tls("Preferred (Verify)") is DeliveryTLS.PREFERRED_VERIFY
    assert parse_delivery_tls("encrypt") is DeliveryTLS.REQUIRED
    assert parse_delivery_tls("secure") is parse_delivery_tls("verify") is DeliveryTLS.REQUIRED_VERIFY
    assert parse_delivery_tls("sometimes") is None


def test_plaintext_after_the_220_is_read_from_the_capture() -> None:
    flow = Flow(Endpoint("127.0.0.2", 1), Endpoint("127.0.0.3", 25), 0.0)
    flow.record(Direction.C2S, 0, b"EHLO x\r\nSTARTTLS\r\n")
    flow.record(Direction.S2C, 0, b"220 2.0.0 Ready to start TLS\r\n")
    flow.record(Direction.C2S, 0, b"\x16\x03\x01\x00\x05hello")
    assert not plaintext_after_220(flow)
    flow.record(Direction.C2S, 0, b"MAIL FROM:<a@b>\r\n")
    assert plaintext_after_220(flow)


def test_the_lab_engine_meets_every_receiver_case(tmp_path: Path) -> None:
    """The lab's model of a correct sender, held against the same table as any other sender."""
    code = main(["run", "--sender", "lab", "--report-dir", str(tmp_path), "--no-timestamps"])
    assert code == 0
    result = load_index(tmp_path / "index.json")
    assert len(result.runs) == len(CASES) * len(DeliveryTLS)
    assert {str(run.policy) for run in result.runs} == {str(p) for p in DeliveryTLS}
    assert not [run.name for run in result.runs if run.verdict not in (Verdict.OK, Verdict.INFORMATIONAL)]
    assert (tmp_path / "junit.xml").is_file() and (tmp_path / "index.html").is_file()
    assert (tmp_path / "captures" / "SND-3207-4-02-required.pcap").is_file()
    stripped = next(r for r in result.runs if r.case == "SND-7435-01" and str(r.policy) == "required")
    assert stripped.observed["plaintext_exposure"] == {"envelope": False, "body": False}


# -- real senders ---------------------------------------------------------------------------------------------

#: (smtp_tls_security_level, declared destination control): each level judged as what it is, and one Postfix at
#: may declared required, which the capture must catch.
POSTFIX_RUNS = [
    ("none", "none"),
    ("may", "may"),
    ("encrypt", "encrypt"),
    ("verify", "verify"),
    ("secure", "secure"),
    ("may", "required"),
]


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, RunResult]]:
    """The whole catalogue against six temporary Postfix senders at once (each its own instance and receivers'
    network), every one started on loopback and stopped by PID."""
    require_kind("postfix")
    ca = LabCA(default_state_dir())
    base = tmp_path_factory.mktemp("postfix-senders")
    peers = [
        PostfixSender(make_peer_workdir(), f"127.78.{10 + i}.2", level=level, ca_file=ca.ca_path)  # type: ignore[arg-type]
        for i, (level, _) in enumerate(POSTFIX_RUNS)
    ]
    start_all(peers)
    try:
        running = []
        for i, ((level, declared), peer) in enumerate(zip(POSTFIX_RUNS, peers, strict=True)):
            profile = base / f"{level}-as-{declared}.yaml"
            profile.write_text(peer.profile_yaml(f"postfix-{level}", declared, f"127.79.{10 + i}.0/24"))
            report = base / f"{level}-as-{declared}"
            argv = [sys.executable, "-m", "lab", "run", "--sender", str(profile), "--report-dir", str(report)]
            running.append(
                (
                    f"{level}-as-{declared}",
                    report,
                    subprocess.Popen(
                        [*argv, "--no-timestamps"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                    ),
                )
            )
        out = {}
        for key, report, proc in running:
            _, err = proc.communicate(timeout=240)
            assert (report / "index.json").is_file(), err
            out[key] = (proc.returncode, load_index(report / "index.json"))
        return out
    finally:
        stop_all(peers)


def by_case(result: RunResult) -> dict[str, CaseRun]:
    return {run.case: run for run in result.runs}


@pytest.mark.peer
def test_postfix_none_never_sends_starttls(postfix: dict[str, tuple[int, RunResult]]) -> None:
    code, result = postfix["none-as-none"]
    assert code == 0
    assert not any(run.observed["starttls_sent"] for run in result.runs)
    assert all(run.observed["delivered_plaintext"] for run in result.runs)


@pytest.mark.peer
def test_postfix_may_never_goes_on_in_plaintext_after_the_220(postfix: dict[str, tuple[int, RunResult]]) -> None:
    code, result = postfix["may-as-may"]
    runs = by_case(result)
    assert not any(run.observed["plaintext_after_220"] for run in result.runs)
    assert runs["SND-3207-4-02"].observed["delivered_plaintext"]  # 454: on in plaintext (RFC 7435)
    assert runs["SND-DC-02"].observed["delivered_tls"]  # self-signed: TLS, certificate not checked
    # docs/peers.md: the only rule Postfix at may breaks here is RFC 8996 (it negotiates TLS 1.0)
    assert code == 1 and {run.case for run in result.runs if run.verdict is Verdict.FAILED} == {"SND-8996-01"}


@pytest.mark.peer
def test_postfix_encrypt_sends_nothing_in_plaintext(postfix: dict[str, tuple[int, RunResult]]) -> None:
    code, result = postfix["encrypt-as-encrypt"]
    seen = verdicts(result)
    assert Verdict.ERROR not in seen.values(), [(r.case, r.reason) for r in result.runs if r.verdict is Verdict.ERROR]
    assert not any(run.observed["plaintext_exposure"]["envelope"] for run in result.runs)
    assert seen["SND-3207-4-02"] is Verdict.OK and seen["SND-DC-02"] is Verdict.OK  # 454: deferred; self-signed: TLS
    assert by_case(result)["SND-3207-4-02"].observed["outcome"] == "deferred"  # from Postfix's own log
    assert result.targets[0].policy == "required"
    assert code == 1 and {case for case, v in seen.items() if v is Verdict.FAILED} == {"SND-8996-01"}


@pytest.mark.peer
@pytest.mark.parametrize("level", ["verify", "secure"])
def test_postfix_verify_and_secure_refuse_certificates_that_do_not_verify(
    postfix: dict[str, tuple[int, RunResult]], level: str
) -> None:
    code, result = postfix[f"{level}-as-{level}"]
    assert code == 0, [(r.case, r.verdict, r.reason) for r in result.runs if r.verdict is not Verdict.OK]
    delivered = {run.case for run in result.runs if run.observed["delivered"]}
    assert "SND-DC-05" in delivered and not {"SND-DC-02", "SND-DC-03", "SND-DC-04"} & delivered
    assert not any(run.observed["plaintext_exposure"]["envelope"] for run in result.runs)


@pytest.mark.peer
def test_postfix_may_declared_required_is_caught(postfix: dict[str, tuple[int, RunResult]]) -> None:
    code, result = postfix["may-as-required"]
    assert code == 1
    failed = {run.case: run for run in result.runs if run.verdict is Verdict.FAILED}
    for case in ("SND-3207-4-01", "SND-3207-4-02", "SND-7435-01"):  # no STARTTLS, 454, stripped: plaintext
        assert case in failed and "plaintext" in failed[case].reason
        assert failed[case].observed["delivered_plaintext"] is True


def test_a_sender_that_cannot_start_is_an_error_not_a_failure(tmp_path: Path) -> None:
    profile = tmp_path / "broken.yaml"
    profile.write_text(
        "name: broken\npolicy: encrypt\nreceivers: {network: 127.79.200.0/24}\n"
        "start: [/nonexistent/sender, start]\nsubmit: {command: [/bin/true]}\nwait: 1\n"
    )
    code = main(["run", "--sender", str(profile), "--report-dir", str(tmp_path / "r"), "--no-timestamps"])
    assert code == 2
    result = load_index(tmp_path / "r" / "index.json")
    assert {run.verdict for run in result.runs} == {Verdict.ERROR}
    assert "start command" in result.runs[0].reason


def test_a_sender_that_never_delivers_is_an_error(tmp_path: Path) -> None:
    profile = tmp_path / "silent.yaml"
    profile.write_text(
        "name: silent\npolicy: may\nreceivers: {network: 127.79.201.0/24}\nsubmit: {command: [/bin/true]}\nwait: 1\n"
    )
    code, result, _ = run_cli(profile, tmp_path / "r", "SND-DC-05")
    assert code == 2 and result is not None
    assert [run.verdict for run in result.runs] == [Verdict.ERROR]
    assert "never connected" in result.runs[0].reason


def test_a_bad_profile_names_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("name: bad\npolicy: sometimes\nsubmit: {command: [/bin/true]}\n")
    assert main(["run", "--sender", str(profile), "--report-dir", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert f"{profile}:2: policy:" in err and "Traceback" not in err


@pytest.mark.peer
def test_swaks_with_tls_is_judged_as_required(tmp_path: Path) -> None:
    """swaks --tls (the shipped profile) connects to each receiver itself and quits when TLS fails."""
    require_peer("swaks", shutil.which("swaks") is not None, "apt-get install swaks")
    code, result, err = run_cli(SENDER_PROFILES / "swaks-tls.yaml", tmp_path / "r")
    assert result is not None and code == 1, err
    seen = verdicts(result)
    assert all(not run.observed.get("plaintext_exposure", {}).get("envelope") for run in result.runs)
    assert seen["SND-DC-05"] is Verdict.OK and seen["SND-3207-4-02"] is Verdict.OK
    # docs/peers.md: swaks's --timeout does not cover the handshake, so a stalled one outlives the wait (ERROR,
    # never judged), and swaks takes the reply injected behind the 220 for its EHLO reply inside TLS (FAILED):
    # the receiver reads EHLO, MAIL, RCPT, DATA inside TLS and never a body.
    stalled = next(run for run in result.runs if run.case == "SND-3207-4-07")
    assert stalled.verdict is Verdict.ERROR and "submit command" in stalled.reason
    injected = next(run for run in result.runs if run.case == "SND-3207-4.2-01")
    assert injected.verdict is Verdict.FAILED
    assert any(e.text.endswith("TLS: DATA") for e in injected.transcript)


@pytest.mark.parametrize("path", sorted(SENDER_PROFILES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sender_profiles_load(path: Path) -> None:
    profile = load_sender_profile(path)
    assert profile.name == path.stem or path.stem.startswith("example-")


def test_index_json_round_trips_the_sender_policies(tmp_path: Path) -> None:
    result = run_senders("lab:preferred-verify", ["SND-DC"], report_dir=None, timestamps=False)
    data = json.loads(json.dumps(result.to_dict()))
    again = RunResult.from_dict(data)
    assert {str(r.policy) for r in again.runs} == {"preferred-verify"}
    assert sys.version_info >= (3, 11)


def test_a_bad_receiver_case_names_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = (ROOT_CASES / "starttls-454.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(source.replace("when: {delivered_plaintext: true}", "when: {delivered_in_clear: true}", 1))
    assert main(["run", "--sender", "lab", str(bad), "--report-dir", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "delivered_in_clear" in err and "Traceback" not in err
    assert main(["run", "--sender", "lab:sometimes", "--report-dir", str(tmp_path / "r")]) == 3
    assert "--sender" in capsys.readouterr().err


def test_a_schema_version_3_record_is_still_read() -> None:
    """Version 4 only added the sender runs' policies and observations: a version 3 record reads unchanged."""
    listener_run = run_senders("lab:required", ["SND-DC-05"], report_dir=None, timestamps=False).to_dict()
    listener_run["schema_version"] = 3
    for run in listener_run["runs"]:
        for key in ("starttls_sent", "plaintext_after_220", "outcome"):
            run["observed"].pop(key, None)
    assert RunResult.from_dict(listener_run).schema_version == 4
