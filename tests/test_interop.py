"""Interop (issue 4 item 6): the catalogue and ``smtplab probe`` against real Postfix and aiosmtpd.

Six peers start once per module, at the same time, each on its own 127.25.x.y address and a free high port:
Postfix with smtpd_tls_security_level none, may, encrypt, and aiosmtpd without TLS, with a TLS context, and with
``require_starttls=True``. Every check goes through the command line, in a child process, as a user would:

- ``smtplab probe HOST:PORT --json`` must name each peer's policy;
- ``smtplab run --profile conformance/targets/NAME.yaml --target HOST:PORT`` (the declared policy and the
  declared deviations; the CA and server name of this module's peers added) must give no FAILED, NON-STRICT,
  XPASS or ERROR verdict;
- ``smtplab run --target ... --policy required --ca ...`` against Postfix ``may`` must exit 1 and fail the cases
  where plaintext mail was accepted.

The findings behind the declared deviations are in docs/peers.md, "Findings".
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import (
    Peer,
    next_address,
    pid_running,
    require_kind,
    start_all,
    stop_all,
    unavailable_reason,
)
from peers.aiosmtpd_peer import AiosmtpdPeer
from peers.postfix import PostfixPeer

from lab.conformance.profile import load_profile
from lab.scenario.result import CaseRun, RunResult, load_index
from lab.scenario.verdict import Verdict
from lab.tls.certs import LabCA

pytestmark = pytest.mark.peer

REPO = Path(__file__).resolve().parents[1]
TARGETS = REPO / "conformance" / "targets"
RUN_TIMEOUT = 120.0  # wall seconds one ``smtplab run`` may take before the test gives up on it
RUN_BUDGET = 60.0  # what one run must stay under: the whole catalogue against one peer takes seconds
PROBE_TIMEOUT = 60.0
WORKERS = 4  # child processes at a time; the runs are CPU-bound (TLS, and scapy building the pcaps)
RECIPIENT = "postmaster@example.com"  # the peers accept mail for example.com only (peers accept_domain)
NOT_CLEAN = {Verdict.FAILED, Verdict.NON_STRICT, Verdict.XPASS, Verdict.ERROR}


@dataclass(frozen=True)
class Spec:
    """A peer: how it is started, the policy it implements, and its reply to STARTTLS where TLS is off."""

    kind: str  # postfix | aiosmtpd
    setting: str  # Postfix: none | may | encrypt; aiosmtpd: plain | tls | require
    policy: str  # what `smtplab probe` must say, and what its profile declares
    starttls_refusal: int | None = None

    @property
    def hostname(self) -> str:
        return f"{self.kind}.peer.test"


PEERS = {
    "postfix-none": Spec("postfix", "none", "no", 502),
    "postfix-may": Spec("postfix", "may", "preferred"),
    "postfix-encrypt": Spec("postfix", "encrypt", "required"),
    "aiosmtpd-plain": Spec("aiosmtpd", "plain", "no", 454),
    "aiosmtpd-tls": Spec("aiosmtpd", "tls", "preferred"),
    "aiosmtpd-require": Spec("aiosmtpd", "require", "required"),
}


# -- the peers


#: What the Postfix peers are configured with beyond their TLS level, as their profiles declare it (facts).
TLS_MANDATORY_SENDER = "tls-only@example.net"
BLOCKED_CLIENT = "127.0.66.1"


def _build(name: str, spec: Spec, root: Path, ca: LabCA) -> Peer:
    address = next_address()
    cert = ca.issue(name, [spec.hostname, address])
    if spec.kind == "aiosmtpd":
        return AiosmtpdPeer(root / name, address, None, spec.setting, cert.cert_pem, cert.key_pem)  # type: ignore[arg-type]
    return PostfixPeer(
        root / name, address, None, spec.setting, cert.cert_pem, cert.key_pem,  # type: ignore[arg-type]
        verify_client=name == "postfix-may", client_ca_pem=ca.ca_pem if name == "postfix-may" else None,
        tls_mandatory_senders=[TLS_MANDATORY_SENDER] if spec.setting != "none" else [],  # only with TLS to offer
        blocked_clients=[BLOCKED_CLIENT],
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(peer_root: Path, lab_ca: LabCA) -> Iterator[dict[str, Peer]]:
    """Every available peer, started together; stopped together (by PID) at the end of the module."""
    peers = {
        name: _build(name, spec, peer_root, lab_ca)
        for name, spec in PEERS.items()
        if unavailable_reason(spec.kind) is None
    }
    if "postfix-may" in peers:  # the same Postfix `may`, relaying for a loopback mynetworks as Debian's does
        address, cert = next_address(), lab_ca.issue(RELAY_PEER, [PEERS["postfix-may"].hostname])
        peers[RELAY_PEER] = PostfixPeer(
            peer_root / RELAY_PEER, address, None, "may", cert.cert_pem, cert.key_pem, relay_for_mynetworks=True
        )
    start_all(list(peers.values()))
    yield peers
    stop_all(list(peers.values()))


def _running(fleet: dict[str, Peer], name: str) -> Peer:
    require_kind(PEERS[name].kind)
    peer = fleet[name]
    peer.start()  # a no-op while it runs; restarts it if an earlier test stopped it
    return peer


# -- the command line, in child processes


@dataclass(frozen=True)
class Outcome:
    """One ``smtplab`` invocation: exit code, output, wall time, and the report it wrote (if any)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    result: RunResult | None = None

    def runs(self) -> dict[str, CaseRun]:
        assert self.result is not None, f"no index.json; stderr:\n{self.stderr[-2000:]}"
        return {run.case: run for run in self.result.runs}


