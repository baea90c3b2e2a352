"""The netns carrier (docs/netns.md): the catalogue over real network namespaces gives memory's verdicts, the
wire as tcpdump sees it is the lab's own capture, the firewall really rewrites, and nothing is left behind, not
even by a run killed with ``kill -9``; a real Postfix inside the appliance's namespace (the kept set) gives the
verdicts it gives on loopback.

Runs over netns go in subprocesses (the CLI, or a short script): they drive their own reactor and own their
namespaces. Without root these tests skip, except under CI=true, where they run and fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from lab.cli import main
from lab.errors import EXIT_HARNESS
from lab.net import netns
from lab.net.carrier import LAB_CARRIERS, ICarrier, open_carrier
from lab.net.topology import default_topology
from lab.scenario.loader import load_cases
from lab.scenario.model import POLICIES
from lab.scenario.runner import RunOptions, run_cases

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT and os.environ.get("CI") != "true", reason="the netns carrier needs root (CI=true runs it regardless)"
)
REPO = Path(__file__).resolve().parent.parent


def _env(state: Path) -> dict[str, str]:
    return {**os.environ, "SMTPLAB_STATE": str(state), "PYTHONPATH": str(REPO)}


def _leftovers() -> dict[str, int]:
    """The lab's namespaces whose process is gone, or that are this test process's own."""
    return {n: p for n, p in netns.owned_namespaces().items() if p == os.getpid() or not netns.alive(p)}


def _root_veths() -> list[str]:
    """Interfaces of the root namespace with the lab's veth prefix: there must never be any."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if ": sl" in line]


def verdicts(index: Any) -> dict[tuple[str, str], str]:
    return {(run["case"], run["policy"]): run["verdict"] for run in index["runs"]}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@needs_root
def test_the_catalogue_over_netns_gives_memorys_verdicts_and_leaves_nothing(state: Path, tmp_path: Path) -> None:
    report = tmp_path / "netns"
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run", "--carrier", "netns", "--no-timestamps", "--report-dir", str(report)],
        cwd=tmp_path,
        env=_env(state),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "carrier netns" in done.stdout
    over_netns = json.loads((report / "index.json").read_text())
    assert over_netns["carrier"] == "netns" and {run["carrier"] for run in over_netns["runs"]} == {"netns"}
    memory = run_cases(load_cases(None), POLICIES, RunOptions(state_dir=state, timestamps=False))
    assert verdicts(over_netns) == {(run.case, str(run.policy)): run.verdict.value for run in memory.runs}
    assert _leftovers() == {} and _root_veths() == []


SCRIPT = """
import os, subprocess, sys, time
from pathlib import Path
from lab.net import netns
from lab.net.carrier import LAB_CARRIERS, ICarrier, open_carrier
from lab.net.topology import default_topology
from lab.scenario.loader import load_cases
from lab.scenario.model import POLICIES
from lab.scenario.runner import RunOptions, run_cases

TCPDUMP = ["-Z", "root", "--immediate-mode", "-U"]  # write each packet as it comes: the run ends right after
out, case, policy, client = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
topology = default_topology()
made = netns.namespaces_for(topology)
dumps = []
for host in (client, "esa"):
    dev = next(port.dev for (name, _), port in made.ports.items() if name == host and port.peer in ("firewall", "esa"))
    pcap = str(out / f"{host}.pcap")
    dump = subprocess.Popen(
        ["ip", "netns", "exec", made.namespaces[host], "tcpdump", *TCPDUMP, "-i", dev, "-w", pcap, "tcp"],
        stderr=subprocess.PIPE,
        text=True,
    )
    while "listening on" not in dump.stderr.readline():  # tcpdump says so once it captures
        pass
    dumps.append(dump)
result = run_cases(load_cases([case]), [policy], RunOptions(carrier="netns", topology=topology, report_dir=out))
for dump in dumps:
    dump.terminate()
    dump.wait(10)
print(result.runs[0].verdict.value, result.runs[0].capture)
"""


def _streams(pcap: Path) -> dict[str, bytes]:
    """The TCP payload of ``pcap`` in each direction (by source address), as tshark reads it."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "tcp.len > 0", "-T", "fields", "-e", "ip.src", "-e", "tcp.payload"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    streams: dict[str, bytes] = {}
    for line in out.splitlines():
        src, payload = line.split("\t")
        streams[src] = streams.get(src, b"") + bytes.fromhex(payload.replace(":", ""))
    return streams


def _tls_records(stream: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record after the plaintext part (which ends with the 220 to STARTTLS
    or the STARTTLS line)."""
    start = next((i for i in range(len(stream)) if stream[i] in (0x14, 0x15, 0x16, 0x17) and stream[i + 1] == 3), None)
    records, i = [], start if start is not None else len(stream)
    while i + 5 <= len(stream):
        length = int.from_bytes(stream[i + 3 : i + 5], "big")
        records.append((stream[i], length))
        i += 5 + length
    return records


