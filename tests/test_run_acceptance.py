"""Issue 3 acceptance: ``smtplab run`` end to end, with real parts only.

The whole catalogue runs a handful of times per module, so the expensive runs are module-scoped fixtures: the
default ``python3 -m lab run`` and the ``--carrier loopback`` run are started as subprocesses at module set-up
and run in the background (the loopback run mostly waits on real sockets) while the in-process runs go on.

Exit code with a broken listener: ``lab.commands.run.run`` builds its ``RunOptions`` itself and has no seam
for the session class, so the broken-listener tests take the exit code from ``RunResult.exit_code()`` (the
value ``run`` returns when no ``--baseline``/``--strict`` applies). That the real command turns FAILED
verdicts into exit 1 is shown through the CLI with a scenario file the lab's correct listener cannot meet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from broken_sessions import (
    BARE_LF_END_OF_DATA,
    GATE_BYPASS,
    INJECTION_EXECUTING,
    STARTTLS_ADVERTISED_INSIDE_TLS,
    STATE_KEEPING,
)
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap
from serving import need_tool

from lab.report import write_reports
from lab.scenario.loader import load_cases
from lab.scenario.model import POLICIES
from lab.scenario.result import RunResult, load_index
from lab.scenario.runner import RunOptions, run_cases
from lab.scenario.verdict import Verdict
from lab.smtp.faults import FaultPolicy

REPO = Path(__file__).resolve().parents[1]
CLEAN = {Verdict.OK, Verdict.INFORMATIONAL}
SUMMARY = re.compile(r"^(\d+) passed, 0 failed, (\d+) informational$", re.MULTILINE)
BACKGROUND_TIMEOUT = 300.0  # wall seconds for one background CLI run of the whole catalogue

Key = tuple[str, str]  # (case id, policy)


# -- running smtplab ------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The checkout first on the path, so ``python3 -m lab`` works from any working directory."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def smtplab(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@dataclass
class CLIRun:
    """A ``python3 -m lab run ...`` started in its own working directory."""

    cwd: Path
    process: subprocess.Popen[bytes]
    report: Path

    def wait(self) -> CLIRun:
        try:
            self.process.wait(timeout=BACKGROUND_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            pytest.fail(f"smtplab run in {self.cwd} took over {BACKGROUND_TIMEOUT} s")
        return self

    @property
    def code(self) -> int | None:
        return self.process.returncode

    @property
    def stdout(self) -> str:
        return (self.cwd / "stdout.txt").read_text()

    @property
    def stderr(self) -> str:
        return (self.cwd / "stderr.txt").read_text()


def _start(cwd: Path, *args: str, report: str = "smtplab-report") -> CLIRun:
    cwd.mkdir(parents=True, exist_ok=True)
    with (cwd / "stdout.txt").open("wb") as out, (cwd / "stderr.txt").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "lab", "run", *args], cwd=cwd, env=_env(), stdout=out, stderr=err
        )
    return CLIRun(cwd, process, cwd / report)


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, CLIRun]]:
    """The default run and the loopback run, started together; each test waits for the one it reads."""
    base = tmp_path_factory.mktemp("cli")
    runs = {
        "default": _start(base / "default"),
        "loopback": _start(base / "loopback", "--carrier", "loopback", "--no-timestamps", "--report-dir", "lo"),
    }
    runs["loopback"].report = base / "loopback" / "lo"
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def _start_early(request: pytest.FixtureRequest) -> None:
    """Start the background runs with the module's first test, if any selected test reads them."""
    readers = {"default_cli", "loopback_cli"}
    if any(item.module is request.module and readers & set(item.fixturenames) for item in request.session.items):
        request.getfixturevalue("background")


@pytest.fixture(scope="module")
def default_cli(background: dict[str, CLIRun]) -> CLIRun:
    return background["default"].wait()


@pytest.fixture(scope="module")
def loopback_cli(background: dict[str, CLIRun]) -> CLIRun:
    return background["loopback"].wait()


# -- in-process runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lab CA for every in-process run, so both determinism runs present the same certificates."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def catalogue() -> list[Any]:
    return load_cases(None)


def _in_process(catalogue: list[Any], state_dir: Path, report: Path | None, **options: Any) -> RunResult:
    result = run_cases(
        catalogue,
        list(POLICIES),
        RunOptions(state_dir=state_dir, report_dir=report, timestamps=False, seed=0, **options),
    )
    if report is not None:
        write_reports(result, report)
    return result