def _env(root: Path) -> dict[str, str]:
    """The lab's state (its CA for client certificates) under the module's directory, never in the checkout."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "SMTPLAB_STATE": str(root / "lab-state"), "PYTHONPATH": path}


def _smtplab(args: list[str], root: Path, timeout: float, report_dir: Path | None = None) -> Outcome:
    """Run ``smtplab ARGS`` in a child process we start and, on timeout, kill by its PID."""
    argv = [sys.executable, "-m", "lab", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"smtplab {' '.join(args)} took longer than {timeout:g}s:\n{err[-2000:]}")
    seconds = time.monotonic() - started
    index = report_dir / "index.json" if report_dir else None
    result = load_index(index) if index is not None and index.exists() else None
    return Outcome(tuple(argv), proc.returncode, out, err, seconds, result)


def _profile(name: str, ca: LabCA, root: Path, peer: Peer) -> Path:
    """The checked-in profile (facts, deviations and all), plus this module's trust anchor, the peer's name,
    a client certificate from the lab CA, and the peer's own mail log in place of the placeholder.

    ``--target`` moves it to the peer's address; the CA, the files and the server name only exist once the
    peers do.
    """
    text = (TARGETS / f"{name}.yaml").read_text(encoding="utf-8")
    assert "\nca_file:" not in text and "\nserver_name:" not in text, f"{name}.yaml sets them itself now"
    path = root / "profiles" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    extra = f"\nca_file: {ca.ca_path}\nserver_name: {PEERS[name].hostname}\n"
    if isinstance(peer, PostfixPeer):
        text, found = re.subn(r"(?m)^  file: /var/log/mail\.log\b", f"  file: {peer.maillog_path}", text)
        assert found == 1, f"{name}.yaml: the maillog placeholder moved"
        cert = ca.issue("client.smtplab.test", ["client.smtplab.test"], client=True)
        (root / "profiles" / "client.pem").write_bytes(cert.cert_pem)
        (root / "profiles" / "client.key").write_bytes(cert.key_pem)
        extra += "client_cert: {cert_file: client.pem, key_file: client.key}\n"
    path.write_text(text.rstrip("\n") + "\n" + extra, encoding="utf-8")
    return path


def _address(peer: Peer) -> str:
    return f"{peer.address}:{peer.port}"


MAY_AS_REQUIRED = "postfix-may-declared-required"

#: The peers run bare (``--target --policy``, no profile, no CA), each under the policy word its configuration
#: uses, plus Postfix ``may`` with Debian's relay rule for its mynetworks (loopback clients may relay).
BARE = {
    "postfix-none": "none",
    "postfix-may": "may",
    "postfix-encrypt": "encrypt",
    "postfix-may-relay": "may",
    "aiosmtpd-plain": "no",
    "aiosmtpd-tls": "preferred",
    "aiosmtpd-require": "required",
}
RELAY_PEER = "postfix-may-relay"

_OLD_TLS = "RFC 8996 5: Postfix's default smtpd_tls_protocols (>=TLSv1) negotiates TLS 1.0/1.1 (docs/peers.md)"
#: The only FAILED verdicts a bare run may give: real MUST violations, each shown in docs/peers.md with its
#: transcript. Anything else FAILED is a false verdict and fails the build.
_SMUGGLED = (
    "RFC 5321 4.1.1.4: Postfix 3.7 with smtpd_forbid_bare_newline = no (its default) takes a false end of data"
    " and executes the commands behind it (docs/peers.md)"
)
#: The smuggling variants Postfix's defaults fall for (the other seven are kept as one message).
_POSTFIX_SMUGGLING = {case: _SMUGGLED for case in ("ATK-SMUGGLE-01", "ATK-SMUGGLE-02", "ATK-SMUGGLE-03",
                                                   "ATK-SMUGGLE-11", "ATK-SMUGGLE-12")}  # fmt: skip
TRUE_MUST_VIOLATIONS: dict[str, dict[str, str]] = {
    "postfix-none": {**_POSTFIX_SMUGGLING},
    "postfix-may": {"8996-5-01": _OLD_TLS, **_POSTFIX_SMUGGLING},
    "postfix-encrypt": {"8996-5-01": _OLD_TLS, **_POSTFIX_SMUGGLING},
    "postfix-may-relay": {"8996-5-01": _OLD_TLS, **_POSTFIX_SMUGGLING},
    "aiosmtpd-plain": {},
    "aiosmtpd-tls": {},
    "aiosmtpd-require": {},
}


def _jobs(fleet: dict[str, Peer], ca: LabCA, root: Path) -> dict[str, list[str]]:
    """Every ``smtplab`` invocation of the module, by key: ``probe:NAME``, ``NAME`` (its catalogue run) and
    the catalogue against Postfix `may` declared Required."""
    jobs: dict[str, list[str]] = {}
    for name, peer in fleet.items():
        if name not in PEERS:
            continue
        jobs[f"probe:{name}"] = [
            "probe", _address(peer), "--json", "--ca", str(ca.ca_path), "--server-name", PEERS[name].hostname,
            "--to", RECIPIENT,  # the default, postmaster@ the server name's domain, is not accepted there
        ]  # fmt: skip
    for name, peer in fleet.items():
        if name in PEERS:
            jobs[name] = ["run", "--profile", str(_profile(name, ca, root, peer)), "--target", _address(peer)]
        jobs[f"bare:{name}"] = ["run", "--target", _address(peer), "--policy", BARE[name], "--name", f"bare-{name}"]
    if "postfix-may" in fleet:
        jobs[MAY_AS_REQUIRED] = [
            "run", "--target", _address(fleet["postfix-may"]), "--policy", "required", "--ca", str(ca.ca_path),
            "--name", MAY_AS_REQUIRED,
        ]  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def outcomes(fleet: dict[str, Peer], lab_ca: LabCA, peer_root: Path) -> dict[str, Outcome]:
    """All of them, a few at a time (each is one process whose cases run one after the other)."""
    for peer in fleet.values():
        peer.start()
    jobs = _jobs(fleet, lab_ca, peer_root)

    def one(key: str) -> Outcome:
        if key.startswith("probe:"):
            return _smtplab(jobs[key], peer_root, PROBE_TIMEOUT)
        report = peer_root / "reports" / key
        return _smtplab([*jobs[key], "--report-dir", str(report)], peer_root, RUN_TIMEOUT, report)

    # A run that reads a peer's mail log (the Postfix profiles declare it) must be the only client of that peer
    # while it runs, or other runs' lines land in its window: those go second, one per peer.
    reads_log = [key for key in jobs if key in PEERS and key.startswith("postfix")]
    first = [key for key in jobs if key not in reads_log]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        done = dict(zip(first, pool.map(one, first), strict=True))
        done.update(zip(reads_log, pool.map(one, reads_log), strict=True))
    return {key: done[key] for key in jobs}


@pytest.fixture(scope="module")
def catalogue(outcomes: dict[str, Outcome]) -> dict[str, Outcome]:
    """The catalogue runs: under each peer's profile, and Postfix `may` declared Required."""
    return {key: outcome for key, outcome in outcomes.items() if not key.startswith(("probe:", "bare:"))}