def _run_with_tcpdump(tmp: Path, state: Path, case: str, policy: str, client: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp), case, policy, client],
        cwd=tmp,
        env=_env(state),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_root
def test_tcpdump_inside_the_client_namespace_agrees_with_the_labs_own_capture(state: Path, tmp_path: Path) -> None:
    verdict, capture = _run_with_tcpdump(tmp_path, state, "3207-4-08", "preferred", "mta-prefer").split()
    assert verdict == "OK"
    wire, lab = _streams(tmp_path / "mta-prefer.pcap"), _streams(tmp_path / capture)
    assert set(wire) == set(lab) == {"198.51.100.10", "192.168.2.1"}
    for src in wire:
        assert wire[src] == lab[src]  # byte for byte: the same SMTP lines and the same TLS records
    client = wire["198.51.100.10"]
    assert client.startswith(b"EHLO ") and b"STARTTLS\r\n" in client
    records = _tls_records(wire["192.168.2.1"])
    assert records and records == _tls_records(lab["192.168.2.1"]) and records[0][0] == 0x16
    assert _leftovers() == {}


@needs_root
def test_the_firewall_namespace_strips_starttls_on_the_wire(state: Path, tmp_path: Path) -> None:
    """The client's wire shows the rewritten capability, the appliance's wire the original: the rewrite happens
    in between, in the firewall's namespace."""
    verdict, capture = _run_with_tcpdump(tmp_path, state, "ATK-STRIP-01", "preferred", "mta-prefer").split()
    client_side, server_side = _streams(tmp_path / "mta-prefer.pcap"), _streams(tmp_path / "esa.pcap")
    assert b"250-XXXXXXXA" in client_side["192.168.2.1"] and b"STARTTLS" not in client_side["192.168.2.1"]
    assert b"250-STARTTLS" in server_side["192.168.2.1"]
    assert server_side["198.51.100.10"] == client_side["198.51.100.10"]  # the appliance sees the client itself
    assert _streams(tmp_path / capture) == client_side
    memory = run_cases(load_cases(["ATK-STRIP-01"]), ["preferred"], RunOptions(state_dir=state, timestamps=False))
    assert verdict == memory.runs[0].verdict.value and _leftovers() == {}


#: A process that makes the default topology's namespaces and then waits to be killed.
HOLDER = """
import time
from lab.net import netns
from lab.net.carrier import LAB_CARRIERS, ICarrier, open_carrier
from lab.net.topology import default_topology
netns.namespaces_for(default_topology())
print("ready", flush=True)
time.sleep(120)
"""


