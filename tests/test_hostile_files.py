"""Hostile input files: every loader refuses them cheaply, with one line naming FILE:LINE: field, and exit 3.

Each case is generated here: alias bombs in each kind of file, deep nesting, huge files, wrong types, NaN and
infinities, bad cipher strings, CR/LF/NUL in wire-bound strings, huge numbers, unknown hosts, bad certificate
paths, bytes that are not UTF-8, a directory, an empty file, a top-level list... All go through the real loaders
in-process; a representative subset also goes through the real command as a subprocess under an address-space
limit, whose peak RSS is measured with wait4 (docs/config-format.md, "Limits").
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.appliance.config import load_appliance
from lab.conformance.profile import load_profile
from lab.errors import BadInput
from lab.net.topology import default_topology, load_topology
from lab.scenario.loader import check_client_hosts, load_cases

REPO = Path(__file__).resolve().parent.parent
ADDRESS_SPACE = 1024**3  # RLIMIT_AS of each subprocess: a runaway loader dies instead of taking the machine
MAX_RSS_MB = 200
WALL_LIMIT = 20.0  # seconds: a generous upper bound on a shared machine (measured: well under 1 s each)

APPLIANCE = """\
hostname: esa.test.example
interfaces:
  - {name: PublicNet, address: 192.168.2.1}
certificates:
  - name: labcert
    kind: lab
    hostnames: [esa.test.example]
listeners:
  - name: Inboundmail
    type: public
    interface: PublicNet
    port: 25
    certificate: labcert
    tcp_queue: 50
    max_concurrency: 100
    default_domain: test.example
    rat: [example.com]
    tls: {min_version: "1.2", ciphers: "HIGH:!aNULL"}
    hat:
      defaults:
        tls: preferred
        banner_text: ESMTP test
        reject_banner_text: go away
        max_message_size: 10M
        max_rcpts_per_msg: 100
        tls_mandatory_senders: [partner.example]
"""

TOPOLOGY = """\
networks:
  - {name: outside, subnet: 198.51.100.0/24}
  - {name: inside, subnet: 192.168.2.0/24}
  - {name: private, subnet: 192.168.1.0/24}
hosts:
  - name: esa
    role: appliance
    addresses: [192.168.2.1, 192.168.1.1]
    appliance: builtin
  - name: sender
    role: mta
    addresses: [198.51.100.7]
    dns_names: [mx.sender.example]
links:
  - {between: [sender, esa]}
"""

SCENARIO = """\
id: POL-HOSTILE-01
title: the valid base of the hostile-file tests
refs:
  - {ref: RFC 3207 4, level: MUST, text: a base case}
description: base
expectation: base
client:
  host: mta-prefer
  behaviour: prefer
  mail_from: alice@example.net
policy_params: {max_rcpts_per_msg: 3}
expect:
  any:
    - verdict: OK
      label: base
      when:
        tls: true
"""

PROFILE = """\
name: hostile
address: 127.0.0.1:2525
policy: may
ehlo: client.smtplab.test
envelope:
  from: probe@smtplab.invalid
  to: postmaster@example.com
timeouts: {connect: 5, reply: 15, case: 60}
concurrency: 2
deviations:
  - {case: 3207-4, reason: a base deviation}