@pytest.fixture(scope="module")
def memory_runs(catalogue: list[Any], state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two in-process runs of the whole catalogue with the same seed, each with its reports and captures."""
    reports = [tmp_path_factory.mktemp("memory-a"), tmp_path_factory.mktemp("memory-b")]
    for report in reports:
        _in_process(catalogue, state_dir, report)
    return reports


@pytest.fixture(scope="module")
def memory(memory_runs: list[Path]) -> RunResult:
    return load_index(memory_runs[0] / "index.json")


def verdicts(result: RunResult) -> dict[Key, Verdict]:
    return {(run.case, str(run.policy)): run.verdict for run in result.runs}


# -- the verdicts can fail ------------------------------------------------------------------------------


def _all(case: str, *policies: str) -> set[Key]:
    return {(case, p) for p in policies}


@dataclass(frozen=True)
class Breakage:
    faults: FaultPolicy
    failed: set[Key]  # exactly these runs must come out FAILED
    may_change: set[str]  # cases whose other runs may change verdict (to a clean one); the rest must not


BREAKAGES = {
    "injection": Breakage(
        INJECTION_EXECUTING,
        _all("3207-4.2-03", "preferred", "required")
        | _all("ATK-INJECT-01", "preferred", "required")
        | _all("2920-3.1-01", "preferred", "required"),
        set(),
    ),
    "required-gate": Breakage(
        GATE_BYPASS,
        {
            (case, "required")
            for case in (
                "3207-4-01",  # a legacy client's plaintext mail under Required
                "3207-4-02",  # the same on the private listener
                "3207-4-05",  # the gate, command by command
                "3207-4-06",  # MAIL before STARTTLS
                "POL-PREF-01",  # Required refuses plaintext whatever the sender list says
                "ATK-STRIP-01",  # stripping is harmless under Required only because of the gate
                "ATK-STRIP-03",
                "ATK-STRIP-05",
            )
        },
        set(),
    ),
    # The EHLO name (3207-4.2-06) and the envelope, seen by RCPT right after TLS with no EHLO (3207-4.2-07);
    # under Required the plaintext MAIL got 530, so there is no envelope to keep.
    "state-reset": Breakage(
        STATE_KEEPING,
        {("3207-4.2-06", "preferred"), ("3207-4.2-07", "preferred")},
        {"3207-4.2-04", "3207-4.2-06"},
    ),
    "starttls-inside-tls": Breakage(
        STARTTLS_ADVERTISED_INSIDE_TLS, _all("3207-4.2-02", "preferred", "required"), set()
    ),
    "smuggling": Breakage(BARE_LF_END_OF_DATA, _all("ATK-SMUGGLE-02", "no", "preferred", "required"), set()),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_a_broken_listener_fails_the_right_cases(
    name: str, catalogue: list[Any], state_dir: Path, memory: RunResult
) -> None:
    breakage = BREAKAGES[name]
    result = _in_process(catalogue, state_dir, None, faults=breakage.faults)
    broken, sound = verdicts(result), verdicts(memory)
    assert set(broken) == set(sound)
    assert {key for key, verdict in broken.items() if verdict is Verdict.FAILED} == breakage.failed
    changed = {key for key in broken if broken[key] is not sound[key] and key not in breakage.failed}
    assert {case for case, _ in changed} <= breakage.may_change, changed
    assert all(broken[key] in CLEAN for key in changed)
    assert all(broken[key] is Verdict.OK for key in (("3207-4-08", "preferred"), ("POL-LOG-01", "required")))
    assert result.exit_code() == 1  # what `smtplab run` returns for this record


FAILING_CASE = """\
id: POL-TEST-01
title: "a case the lab's own listener cannot meet"
refs:
  - ref: "AsyncOS mail flow policy: Use TLS"
    level: MUST
    text: Under No the listener never offers TLS, so a case that wants TLS under No must fail.
description: An opportunistic client under No.
expectation: This case wants TLS under No; the lab's listener correctly refuses it, so the verdict is FAILED.
client: {host: mta-prefer, behaviour: prefer}
policies: [no]
expect:
  no:
    - {verdict: OK, label: TLS under No, when: {tls: true}}
"""


def test_smtplab_run_exits_1_when_a_verdict_fails(tmp_path: Path) -> None:
    (tmp_path / "wants-tls.yaml").write_text(FAILING_CASE)
    done = smtplab("run", "wants-tls.yaml", "--no-timestamps", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "0 passed, 1 failed" in done.stdout
    index = load_index(tmp_path / "smtplab-report" / "index.json")
    assert [(run.case, run.verdict) for run in index.runs] == [("POL-TEST-01", Verdict.FAILED)]
    assert ET.parse(tmp_path / "smtplab-report" / "junit.xml").getroot().get("failures") == "1"


# -- determinism ----------------------------------------------------------------------------------------


def test_two_runs_with_the_same_seed_write_the_same_reports(memory_runs: list[Path]) -> None:
    """With --no-timestamps nothing in index.json is random: not even the spool names (virtual clock)."""
    first, second = memory_runs
    a, b = (json.loads((d / "index.json").read_text()) for d in memory_runs)
    assert a["started"] is None and all(run["timings"]["wall_ms"] is None for run in a["runs"])
    assert [(r["case"], r["policy"], r["verdict"]) for r in a["runs"]] == [
        (r["case"], r["policy"], r["verdict"]) for r in b["runs"]
    ]
    assert [r["transcript"] for r in a["runs"]] == [r["transcript"] for r in b["runs"]]
    assert [r["observed"] for r in a["runs"]] == [r["observed"] for r in b["runs"]]
    for name in ("index.json", "junit.xml", "index.html"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert sorted(p.name for p in (first / "captures").iterdir()) == sorted(
        p.name for p in (second / "captures").iterdir()
    )


def test_two_runs_with_the_same_seed_capture_the_same_plaintext(memory_runs: list[Path]) -> None:
    """Plaintext on the wire is compared byte for byte; TLS records only by count and content type.

    TLS bytes differ by nature (fresh randoms and key shares), and so do the lengths of a few encrypted
    handshake records: the server's ECDSA signature is DER-encoded, 70 to 72 bytes. Sequence numbers follow
    those lengths, so whole frames are not compared either.
    """
    first, second = memory_runs
    pcaps = sorted((first / "captures").glob("*.pcap"))
    assert pcaps
    tls_seen = 0
    for pcap in pcaps:
        a, b = _wire(pcap), _wire(second / "captures" / pcap.name)
        assert [flow for flow, _ in a] == [flow for flow, _ in b], pcap.name
        for (flow, x), (_, y) in zip(a, b, strict=True):
            assert [p for p in x if isinstance(p, bytes)] == [p for p in y if isinstance(p, bytes)], (pcap.name, flow)
            assert [p for p in x if isinstance(p, int)] == [p for p in y if isinstance(p, int)], (pcap.name, flow)
            tls_seen += sum(isinstance(p, int) for p in x)
    assert tls_seen > 0


def _wire(pcap: Path) -> list[tuple[tuple[str, int, str, int, int], list[bytes | int]]]:
    """Each TCP flow direction of a pcap, split into plaintext lines (bytes) and TLS records (content type)."""
    streams: dict[tuple[str, int, str, int, int], bytearray] = {}
    connection: dict[tuple[str, int, str, int], int] = {}
    for packet in rdpcap(str(pcap)):
        if TCP not in packet:
            continue
        tcp = packet[TCP]
        four = (packet[IP].src, tcp.sport, packet[IP].dst, tcp.dport)
        if "S" in str(tcp.flags) and "A" not in str(tcp.flags):
            connection[four] = connection.get(four, -1) + 1  # a new connection on the same addresses
        key = (*four, connection.get(four, connection.get((four[2], four[3], four[0], four[1]), 0)))
        streams.setdefault(key, bytearray()).extend(bytes(tcp.payload))
    return [(key, _split(bytes(data))) for key, data in streams.items()]


def _split(stream: bytes) -> list[bytes | int]:
    parts: list[bytes | int] = []
    i = 0
    while i < len(stream):
        if stream[i] in (20, 21, 22, 23) and stream[i + 1 : i + 2] == b"\x03":
            parts.append(stream[i])
            i += 5 + int.from_bytes(stream[i + 3 : i + 5], "big")
        else:
            end = stream.find(b"\n", i)
            end = len(stream) if end < 0 else end + 1
            parts.append(stream[i:end])
            i = end
    return parts


# -- bad input ------------------------------------------------------------------------------------------

BAD_CASE = """\
id: ATK-TYPO-01
title: "a case with a typo in its client"
refs:
  - ref: RFC 3207 4
    level: MUST
    text: A case file names one of the lab's client behaviours.
description: d
expectation: e
client: {host: mta-skip, behaviour: skipp}
expect:
  any:
    - {verdict: OK, label: ok, when: {tls: false}}
"""

BAD_TOPOLOGY = """\
name: broken
networks:
  - {name: PublicNet, subnet: 192.168.2.0/24}
  - {name: PrivateNet, subnet: 192.168.1.0/24}
hosts:
  - name: esa
    role: appliance
    addresses: [192.168.2.1, 192.168.1.1]
    appliance: builtin
  - name: mta-skip
    role: mta
    addresses: [192.168.2.300]
"""


@pytest.mark.parametrize(
    ("files", "args", "where"),
    [
        ({"bad.yaml": BAD_CASE}, ["bad.yaml"], r"bad\.yaml:9: client\.behaviour: unknown behaviour 'skipp' .*"),
        (
            {"topo.yaml": BAD_TOPOLOGY},
            ["--topology", "topo.yaml", "3207-4-01"],
            r"topo\.yaml:12: hosts\[1\]\.addresses\[0\]: \S.*",
        ),
    ],
)
def test_bad_input_is_one_line_with_file_line_and_field(
    tmp_path: Path, files: dict[str, str], args: list[str], where: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    done = smtplab("run", *args, cwd=tmp_path)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert re.fullmatch(r"smtplab: " + where, lines[0]), lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "smtplab-report").exists()


# -- the default run ------------------------------------------------------------------------------------


def test_the_default_run_exits_0_with_every_verdict_ok_or_informational(default_cli: CLIRun) -> None:
    assert default_cli.code == 0, default_cli.stderr[-2000:]
    summary = SUMMARY.search(default_cli.stdout)
    assert summary, default_cli.stdout[-1000:]
    result = load_index(default_cli.report / "index.json")
    assert result.carrier == "memory"
    assert {run.verdict for run in result.runs} <= CLEAN
    counts = result.counts()
    assert (counts.get(Verdict.OK, 0), counts.get(Verdict.INFORMATIONAL, 0)) == tuple(map(int, summary.groups()))
    assert "Traceback" not in default_cli.stderr


def test_the_default_run_writes_valid_reports(default_cli: CLIRun) -> None:
    report = default_cli.report
    index = json.loads((report / "index.json").read_text())
    schema = json.loads((REPO / "lab" / "schemas" / "index.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(index)
    assert index["started"]  # the default run keeps its timestamp

    suites = ET.parse(report / "junit.xml").getroot()
    assert suites.tag == "testsuites"
    assert int(suites.get("tests", "-1")) == len(index["runs"]) == len(suites.findall("./testsuite/testcase"))
    assert (suites.get("failures"), suites.get("errors")) == ("0", "0")

    page = _Page.read(report / "index.html")
    assert page.external == [], "index.html must not load anything from elsewhere"
    assert page.scripts_with_src == [] and page.stylesheets == []
    assert page.styles >= 1  # its CSS is inline
    missing = [href for href in page.local_links if not (report / href).is_file()]
    assert missing == [], "every link to a capture or key log must resolve inside the report directory"
    assert page.local_links, "the page links the run's captures"
    assert set(page.anchors) <= page.ids, "every in-page link has its target"
    assert all(run["case"] in page.text for run in index["runs"])


class _Page(HTMLParser):
    """What makes a page self-contained: nothing fetched from elsewhere, links that resolve."""

    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []
        self.scripts_with_src: list[str] = []
        self.stylesheets: list[str] = []
        self.local_links: list[str] = []
        self.anchors: list[str] = []
        self.ids: set[str] = set()
        self.styles = 0
        self.text = ""

    @classmethod
    def read(cls, path: Path) -> _Page:
        page = cls()
        page.feed(path.read_text())
        return page

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "id" in values:
            self.ids.add(values["id"])
        if tag == "style":
            self.styles += 1
        if tag == "script" and values.get("src"):
            self.scripts_with_src.append(values["src"])
        if tag == "link" and "stylesheet" in values.get("rel", ""):
            self.stylesheets.append(values.get("href", ""))
        for name in ("src", "href"):
            url = values.get(name)
            if not url:
                continue
            if re.match(r"^[a-z][a-z0-9+.-]*:|^//", url, re.IGNORECASE):
                self.external.append(url)
            elif url.startswith("#"):
                self.anchors.append(url[1:])
            else:
                self.local_links.append(url)

    def handle_data(self, data: str) -> None:
        self.text += data


def test_the_in_process_run_is_clean_and_agrees_with_the_cli(
    catalogue: list[Any], memory: RunResult, default_cli: CLIRun
) -> None:
    assert memory.exit_code() == 0
    assert {run.verdict for run in memory.runs} <= CLEAN
    assert len(memory.runs) == sum(len(case.policies) for case in catalogue)
    assert verdicts(memory) == verdicts(load_index(default_cli.report / "index.json"))


def test_the_loopback_carrier_gives_the_same_verdicts_as_memory(loopback_cli: CLIRun, memory: RunResult) -> None:
    assert loopback_cli.code == 0, loopback_cli.stderr[-2000:]
    loopback = load_index(loopback_cli.report / "index.json")
    assert loopback.carrier == "loopback"
    assert {run.carrier for run in loopback.runs} == {"loopback"}
    assert verdicts(loopback) == verdicts(memory)


# -- the captures, read by tshark -----------------------------------------------------------------------


FIELDS = ("frame.number", "smtp.command_line", "smtp.response", "tls.handshake.type", "tls.record.content_type")


@dataclass(frozen=True)
class Frame:
    number: int
    commands: str  # smtp.command_line, every occurrence
    responses: str  # smtp.response
    client_hello: bool
    in_tls: bool  # the SMTP came out of a TLS record (decrypted with the key log)


def tshark(pcap: Path, *, keylog: Path | None = None) -> list[Frame]:
    """The SMTP frames and ClientHellos of one capture, as tshark dissects them."""
    args = [need_tool("tshark"), "-n", "-r", str(pcap)]
    if keylog is not None:
        args += ["-o", f"tls.keylog_file:{keylog}"]
    args += ["-Y", "smtp || tls.handshake.type == 1", "-T", "fields", "-E", "separator=|", "-E", "occurrence=a"]
    for field in FIELDS:
        args += ["-e", field]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    frames = []
    for line in done.stdout.splitlines():
        number, commands, responses, handshake, content = line.split("|")
        hello = "1" in handshake.split(",")
        frames.append(Frame(int(number), commands, responses, hello, "23" in content.split(",")))
    return frames


def hello_frame(frames: list[Frame]) -> int:
    hellos = [f.number for f in frames if f.client_hello]
    assert len(hellos) == 1, frames
    return hellos[0]


@pytest.mark.parametrize(
    ("stem", "envelope"),
    [
        ("3207-4-08-preferred", "MAIL FROM:<alice@example.net>"),  # prefer: opportunistic TLS
        ("3207-4-09-required", "MAIL FROM:<alice@example.net>"),  # prefer-strict under Required
        ("ATK-INJECT-01-required", "MAIL FROM:<alice@example.net>"),  # injected MAIL in plaintext, honest one in TLS
    ],
)
def test_tshark_follows_starttls_and_decrypts_with_the_key_log(default_cli: CLIRun, stem: str, envelope: str) -> None:
    captures = default_cli.report / "captures"
    plain = tshark(captures / f"{stem}.pcap")
    commands = [f for f in plain if f.commands]
    assert any(f.commands.startswith("EHLO ") for f in commands), plain
    starttls = next(f.number for f in commands if f.commands.startswith("STARTTLS"))
    ready = next(f.number for f in plain if f.number > starttls and f.responses.startswith("220 "))
    hello = hello_frame(plain)
    assert hello > ready, "the ClientHello follows the 220 to STARTTLS"
    # Without the key log nothing of the session inside TLS is readable.
    assert not any(f.number > hello and f.commands for f in plain)

    decrypted = tshark(captures / f"{stem}.pcap", keylog=captures / f"{stem}.keys.log")
    inside = [f for f in decrypted if f.number > hello and f.commands]
    assert any(f.commands.startswith(envelope) and f.in_tls for f in inside), decrypted
    assert any(f.commands.startswith("QUIT") for f in inside)


def test_tshark_reads_a_plaintext_session_without_keys(default_cli: CLIRun) -> None:
    frames = tshark(default_cli.report / "captures" / "3207-4-01-no.pcap")
    assert not any(f.client_hello for f in frames)
    lines = [f.commands for f in frames if f.commands]
    assert any(line.startswith("MAIL FROM:<alice@example.net>") for line in lines), frames
    assert any(line.startswith("DATA") for line in lines)
    assert not (default_cli.report / "captures" / "3207-4-01-no.keys.log").exists()


def test_every_capture_of_the_run_opens(default_cli: CLIRun) -> None:
    """capinfos (Wireshark's file reader, one process for all files) opens every pcap and counts its packets.

    tshark itself costs ~0.3 s of start-up per file; the representative captures above are dissected by it.
    """
    pcaps = sorted((default_cli.report / "captures").glob("*.pcap"))
    index = json.loads((default_cli.report / "index.json").read_text())
    assert {default_cli.report / run["capture"] for run in index["runs"] if run["capture"]} == set(pcaps)
    done = subprocess.run(
        [need_tool("capinfos"), "-T", "-r", "-c", "-M", *map(str, pcaps)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    counts = dict(line.rsplit("\t", 1) for line in done.stdout.splitlines() if line.strip())
    assert set(counts) == {str(p) for p in pcaps}
    assert all(int(n) >= 3 for n in counts.values()), counts  # at least the TCP handshake