@needs_root
def test_a_run_killed_with_kill_9_is_cleaned_up_by_the_next(state: Path, tmp_path: Path) -> None:
    victim = subprocess.Popen([sys.executable, "-c", HOLDER], env=_env(state), stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        left = [name for name, pid in netns.owned_namespaces().items() if pid == victim.pid]
        assert len(left) == len(default_topology().hosts)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    assert all((netns.NETNS_DIR / name).exists() for name in left)  # kill -9: no chance to clean up
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run", "--carrier", "netns", "-j", "1", "3207-4-08", "--policy", "no"],
        cwd=tmp_path,
        env=_env(state),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any((netns.NETNS_DIR / name).exists() for name in left)
    assert _leftovers() == {} and _root_veths() == []


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_namespaces(state: Path, signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=_env(state), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    assert any(pid == proc.pid for pid in netns.owned_namespaces().values())
    proc.send_signal(signum)
    proc.wait(30)
    assert not any(pid == proc.pid for pid in netns.owned_namespaces().values())


@needs_root
def test_ctrl_c_during_a_run_leaves_nothing(state: Path, tmp_path: Path) -> None:
    """SIGINT to the run's process group, as a terminal sends it, once the run has made its namespaces."""
    run = subprocess.Popen(
        [sys.executable, "-m", "lab", "run", "--carrier", "netns", "-j", "2", "ATK-SMUGGLE", "--report-dir", "r"],
        cwd=tmp_path,
        env=_env(state),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60  # an upper bound only: the namespaces appear well before
        while len(netns.owned_namespaces()) < 2 * len(default_topology().hosts) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    assert _leftovers() == {} and _root_veths() == []


def test_without_root_nor_user_namespaces_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "_user_namespace_of_our_own", lambda: False)
    monkeypatch.setattr(netns, "enter_user_namespace", lambda: "unshare(CLONE_NEWUSER): Operation not permitted")
    assert main(["run", "--carrier", "netns", "3207-4-08", "--report-dir", "/nonexistent/never-written"]) == (
        EXIT_HARNESS
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smtplab: ")
    assert "the netns carrier needs root or unprivileged user namespaces (unshare(CLONE_NEWUSER)" in err[0]


@needs_root
def test_an_unprivileged_user_namespace_gives_the_same_verdicts_and_keeps_its_namespaces_private(
    state: Path, tmp_path: Path
) -> None:
    """SMTPLAB_NETNS_USERNS=1 takes the non-root way as root: the run enters a user namespace of its own, where
    its namespaces live under a private /run/netns; the host's list never shows them."""
    before = netns.owned_namespaces()
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run", "--carrier", "netns", "ATK-STRIP", "3207-4-08", "--no-timestamps"],
        cwd=tmp_path,
        env={**_env(state), netns.USERNS_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    index = json.loads((tmp_path / "smtplab-report" / "index.json").read_text())
    memory = run_cases(load_cases(["ATK-STRIP", "3207-4-08"]), POLICIES, RunOptions(state_dir=state, timestamps=False))
    assert verdicts(index) == {(run.case, str(run.policy)): run.verdict.value for run in memory.runs}
    assert netns.owned_namespaces() == before


@needs_root
def test_the_netns_carrier_provides_the_interface() -> None:
    carrier = open_carrier("netns", topology=default_topology(), reactor=MemoryReactorClock())
    try:
        assert verifyObject(ICarrier, carrier) and carrier.name == "netns" and carrier.name in LAB_CARRIERS
    finally:
        netns.release()
    assert _leftovers() == {}


#: A three-host topology (client - firewall - server) with IPv4 and IPv6, the carrier used directly.
CARRIER_SCRIPT = """
import socket
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from lab.net import netns
from lab.net.middlebox import StartTLSStripper
from lab.net.netns_carrier import NetnsNetwork
from lab.net.topology import topology_from_dict

DOC = {
    "networks": [
        {"name": "outside", "subnet": "198.51.100.0/24"},
        {"name": "outside6", "subnet": "2001:db8:1::/64"},
        {"name": "inside", "subnet": "192.168.2.0/24"},
        {"name": "inside6", "subnet": "2001:db8:2::/64"},
    ],
    "hosts": [
        {"name": "client", "role": "mta", "addresses": ["198.51.100.10", "2001:db8:1::10"]},
        {
            "name": "fw",
            "role": "firewall",
            "addresses": ["198.51.100.1", "2001:db8:1::1", "192.168.2.254", "2001:db8:2::254"],
        },
        {"name": "server", "role": "internal", "addresses": ["192.168.2.1", "2001:db8:2::1"]},
    ],
    "links": [{"between": ["client", "fw"]}, {"between": ["fw", "server"]}],
}


class Greeter(Protocol):
    def connectionMade(self):
        peer = self.transport.getPeer()
        self.transport.write(f"220 hello {peer.host}\\r\\n250-STARTTLS\\r\\n".encode())
        self.transport.loseConnection()


class Reader(Protocol):
    def connectionMade(self):
        self.data = b""
        self.factory.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.factory.done.callback(self.data)


def main():
    topology = topology_from_dict(DOC, "small.yaml")
    net = NetnsNetwork(topology, reactor=reactor)
    out = []
    try:
        net.listen("192.168.2.1", 25, Factory.forProtocol(Greeter))
        for boxes in ([], [StartTLSStripper()]):
            factory = ClientFactory.forProtocol(Reader)
            net.run_until(net.connect("198.51.100.10", "192.168.2.1", 25, factory, middleboxes=boxes), 10)
            out.append(net.run_until(factory.done, 10).decode().replace("\\r\\n", "|"))
        # IPv6: configured and routed through the forwarding firewall too (plain sockets made inside the hosts)
        with netns.inside(net.namespaces.namespaces["server"]):
            listening = socket.create_server(("2001:db8:2::1", 2525), family=socket.AF_INET6)
        with netns.inside(net.namespaces.namespaces["client"]):
            client = socket.socket(socket.AF_INET6)
        client.settimeout(10)
        client.connect(("2001:db8:2::1", 2525))
        accepted, peer = listening.accept()
        out.append(f"ipv6 {peer[0]} -> {accepted.getsockname()[0]}")
        for sock in (client, accepted, listening):
            sock.close()
    finally:
        net.run_until(net.close(), 10)
    print("\\n".join(out))


main()
"""


@needs_root
def test_a_small_topology_forwards_strips_and_routes_ipv6(state: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CARRIER_SCRIPT], env=_env(state), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "220 hello 198.51.100.10|250-STARTTLS|",  # forwarded: the server saw the client's own address
        "220 hello 198.51.100.10|250-XXXXXXXA|",  # through the relay in the firewall's namespace, still the client's
        "ipv6 2001:db8:1::10 -> 2001:db8:2::1",
    ]
    assert _leftovers() == {}


def test_namespace_and_interface_names_fit() -> None:
    assert netns.namespace_name(4194304, "mta prefer/x") == "smtplab-4194304-mta_prefer_x"
    assert len(netns.veth_name(4194304, 99, "a")) <= 15


@needs_root
def test_netns_cleanup_removes_what_a_killed_process_left(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=_env(state), stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert main(["netns", "list"]) == 0
    assert f"pid {holder.pid} gone" in capsys.readouterr().out
    assert main(["netns", "cleanup"]) == 0
    assert f"smtplab-{holder.pid}-esa" in capsys.readouterr().out
    assert not any(pid == holder.pid for pid in netns.owned_namespaces().values())


# -- a real Postfix inside the appliance's namespace (the kept set) ----------------------------------------------

ESA = "192.168.2.1"
ATTACKER = "203.0.113.66"  # the client Postfix refuses in a namespace (the profile's 127.0.66.1 on loopback)


def _postfix_may(root: Path, address: str, netns_name: str | None = None) -> Any:
    """Postfix ``may`` as tests/test_interop.py starts it for the postfix-may profile (its facts and all)."""
    from peers.postfix import PostfixPeer
    from test_interop import BLOCKED_CLIENT, PEERS, TLS_MANDATORY_SENDER

    from lab.tls.certs import LabCA

    ca = LabCA(root / "state")
    cert = ca.issue("postfix-may", [PEERS["postfix-may"].hostname, address])
    return PostfixPeer(
        root / "postfix", address, None, "may", cert.cert_pem, cert.key_pem, verify_client=True,
        client_ca_pem=ca.ca_pem, tls_mandatory_senders=[TLS_MANDATORY_SENDER],
        blocked_clients=[ATTACKER if netns_name else BLOCKED_CLIENT],
        netns=netns_name,
    )  # fmt: skip


def _smtplab_run(root: Path, args: list[str]) -> dict[str, Any]:
    """``smtplab run ARGS`` (the whole catalogue) against the postfix-may profile (tests/test_interop.py's, with
    its CA and log): the runs by case."""
    report = root / "report"
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run", *args, "--no-timestamps", "--report-dir", str(report)],
        cwd=root, env={**_env(root / "lab-state"), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]
    return {run["case"]: run for run in json.loads((report / "index.json").read_text())["runs"]}


@needs_root
def test_a_real_postfix_inside_the_appliance_namespace_gives_its_loopback_verdicts() -> None:
    """``smtplab netns up``, Postfix ``may`` started in smtplab-kept-esa on 192.168.2.1:25, the whole catalogue
    run from the cases' client namespaces through the firewall (stripping there): the verdicts of the same
    profile against the same Postfix on loopback over TCP; afterwards no kept namespace and no Postfix process."""
    from peers import make_peer_workdir, next_address, pid_running
    from peers.postfix import unavailable_reason
    from test_interop import _profile

    from lab.tls.certs import LabCA

    if unavailable_reason():
        pytest.skip(f"no Postfix peer here: {unavailable_reason()}")
    if netns.kept_namespaces():
        pytest.skip("a kept namespace set is up already (not this test's to use or remove)")
    roots = {name: make_peer_workdir(prefix=f"smtplab-netns-{name}-") for name in ("loopback", "netns")}
    peers = {"loopback": _postfix_may(roots["loopback"], next_address())}
    assert main(["netns", "up"]) == 0
    pids: list[int] = []
    runs: dict[str, dict[str, Any]] = {}
    try:
        peers["netns"] = _postfix_may(roots["netns"], ESA, f"{netns.PREFIX}{netns.KEPT}-esa")
        for peer in peers.values():
            peer.start()
            pids += peer.pids()
        inside = peers["netns"]
        assert int(inside.master_pid_file.read_text()) == inside.pid  # `ip netns exec` became the master
        assert inside.pid in netns.processes_in("smtplab-kept-esa")
        args = {}
        for name, peer in peers.items():
            profile = _profile("postfix-may", LabCA(roots[name] / "state"), roots[name], peer)
            carrier = ["--carrier", "netns", "--blocked-client", ATTACKER] if name == "netns" else []
            args[name] = ["--profile", str(profile), "--target", f"{peer.address}:{peer.port}", *carrier]
        with ThreadPoolExecutor(max_workers=2) as pool:  # the two runs at once: two Postfix instances
            runs = dict(zip(args, pool.map(_smtplab_run, [roots[n] for n in args], args.values()), strict=True))
        log = inside.maillog()
    finally:
        for peer in peers.values():
            peer.stop()
        down = main(["netns", "down"])
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    verdicts = {name: {case: run["verdict"] for case, run in found.items()} for name, found in runs.items()}
    assert verdicts["netns"] == verdicts["loopback"] and len(verdicts["netns"]) == len(load_cases(None))
    assert {run["carrier"] for run in runs["netns"].values()} == {"netns"}
    assert (
        verdicts["netns"]["POL-LOG-01"] == verdicts["netns"]["POL-HAT-01"] == "OK"
        and verdicts["netns"]["ATK-SMUGGLE-02"] == "XFAIL"
    )
    stripped = runs["netns"]["ATK-STRIP-01"]
    texts = [entry["text"] for entry in stripped["transcript"]]  # stripped in the firewall's namespace
    assert "250-XXXXXXXA" in texts and any(text.startswith("middlebox: ") for text in texts), texts
    # Postfix saw the client hosts' own addresses, routed through the firewall's namespace.
    clients = set(re.findall(r"connect from unknown\[([0-9.]+)\]", log))
    hosts = {address for host in default_topology().hosts for address in host.addresses}
    assert "198.51.100.10" in clients and ATTACKER in clients and clients <= hosts, clients
    assert down == 0 and netns.kept_namespaces() == []
    assert not [pid for pid in pids if pid_running(pid)] and _root_veths() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--carrier", "netns", "--target", "127.0.0.1:25"],
            "--target: 127.0.0.1 is no host's address in the topology",
        ),
        (["--carrier", "netns", "--target", f"{ESA}:25", "--blocked-client", "127.0.66.1"], "--blocked-client: "),
        (["--carrier", "loopback", "--target", "127.0.0.1:25"], "--carrier: an external target is reached over TCP"),
        (["--target", f"{ESA}:25"], f"{ESA} is not a loopback address"),  # over TCP: loopback only, as before
    ],
)
def test_an_external_target_over_netns_is_a_topology_host(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *args, "--policy", "may", "--report-dir", str(tmp_path)]) == 3
    assert message in capsys.readouterr().err