"""

BASES = {"appliance": APPLIANCE, "topology": TOPOLOGY, "scenario": SCENARIO, "profile": PROFILE}


def edit(base: str, old: str, new: str) -> str:
    assert base.count(old) == 1, old
    return base.replace(old, new)


def bomb(indent: str, levels: int = 9) -> str:
    """A "billion laughs" block sequence: each anchor repeats the previous one nine times (9**9 leaves)."""
    lines = [f"{indent}- &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"{indent}- &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, levels)]
    return "\n".join(lines)


def nested(depth: int = 500) -> str:
    return "[" * depth + "x" + "]" * depth


@dataclass(frozen=True)
class Hostile:
    kind: str  # appliance | topology | scenario | profile
    name: str
    content: bytes | str | None  # None: ``make`` builds the path
    needle: str | None  # text on the line the error must name; None: the error names no line
    field: str | None = None  # the field the error must name
    make: Callable[[Path], Path] | None = None


def A(name: str, content: str | bytes | None, needle: str | None, field: str | None = None, **kw: object) -> Hostile:
    return Hostile("appliance", name, content, needle, field, **kw)  # type: ignore[arg-type]


def _directory(tmp: Path) -> Path:
    path = tmp / "a-directory.yaml"
    path.mkdir()
    return path


CASES: list[Hostile] = [
    # --- appliance files: the reader's limits ---------------------------------------------------------------
    A(
        "alias-bomb-tls-mandatory-senders",
        edit(
            APPLIANCE,
            "        tls_mandatory_senders: [partner.example]",
            "        tls_mandatory_senders:\n" + bomb(" " * 10),
        ),
        "*a",
    ),
    A("alias-bomb-top-level", APPLIANCE + "extra:\n" + bomb("  "), "*a"),
    A("recursive-alias", APPLIANCE + "extra: &r [1, *r]\n", "extra:"),
    A(
        "deep-nesting-flow",
        edit(APPLIANCE, "  - {name: PublicNet, address: 192.168.2.1}", "  - " + nested()),
        "  - [[[",
    ),
    A(
        "deep-nesting-block",
        APPLIANCE + "extra:\n" + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(100)) + "  " * 101 + "end: 1\n",
        "k62:",
    ),
    A("huge-file", APPLIANCE + "# " + "x" * (2 * 1024 * 1024) + "\n", None),
    A("huge-string", edit(APPLIANCE, "banner_text: ESMTP test", f"banner_text: {'x' * 70000}"), "banner_text:"),
    A("empty-file", "", None),
    A("only-a-comment", "# nothing here\n", None),
    A("top-level-list", "- hostname: esa.test.example\n", "- hostname"),
    A("top-level-scalar", "just a string\n", "just a string"),
    A("not-utf8", APPLIANCE.encode() + b"extra: \xff\xfe\n", "extra:"),
    A("nul-byte-in-text", APPLIANCE.replace("ESMTP test", "ESMTP\x00test"), "banner_text:"),
    A("directory", None, None, make=_directory),
    A("duplicate-key", APPLIANCE + "hostname: again.test.example\n", "again.test.example"),
    A("python-tag", APPLIANCE + "extra: !!python/object/apply:os.system ['echo owned']\n", "extra:"),
    A("two-documents", APPLIANCE + "---\nhostname: b.example\n", "---"),
    A("long-unknown-field", APPLIANCE + "x" * 10000 + ": 1\n", "xxxxxxxx"),
    A("int-of-5000-digits", edit(APPLIANCE, "tcp_queue: 50", "tcp_queue: " + "9" * 5000), "tcp_queue:"),
    # --- appliance values: numbers ---------------------------------------------------------------------------
    A(
        "tcp-queue-huge",
        edit(APPLIANCE, "tcp_queue: 50", "tcp_queue: 99999999999999999999"),
        "tcp_queue:",
        "listeners[0].tcp_queue",
    ),
    A("tcp-queue-zero", edit(APPLIANCE, "tcp_queue: 50", "tcp_queue: 0"), "tcp_queue:", "listeners[0].tcp_queue"),
    A("max-concurrency-nan", edit(APPLIANCE, "max_concurrency: 100", "max_concurrency: .nan"), "max_concurrency:"),
    A("max-concurrency-inf", edit(APPLIANCE, "max_concurrency: 100", "max_concurrency: .inf"), "max_concurrency:"),
    A("max-concurrency-float", edit(APPLIANCE, "max_concurrency: 100", "max_concurrency: 1.5"), "max_concurrency:"),
    A("port-as-string", edit(APPLIANCE, "port: 25", 'port: "25"'), "port:", "listeners[0].port"),
    A("port-out-of-range", edit(APPLIANCE, "port: 25", "port: 70000"), "port:", "listeners[0].port"),
    A("size-huge-string", edit(APPLIANCE, "max_message_size: 10M", "max_message_size: 999999999G"), "max_message_size"),
    A(
        "size-huge-int",
        edit(APPLIANCE, "max_message_size: 10M", "max_message_size: 10000000000000"),
        "max_message_size",
    ),
    A("rcpts-negative", edit(APPLIANCE, "max_rcpts_per_msg: 100", "max_rcpts_per_msg: -1"), "max_rcpts_per_msg"),
    A("rcpts-huge", edit(APPLIANCE, "max_rcpts_per_msg: 100", "max_rcpts_per_msg: 1e400"), "max_rcpts_per_msg"),
    # --- appliance values: TLS -------------------------------------------------------------------------------
    A("cipher-unknown", edit(APPLIANCE, "HIGH:!aNULL", "NOT-A-CIPHER"), "ciphers:", "listeners[0].tls.ciphers"),
    A("cipher-selects-none", edit(APPLIANCE, "HIGH:!aNULL", "HIGH:!HIGH"), "ciphers:", "listeners[0].tls.ciphers"),
    A("cipher-with-nul", edit(APPLIANCE, '"HIGH:!aNULL"', '"HIGH\\0"'), "ciphers:", "listeners[0].tls.ciphers"),
    A(
        "tls-versions-crossed",
        edit(APPLIANCE, 'min_version: "1.2"', 'min_version: "1.3", max_version: "1.2"'),
        "min_version",
        "listeners[0].tls.min_version",
    ),
    A("tls-version-unknown", edit(APPLIANCE, 'min_version: "1.2"', 'min_version: "2.0"'), "min_version"),
    # --- appliance values: strings that reach the wire -------------------------------------------------------
    A(
        "hostname-crlf",
        edit(APPLIANCE, "hostname: esa.test.example", 'hostname: "esa.test.example\\r\\n250 injected"'),
        "hostname:",
        "hostname",
    ),
    A("hostname-nul", edit(APPLIANCE, "hostname: esa.test.example", 'hostname: "esa\\0.example"'), "hostname:"),
    A("hostname-underscore", edit(APPLIANCE, "hostname: esa.test.example", "hostname: esa_1.example"), "hostname:"),
    A("hostname-too-long", edit(APPLIANCE, "hostname: esa.test.example", f"hostname: {'a' * 300}"), "hostname:"),
    A("hostname-label-64", edit(APPLIANCE, "hostname: esa.test.example", f"hostname: {'a' * 64}.example"), "hostname:"),
    A("banner-lf", edit(APPLIANCE, "banner_text: ESMTP test", 'banner_text: "ok\\n250 injected"'), "banner_text:"),
    A("banner-non-ascii", edit(APPLIANCE, "banner_text: ESMTP test", "banner_text: ESMTP tést"), "banner_text:"),
    A("reject-banner-cr", edit(APPLIANCE, "reject_banner_text: go away", 'reject_banner_text: "a\\rb"'), "reject_"),
    A("default-domain-crlf", edit(APPLIANCE, "default_domain: test.example", 'default_domain: "a\\r\\nb"'), "default_"),
    A("mandatory-sender-nul", edit(APPLIANCE, "[partner.example]", '["partner\\0example"]'), "tls_mandatory_senders"),
    A("cert-hostname-crlf", edit(APPLIANCE, "hostnames: [esa.test.example]", 'hostnames: ["a\\r\\nb"]'), "hostnames:"),
    A(
        "member-huge",
        APPLIANCE.replace(
            "      defaults:",
            f"      sender_groups:\n        - {{name: G, policy: ACCEPTED, members: [{'x' * 20000}]}}\n      defaults:",
        ),
        "members",
    ),
    A(
        "many-members-then-a-bad-one",  # the most work a refused file can cost: read, validate, build, then fail
        APPLIANCE.replace(
            "      defaults:",
            "      sender_groups:\n        - name: G\n          policy: ACCEPTED\n          members:\n"
            + "".join(f"            - 10.{i // 250}.{i % 250}.1\n" for i in range(9000))
            + "            - 10.1.1.10-300\n      defaults:",
        ),
        "10.1.1.10-300",
        "listeners[0].hat.sender_groups[0].members[9000]",
    ),
    A("interface-scoped-ipv6", edit(APPLIANCE, "address: 192.168.2.1", "address: fe80::1%eth0"), "fe80::1"),
    # --- appliance: certificate files ------------------------------------------------------------------------
    A(
        "cert-file-missing",
        edit(
            APPLIANCE,
            "    kind: lab\n    hostnames: [esa.test.example]",
            "    kind: pem\n    cert_file: nosuch.pem\n    key_file: nosuch.key",
        ),
        "nosuch.pem",
        "certificates[0].cert_file",
    ),
    A(
        "cert-file-is-a-directory",
        edit(
            APPLIANCE,
            "    kind: lab\n    hostnames: [esa.test.example]",
            "    kind: pem\n    cert_file: .\n    key_file: .",
        ),
        "cert_file",
    ),
    A(
        "cert-file-is-dev-zero",
        edit(
            APPLIANCE,
            "    kind: lab\n    hostnames: [esa.test.example]",
            "    kind: pem\n    cert_file: /dev/zero\n    key_file: /dev/zero",
        ),
        "cert_file",
    ),
    A(
        "cert-file-not-pem",
        edit(
            APPLIANCE,
            "    kind: lab\n    hostnames: [esa.test.example]",
            "    kind: pem\n    cert_file: hostile.yaml\n    key_file: hostile.yaml",
        ),
        "cert_file",
    ),
    # --- topology files --------------------------------------------------------------------------------------
    Hostile(
        "topology",
        "alias-bomb-dns-names",
        edit(TOPOLOGY, "dns_names: [mx.sender.example]", "dns_names:\n" + bomb(" " * 6)),
        "*a",
    ),
    Hostile(
        "topology",
        "deep-nesting",
        edit(TOPOLOGY, "dns_names: [mx.sender.example]", "dns_names: " + nested()),
        "dns_names",
    ),
    Hostile(
        "topology",
        "dns-name-crlf",
        edit(TOPOLOGY, "[mx.sender.example]", '["mx.sender.example\\r\\nX"]'),
        "dns_names",
        "hosts[1].dns_names[0]",
    ),
    Hostile(
        "topology", "dns-name-underscore", edit(TOPOLOGY, "[mx.sender.example]", "[mx_1.sender.example]"), "dns_names"
    ),
    Hostile(
        "topology", "appliance-missing", edit(TOPOLOGY, "appliance: builtin", "appliance: nosuch.yaml"), "appliance:"
    ),
    Hostile("topology", "appliance-path-nul", edit(TOPOLOGY, "appliance: builtin", 'appliance: "a\\0b"'), "appliance:"),
    Hostile("topology", "subnet-huge", edit(TOPOLOGY, "subnet: 198.51.100.0/24", f"subnet: {'1' * 50000}"), "subnet"),
    Hostile("topology", "empty-file", "", None),
    Hostile("topology", "top-level-list", "- networks: []\n", "- networks"),
    Hostile("topology", "unknown-link-host", edit(TOPOLOGY, "[sender, esa]", "[sender, nobody]"), "between"),
    # --- scenario files --------------------------------------------------------------------------------------
    Hostile(
        "scenario",
        "alias-bomb-in-when",
        edit(SCENARIO, "        tls: true", "        server_log:\n" + bomb(" " * 10)),
        "*a",
    ),
    Hostile(
        "scenario", "deep-nesting-in-when", edit(SCENARIO, "        tls: true", "        tls: " + nested()), "tls:"
    ),
    Hostile(
        "scenario",
        "unknown-client-host",
        edit(SCENARIO, "host: mta-prefer", "host: nosuchhost"),
        "host:",
        "client.host",
    ),
    Hostile("scenario", "not-utf8", SCENARIO.encode() + b"\xc3\x28\n", "\\xc3"),
    Hostile("scenario", "huge-file", SCENARIO + "#" * (1024 * 1024 + 1) + "\n", None),
    Hostile(
        "scenario",
        "mail-from-crlf",
        edit(SCENARIO, "mail_from: alice@example.net", 'mail_from: "a@b\\r\\nRSET"'),
        "mail_from",
    ),
    Hostile(
        "scenario",
        "policy-banner-crlf",
        edit(SCENARIO, "{max_rcpts_per_msg: 3}", '{banner_text: "a\\r\\n250 b"}'),
        "policy_params",
    ),
    Hostile(
        "scenario",
        "policy-param-huge",
        edit(SCENARIO, "{max_rcpts_per_msg: 3}", "{max_rcpts_per_msg: 1000000000000}"),
        "policy_params",
    ),
    Hostile("scenario", "when-nan", edit(SCENARIO, "        tls: true", "        connections: .nan"), "connections"),
    # --- target profiles -------------------------------------------------------------------------------------
    Hostile("profile", "alias-bomb-in-deviations", PROFILE + bomb("  "), "*a"),
    Hostile(
        "profile", "envelope-from-crlf", edit(PROFILE, "from: probe@smtplab.invalid", 'from: "a@b\\r\\nRSET"'), "from:"
    ),
    Hostile("profile", "ehlo-nul", edit(PROFILE, "ehlo: client.smtplab.test", 'ehlo: "c\\0x"'), "ehlo:", "ehlo"),
    Hostile("profile", "timeout-nan", edit(PROFILE, "connect: 5,", "connect: .nan,"), "timeouts"),
    Hostile(
        "profile",
        "concurrency-huge",
        edit(PROFILE, "concurrency: 2", "concurrency: " + "9" * 30),
        "concurrency:",
        "concurrency",
    ),
    Hostile(
        "profile", "address-huge", edit(PROFILE, "address: 127.0.0.1:2525", f"address: {'1' * 10000}:25"), "address:"
    ),
    Hostile("profile", "ca-file-nul", PROFILE + 'ca_file: "x\\0y"\n', "ca_file"),
]

#: Run through the real command too: one or more of each kind of file and of each kind of limit.
SUBPROCESS = {
    ("appliance", "alias-bomb-tls-mandatory-senders"),
    ("appliance", "deep-nesting-flow"),
    ("appliance", "huge-file"),
    ("appliance", "not-utf8"),
    ("appliance", "directory"),
    ("appliance", "empty-file"),
    ("appliance", "tcp-queue-huge"),
    ("appliance", "max-concurrency-nan"),
    ("appliance", "cipher-unknown"),
    ("appliance", "hostname-crlf"),
    ("appliance", "cert-file-is-dev-zero"),
    ("appliance", "many-members-then-a-bad-one"),
    ("topology", "alias-bomb-dns-names"),
    ("topology", "dns-name-crlf"),
    ("scenario", "alias-bomb-in-when"),
    ("scenario", "unknown-client-host"),
    ("profile", "alias-bomb-in-deviations"),
    ("profile", "timeout-nan"),
}


def materialise(case: Hostile, tmp: Path) -> Path:
    if case.make is not None:
        return case.make(tmp)
    path = tmp / "hostile.yaml"
    data = case.content.encode() if isinstance(case.content, str) else case.content
    assert data is not None
    path.write_bytes(data)
    return path


def expected_lines(path: Path, needle: str) -> set[int]:
    text = path.read_bytes().decode("utf-8", "backslashreplace")
    return {n for n, line in enumerate(text.splitlines(), 1) if needle in line}


def load_in_process(kind: str, path: Path) -> None:
    if kind == "appliance":
        load_appliance(path)
    elif kind == "topology":
        load_topology(path)
    elif kind == "profile":
        load_profile(path)
    else:
        check_client_hosts(load_cases([path]), {host.name for host in default_topology().hosts})


def command(kind: str, path: Path, report_dir: Path) -> list[str]:
    run = [sys.executable, "-m", "lab"]
    report = ["--report-dir", str(report_dir)]
    return {
        "appliance": [*run, "listeners", "--config", str(path)],
        "topology": [*run, "run", "--topology", str(path), "3207-4.2-06", *report],
        "scenario": [*run, "run", str(path), *report],
        "profile": [*run, "run", "--profile", str(path), *report],
    }[kind]


def check_message(message: str, case: Hostile, path: Path, shown: str) -> None:
    """One line: ``FILE:LINE: field: problem`` (``FILE: problem`` when no line applies), short."""
    assert "\n" not in message and "Traceback" not in message, message
    assert len(message) < 600, message
    found = re.match(rf"^{re.escape(shown)}(?::(\d+))?: (.+)$", message)
    assert found, message
    if case.needle is None:
        assert found.group(1) is None or found.group(1) == "1", message
    else:
        assert found.group(1) is not None, message
        assert int(found.group(1)) in expected_lines(path, case.needle), message
    if case.field is not None:
        assert found.group(2).startswith(f"{case.field}: "), message


def test_the_bases_are_valid(tmp_path: Path) -> None:
    for kind, text in BASES.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(text, encoding="utf-8")
        load_in_process(kind, path)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}-{c.name}" for c in CASES])
def test_loader_refuses_with_one_line(tmp_path: Path, case: Hostile) -> None:
    path = materialise(case, tmp_path)
    with pytest.raises(BadInput) as caught:
        load_in_process(case.kind, path)
    shown = (
        os.path.relpath(path) if case.kind == "scenario" and not os.path.relpath(path).startswith("..") else str(path)
    )
    check_message(str(caught.value), case, path, shown)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float  # wall
    cpu_seconds: float  # user + system of the child: what the loader cost, whatever the machine's load
    max_rss_mb: float


def run_limited(args: list[str], cwd: Path) -> Outcome:
    """Run ``args`` under RLIMIT_AS; wait4 gives this child's own peak RSS (not that of every child so far)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    start = time.monotonic()
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    chunks: dict[str, bytes] = {}

    def drain(name: str, stream: object) -> None:
        chunks[name] = stream.read()  # type: ignore[attr-defined]

    readers = [
        threading.Thread(target=drain, args=(n, s)) for n, s in (("out", process.stdout), ("err", process.stderr))
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    for reader in readers:
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    process.stderr.close()
    return Outcome(
        process.returncode,
        chunks["out"].decode(errors="replace"),
        chunks["err"].decode(errors="replace"),
        seconds,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,  # KiB on Linux
    )


SUBPROCESS_CASES = [c for c in CASES if (c.kind, c.name) in SUBPROCESS]


def test_the_subprocess_subset_is_complete() -> None:
    assert len(SUBPROCESS_CASES) == len(SUBPROCESS)


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[f"{c.kind}-{c.name}" for c in SUBPROCESS_CASES])
def test_command_exits_3_with_one_line_cheaply(tmp_path: Path, case: Hostile) -> None:
    path = materialise(case, tmp_path)
    outcome = run_limited(command(case.kind, path, tmp_path / "report"), cwd=tmp_path)
    assert outcome.code == 3, outcome
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("smtplab: "), lines[0]
    shown = path.name if case.kind == "scenario" else str(path)  # the scenario loader shows cwd-relative paths
    check_message(lines[0].removeprefix("smtplab: "), case, path, shown)
    assert outcome.max_rss_mb < MAX_RSS_MB, outcome
    assert outcome.seconds < WALL_LIMIT, outcome