@pytest.fixture(scope="module")
def bare(outcomes: dict[str, Outcome]) -> dict[str, Outcome]:
    """The catalogue against each peer with no profile: only the policy, in the peer's own word."""
    return {key.removeprefix("bare:"): outcome for key, outcome in outcomes.items() if key.startswith("bare:")}


@pytest.fixture(scope="module")
def probes(outcomes: dict[str, Outcome]) -> dict[str, Outcome]:
    return {key.removeprefix("probe:"): outcome for key, outcome in outcomes.items() if key.startswith("probe:")}


def _show(run: CaseRun) -> str:
    return f"{run.case} {run.verdict}: {run.reason}\n    " + "\n    ".join(run.lines[-12:])


# -- the tests


def test_each_peer_has_its_own_loopback_address_and_a_high_port(fleet: dict[str, Peer]) -> None:
    for name in PEERS:
        _running(fleet, name)
    addresses = [peer.address for peer in fleet.values()]
    assert len(set(addresses)) == len(addresses)
    for peer in fleet.values():
        assert peer.address.startswith("127.") and peer.address != "127.0.0.1"
        assert 1024 <= peer.port <= 65535
        assert peer.banner.startswith("220 ")


@pytest.mark.parametrize("name", list(PEERS))
def test_probe_names_the_policy(name: str, fleet: dict[str, Peer], probes: dict[str, Outcome]) -> None:
    _running(fleet, name)
    spec, outcome = PEERS[name], probes[name]
    assert outcome.returncode in (0, 1), outcome.stderr  # 1: deviations found; 2 would be "unreachable"
    report = json.loads(outcome.stdout)
    assert report["target"] == _address(fleet[name])
    assert report["policy"] == spec.policy, report["basis"]
    assert report["conclusive"] is True
    if spec.policy == "no":
        assert report["starttls_advertised"] is False
        assert report["tls"] is None
    else:
        assert report["starttls_advertised"] is True
        assert report["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
        assert report["server_cert_verified"] is True  # against the lab CA and the peer's name


@pytest.mark.parametrize("name", list(PEERS))
def test_catalogue_under_the_declared_policy_is_clean(
    name: str, fleet: dict[str, Peer], catalogue: dict[str, Outcome]
) -> None:
    """No FAILED, NON-STRICT, XPASS or ERROR: the peer's real deviations are declared (XFAIL) in its profile."""
    _running(fleet, name)
    outcome = catalogue[name]
    runs = outcome.runs()
    assert outcome.result is not None and [t.name for t in outcome.result.targets] == [name]
    assert {str(run.policy) for run in runs.values()} == {PEERS[name].policy}
    unexplained = [_show(run) for run in runs.values() if run.verdict in NOT_CLEAN]
    assert not unexplained, "\n".join(unexplained)
    failing = any(run.verdict.is_failure for run in runs.values())
    assert outcome.returncode == (1 if failing else 0), outcome.stderr[-2000:]
    assert outcome.seconds < RUN_BUDGET
    lab_only = [run for run in runs.values() if run.verdict is Verdict.UNIMPLEMENTED]
    why = ("lab targets only", "needs a declared target fact", "mail log has no line for")
    assert lab_only and all(any(text in run.reason for text in why) for run in lab_only)


def _documented_unimplemented() -> set[str]:
    """The case ids of docs/conformance.md's table "What stays UNIMPLEMENTED against a complete Postfix profile"."""
    text = (REPO / "docs" / "conformance.md").read_text(encoding="utf-8")
    section = text.split("### What stays UNIMPLEMENTED against a complete Postfix profile", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("| case |"))
    ids = set()
    for row in table.splitlines()[2:]:
        ids |= {cell.strip(" `") for cell in row.split("|")[1].split(",")}
    return ids


#: Rewritten to be judged from replies alone (they need the lab's spool until then): counted as runnable.
SMUGGLING = "ATK-SMUGGLE"
MAX_UNIMPLEMENTED = 8


def test_complete_postfix_profile_leaves_only_the_documented_cases_unimplemented(
    fleet: dict[str, Peer], catalogue: dict[str, Outcome]
) -> None:
    """postfix-may declares every fact (mail log, client certificate, TLS-mandatory sender, refused client
    address, CA, domains, limits): at most 8 cases stay UNIMPLEMENTED, exactly those docs/conformance.md lists,
    each with its reason; the log cases really read the peer's log; nothing FAILED or ERROR but what is declared."""
    _running(fleet, "postfix-may")
    runs = catalogue["postfix-may"].runs()
    left = {case for case, run in runs.items() if run.verdict is Verdict.UNIMPLEMENTED and SMUGGLING not in case}
    assert len(left) <= MAX_UNIMPLEMENTED, sorted(left)
    assert left == _documented_unimplemented(), sorted(left)
    assert not [_show(run) for run in runs.values() if run.verdict in (Verdict.FAILED, Verdict.ERROR)]
    for case in ("3207-4.1-01", "POL-LOG-01"):  # judged from the peer's own log lines
        assert "log" in runs[case].observed and any(
            line.startswith("=== maillog: ") and "postfix/smtpd" in line for line in runs[case].lines
        ), _show(runs[case])
    assert runs["POL-LOG-01"].verdict is Verdict.OK and runs["POL-LOG-01"].observed["log"]["message_queued"] == 1
    assert runs["POL-HAT-01"].verdict is Verdict.OK and runs["POL-HAT-01"].observed["banner"] == 554
    assert runs["POL-PREF-01"].verdict is Verdict.OK and runs["POL-PREF-01"].observed["replies"]["MAIL"] >= 400
    for case in ("3207-4.1-04", "3207-4.1-05", "3207-4.1-07", "POL-PREF-02"):
        assert runs[case].verdict is Verdict.OK, _show(runs[case])
    assert runs["3207-4.1-06"].verdict is Verdict.XFAIL  # declared: Postfix only asks for the certificate
    assert "Postfix discards plaintext" in runs["ATK-INJECT-01"].reason


@pytest.mark.parametrize("name", list(PEERS))
def test_declared_deviations_are_seen_as_declared(
    name: str, fleet: dict[str, Peer], catalogue: dict[str, Outcome]
) -> None:
    """Every XFAIL carries its profile's reason; every declared deviation that can show here does (no stale one)."""
    _running(fleet, name)
    runs = catalogue[name].runs()
    xfails = {case: run for case, run in runs.items() if run.verdict is Verdict.XFAIL}
    for run in xfails.values():
        assert run.deviation, _show(run)
    declared = {deviation.case for deviation in load_profile(TARGETS / f"{name}.yaml").deviations}
    assert set(xfails) == declared


@pytest.mark.parametrize("name", [n for n, s in PEERS.items() if s.starttls_refusal is not None])
def test_starttls_under_no_is_judged_by_spec_level(
    name: str, fleet: dict[str, Peer], catalogue: dict[str, Outcome]
) -> None:
    """aiosmtpd refuses STARTTLS with 454, Postfix with 502 (the lab: 502); neither is a failure."""
    _running(fleet, name)
    runs = catalogue[name].runs()
    refusal = PEERS[name].starttls_refusal
    assert runs["POL-NO-01"].verdict is Verdict.OK, _show(runs["POL-NO-01"])
    assert runs["POL-NO-01"].observed["starttls_reply"] == refusal
    refused = [run for run in runs.values() if run.observed.get("starttls_reply") == refusal]
    assert len(refused) >= 5
    assert all(run.verdict not in (Verdict.FAILED, Verdict.NON_STRICT) for run in refused)


@pytest.mark.parametrize("name", list(BARE))
def test_clean_mta_fails_only_on_real_must_violations(
    name: str, fleet: dict[str, Peer], bare: dict[str, Outcome]
) -> None:
    """A stock MTA without a profile: FAILED only where a MUST really is broken (TRUE_MUST_VIOLATIONS), no ERROR,
    and what needs an undeclared fact or lab internals is UNIMPLEMENTED with the reason, never FAILED."""
    require_kind("postfix" if name.startswith("postfix") else "aiosmtpd")
    fleet[name].start()
    outcome = bare[name]
    runs = outcome.runs()
    failed = {case: run for case, run in runs.items() if run.verdict is Verdict.FAILED}
    unexplained = [_show(run) for case, run in failed.items() if case not in TRUE_MUST_VIOLATIONS[name]]
    assert not unexplained, "\n".join(unexplained)
    assert set(failed) == set(TRUE_MUST_VIOLATIONS[name]), sorted(failed)
    assert all(any(ref.level == "MUST" for ref in run.spec_refs) for run in failed.values())
    errors = [_show(run) for run in runs.values() if run.verdict is Verdict.ERROR]
    assert not errors, "\n".join(errors)
    assert outcome.returncode == (1 if failed else 0), outcome.stderr[-2000:]
    # A relaying Postfix takes the foreign recipient: that is its configuration, so without a declared
    # refused domain the RAT case does not run; the certificate case needs a declared CA.
    assert "refused_domain" in runs["POL-RAT-01"].reason and runs["POL-RAT-01"].verdict is Verdict.UNIMPLEMENTED
    if BARE[name] not in ("none", "no"):
        assert runs["7817-3-01"].verdict is Verdict.UNIMPLEMENTED and "--ca" in runs["7817-3-01"].reason


def test_may_declared_required_fails_on_plaintext_mail(fleet: dict[str, Peer], catalogue: dict[str, Outcome]) -> None:
    """A Postfix `may` run as if it were Required: exit 1, FAILED where plaintext mail was accepted."""
    _running(fleet, "postfix-may")
    outcome = catalogue[MAY_AS_REQUIRED]
    runs = outcome.runs()
    assert outcome.returncode == 1
    plaintext = {case: run for case, run in runs.items() if run.observed.get("delivered_plaintext")}
    assert "3207-4-01" in plaintext  # the legacy client that never says STARTTLS
    not_failed = sorted(case for case, run in plaintext.items() if run.verdict is not Verdict.FAILED)
    assert not not_failed, not_failed  # every plaintext delivery under a declared Required is FAILED
    for case in ("3207-4-01", "3207-4-05", "3207-4-06"):  # plaintext MAIL got 250 where Required wants 530
        assert runs[case].verdict is Verdict.FAILED, _show(runs[case])
    # The terminal names each failure and the plaintext delivery in its observations; so does index.json.
    for case, run in plaintext.items():
        block = outcome.stdout.split(f"FAILED {case}[required]", 1)[1].split("\nFAILED ", 1)[0]
        assert "delivered_plaintext=yes" in block
        assert "plaintext delivery accepted under Required" in run.reason
        assert any(line.startswith(" -> ") and "SMTPLAB-MARKER" in line for line in run.lines)


def test_no_case_waits_out_a_reply_timeout(fleet: dict[str, Peer], catalogue: dict[str, Outcome]) -> None:
    """A case that takes a whole reply timeout (15 s in the profiles) waited for something the peer never sends."""
    slow = [
        f"{name} {run.case}: {run.timings.wall_ms:.0f} ms"
        for name, outcome in catalogue.items()
        for run in outcome.runs().values()
        if run.timings.wall_ms is not None and run.timings.wall_ms > 10_000
    ]
    assert not slow


def test_peers_stop_by_pid(fleet: dict[str, Peer]) -> None:
    """Last: stopping ends every process we started and frees every port (the fixture's stop is then a no-op)."""
    pids = {name: peer.pids() for name, peer in fleet.items()}
    stop_all(list(fleet.values()))
    deadline = time.monotonic() + 10
    for name, peer in fleet.items():
        assert peer.pid is None and peer.last_pid is not None
        for pid in pids[name]:
            while pid_running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not pid_running(pid), f"{name}: PID {pid} still runs"
        with pytest.raises(OSError), socket.create_connection((peer.address, peer.port), timeout=2):
            pass