@needs_root
def test_the_kept_set_outlives_runs_and_goes_down_only_when_empty(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a kept set a run against a target in a namespace stops at once (exit 2, one line); once up, a
    sweep leaves it alone; ``down`` refuses (exit 2, nothing removed) while a process runs inside, then removes it."""
    if netns.kept_namespaces():
        pytest.skip("a kept namespace set is up already (not this test's to use or remove)")
    run = ["run", "--carrier", "netns", "--target", f"{ESA}:25", "--policy", "may", "--report-dir", str(tmp_path)]
    assert main([*run, "3207-4-01"]) == EXIT_HARNESS
    assert "no kept namespace smtplab-kept-esa: start one with smtplab netns up" in capsys.readouterr().err
    assert main(["netns", "up"]) == 0
    inside = None
    try:
        assert len(netns.kept_namespaces()) == len(default_topology().hosts) and netns.sweep() == []
        inside = subprocess.Popen(["ip", "netns", "exec", "smtplab-kept-esa", "sleep", "30"])
        deadline = time.monotonic() + 10
        while inside.pid not in netns.processes_in("smtplab-kept-esa") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert main(["netns", "down"]) == EXIT_HARNESS
        assert f"smtplab-kept-esa still holds process(es) {inside.pid}" in capsys.readouterr().err
        assert len(netns.kept_namespaces()) == len(default_topology().hosts)
    finally:
        if inside is not None:
            inside.kill()  # by its PID: the process this test started
            inside.wait(timeout=10)
        assert main(["netns", "down"]) == 0
    assert netns.kept_namespaces() == [] and _root_veths() == []