# --- the other side of the principle: what ``smtplab listeners`` accepts, ``smtplab serve`` serves -----------

ODD_BUT_VALID = """\
hostname: {label63}.x-1.example
interfaces:
  - {{name: Loop, address: {host}}}
certificates:
  - name: odd
    kind: lab
    hostnames: ["*.odd.example", {host}, {label63}.x-1.example]
listeners:
  - name: Odd
    type: public
    interface: Loop
    port: {port}
    certificate: odd
    tcp_queue: 65535
    max_concurrency: 65535
    default_domain: x-1.example
    rat: [ALL]
    tls: {{min_version: 1.2, max_version: TLSv1.3, ciphers: "ECDHE+AESGCM:!aNULL:@STRENGTH"}}
    hat:
      defaults:
        tls: Required
        banner_text: "{banner}"
        max_message_size: 1G
        max_rcpts_per_msg: 100000
        max_msgs_per_connection: 1000000
        tls_mandatory_senders: [.x-1.example]
"""


def test_a_file_listeners_accepts_with_odd_values_is_served(tmp_path: Path) -> None:
    import smtplib

    from peers import free_port
    from serving import client_context, fresh_loopback, serve

    host = fresh_loopback()
    port = free_port(host)
    banner = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')[:200]
    config = tmp_path / "odd.yaml"
    config.write_text(
        textwrap.dedent(ODD_BUT_VALID.format(label63="a" * 63, host=host, port=port, banner=banner)), encoding="utf-8"
    )
    listed = subprocess.run(
        [sys.executable, "-m", "lab", "listeners", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "Max Concurrency: 65535 (TCP Queue: 65535)" in listed.stdout
    with (
        serve(tmp_path / "run", "--config", str(config), host=host, port=port),
        smtplib.SMTP(local_hostname="c.x-1.example", timeout=10) as client,
    ):
        code, greeting = client.connect(host, port)
        client._host = host  # smtplib remembers the host for STARTTLS only when the constructor connects
        assert (code, greeting.decode()) == (220, f"{'a' * 63}.x-1.example {banner}")
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("starttls")
        client.starttls(context=client_context())
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        client.ehlo()
        assert client.docmd("MAIL FROM:<a@x-1.example>")[0] == 250
