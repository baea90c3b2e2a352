"""pcap and key-log writing: the files must read back in tshark as real, decryptable SMTP/TLS streams."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapWriter, rdpcap
from serving import need_tool

from lab.errors import BadInput, HarnessError
from lab.net.capture import Capture, Direction, Endpoint, Flow
from lab.net.pcap import EPOCH, MSS, frames, mac_for, write_pcap
from lab.tls.keylog import KeyLog

C2S, S2C = Direction.C2S, Direction.S2C
CLIENT, SERVER = "198.51.100.7", "192.168.2.1"
BODY = b"".join(b"line %05d of a long message body\r\n" % i for i in range(400))  # 14000 bytes: > 8 MSS
PLAIN_BEFORE_TLS = [
    (S2C, b"220 mx.lab.example ESMTP\r\n"),
    (C2S, b"EHLO client.example.net\r\n"),
    (S2C, b"250-mx.lab.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
    (C2S, b"STARTTLS\r\n"),
    (S2C, b"220 2.0.0 Ready to start TLS\r\n"),
]


# ---------------------------------------------------------------------------------------------- a real TLS run


def _contexts(keylog: KeyLog) -> tuple[SSL.Context, SSL.Context]:
    """A TLS 1.3 server with a throwaway self-signed certificate and a client that does not verify it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.lab.example")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    server = SSL.Context(SSL.TLS_METHOD)
    server.set_min_proto_version(SSL.TLS1_3_VERSION)
    server.use_certificate(cert)
    server.use_privatekey(key)
    client = SSL.Context(SSL.TLS_METHOD)
    client.set_min_proto_version(SSL.TLS1_3_VERSION)
    keylog.install(server)
    keylog.install(client)
    return server, client


class _Wire:
    """Two SSL.Connections over memory BIOs; every byte moved between them is recorded in the flow."""

    def __init__(self, flow: Flow, server_ctx: SSL.Context, client_ctx: SSL.Context, t: float) -> None:
        self.flow, self.t = flow, t
        self.server, self.client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
        self.server.set_accept_state()
        self.client.set_connect_state()

    def send(self, direction: Direction, data: bytes) -> None:
        self.t += 0.010
        self.flow.record(direction, self.t, data)

    def pump(self) -> bool:
        """Move pending ciphertext both ways; True if anything moved."""
        moved = False
        for direction, src, dst in ((C2S, self.client, self.server), (S2C, self.server, self.client)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            self.send(direction, data)
            dst.bio_write(data)
            moved = True
        return moved

    def handshake(self) -> None:
        for _ in range(20):  # TLS 1.3 needs 2 round trips; bounded anyway
            for conn in (self.client, self.server):
                with contextlib.suppress(SSL.WantReadError):
                    conn.do_handshake()
            if not self.pump() and self.client.get_state_string() == self.server.get_state_string():
                break
        assert self.client.get_protocol_version_name() == "TLSv1.3"

    def say(self, direction: Direction, line: bytes) -> bytes:
        src, dst = (self.client, self.server) if direction is C2S else (self.server, self.client)
        src.sendall(line)
        for _ in range(10):
            self.pump()
            try:
                return dst.recv(65536)
            except SSL.WantReadError:
                continue
        raise AssertionError("TLS data did not arrive")


def _tls_flow(capture: Capture, keylog: KeyLog) -> None:
    """Flow 0: plaintext SMTP up to 220 to STARTTLS, a real TLS 1.3 handshake, then SMTP inside TLS."""
    flow = capture.open(Endpoint(CLIENT, 40001), Endpoint(SERVER, 25), 1.0)
    server_ctx, client_ctx = _contexts(keylog)
    wire = _Wire(flow, server_ctx, client_ctx, 1.0)
    for direction, data in PLAIN_BEFORE_TLS:
        wire.send(direction, data)
    wire.handshake()
    assert wire.say(C2S, b"EHLO x\r\n") == b"EHLO x\r\n"
    assert wire.say(S2C, b"250 ok\r\n") == b"250 ok\r\n"
    assert wire.say(C2S, b"MAIL FROM:<a@b>\r\n") == b"MAIL FROM:<a@b>\r\n"
    assert wire.say(S2C, b"250 2.1.0 ok\r\n") == b"250 2.1.0 ok\r\n"
    flow.close(C2S, wire.t + 0.010)


def _plain_big_flow(capture: Capture) -> Flow:
    """Flow 1: plaintext SMTP on port 2525 with a DATA body far over one MSS, closed by the server."""
    flow = capture.open(Endpoint(CLIENT, 40002), Endpoint(SERVER, 2525), 2.0)
    script = [
        (S2C, b"220 mx.lab.example ESMTP\r\n"),
        (C2S, b"EHLO client.example.net\r\n"),
        (S2C, b"250 mx.lab.example\r\n"),
        (C2S, b"MAIL FROM:<big@example.net>\r\n"),
        (S2C, b"250 2.1.0 ok\r\n"),
        (C2S, b"RCPT TO:<u@lab.example>\r\n"),
        (S2C, b"250 2.1.5 ok\r\n"),
        (C2S, b"DATA\r\n"),
        (S2C, b"354 go ahead\r\n"),
        (C2S, BODY + b".\r\n"),
        (S2C, b"250 2.0.0 queued\r\n"),
        (C2S, b"QUIT\r\n"),
        (S2C, b"221 2.0.0 bye\r\n"),
    ]
    for n, (direction, data) in enumerate(script):
        flow.record(direction, 2.0 + 0.01 * (n + 1), data)
    flow.close(S2C, 2.5)
    return flow


def _refused_flow(capture: Capture) -> None:
    """Flow 2: the server refused the SYN (TCPREFUSE)."""
    flow = capture.open(Endpoint(CLIENT, 40003), Endpoint(SERVER, 25), 3.0)
    flow.refused = True


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Capture, KeyLog, Path]:
    capture, keylog = Capture(), KeyLog()
    _tls_flow(capture, keylog)
    _plain_big_flow(capture)
    _refused_flow(capture)
    out = tmp_path_factory.mktemp("pcap")
    write_pcap(capture, out / "run.pcap")
    keylog.write(out / "keys.log")
    return capture, keylog, out


# ---------------------------------------------------------------------------------------------- tshark


@pytest.fixture(scope="module")
def tshark(tmp_path_factory: pytest.TempPathFactory):
    """Run tshark on a file with a clean profile; missing tshark is a failure in CI (.ci/run installs it)."""
    exe = need_tool("tshark")
    home = tmp_path_factory.mktemp("tshark-home")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LC_ALL": "C"}

    def go(path: Path, *args: str) -> str:
        proc = subprocess.run(
            [exe, "-n", "-r", str(path), *args], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return go


def _fields(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def test_follow_tcp_shows_the_plaintext_dialogue(run, tshark) -> None:
    _, _, out = run
    follow = tshark(out / "run.pcap", "-q", "-z", "follow,tcp,ascii,0")
    for _, data in PLAIN_BEFORE_TLS:
        for line in data.decode().split("\r\n")[:-1]:
            assert line in follow
    assert "MAIL FROM:<a@b>" not in follow  # it went inside TLS


def test_smtp_commands_before_tls_are_dissected(run, tshark) -> None:
    _, _, out = run
    # smtp.req.command is only the first four characters ("STAR"); the whole line is smtp.command_line
    out_ = tshark(out / "run.pcap", "-Y", "smtp.req && tcp.stream == 0", "-T", "fields", "-e", "smtp.command_line")
    assert [r[0].removesuffix("\\r\\n") for r in _fields(out_)] == ["EHLO client.example.net", "STARTTLS"]


def test_client_hello_is_found_after_starttls(run, tshark) -> None:
    _, _, out = run
    rows = _fields(tshark(out / "run.pcap", "-Y", "tls.handshake.type == 1", "-T", "fields", "-e", "tcp.stream"))
    assert rows == [["0"]]


def test_key_log_decrypts_the_smtp_inside_tls(run, tshark) -> None:
    _, keylog, out = run
    assert {line.split(b" ")[0] for line in keylog.lines} >= {
        b"CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        b"SERVER_HANDSHAKE_TRAFFIC_SECRET",
        b"CLIENT_TRAFFIC_SECRET_0",
        b"SERVER_TRAFFIC_SECRET_0",
    }
    fields = ("-Y", "smtp.req && tcp.stream == 0", "-T", "fields", "-e", "smtp.req.command", "-e", "smtp.req.parameter")
    decrypted = _fields(tshark(out / "run.pcap", "-o", f"tls.keylog_file:{out / 'keys.log'}", *fields))
    assert ["MAIL", "FROM:<a@b>"] in decrypted
    assert ["EHLO", "x"] in decrypted
    without_keys = _fields(tshark(out / "run.pcap", *fields))
    assert ["MAIL", "FROM:<a@b>"] not in without_keys


def test_no_tcp_analysis_warnings(run, tshark) -> None:
    _, _, out = run
    assert tshark(out / "run.pcap", "-d", "tcp.port==2525,smtp", "-Y", "tcp.analysis.flags").strip() == ""
    expert = tshark(out / "run.pcap", "-q", "-z", "expert,warn")
    assert "Previous segment" not in expert and "ACKed unseen" not in expert


def test_big_flow_is_split_at_the_mss_and_reassembles(run, tshark) -> None:
    capture, _, out = run
    rows = _fields(tshark(out / "run.pcap", "-Y", "tcp.stream == 1 && tcp.len > 0", "-T", "fields", "-e", "tcp.len"))
    lengths = [int(r[0]) for r in rows]
    data_len = len(BODY) + 3
    assert [n for n in lengths if n == MSS] == [MSS] * (data_len // MSS)
    assert data_len % MSS in lengths
    assert sum(lengths) == len(capture.flows[1].payload(C2S)) + len(capture.flows[1].payload(S2C))
    follow = tshark(out / "run.pcap", "-q", "-z", "follow,tcp,raw,1")
    hexdata = "".join(line.strip() for line in follow.splitlines() if set(line.strip()) <= set("0123456789abcdef"))
    assert BODY.hex() in hexdata


def test_decode_as_smtp_on_another_port(run, tshark) -> None:
    _, _, out = run
    fields = ("-Y", "smtp.req && tcp.stream == 1", "-T", "fields", "-e", "smtp.req.command")
    assert _fields(tshark(out / "run.pcap", *fields)) == []
    commands = [r[0] for r in _fields(tshark(out / "run.pcap", "-d", "tcp.port==2525,smtp", *fields))]
    assert commands == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_port_override_makes_smtp_decode_without_hints(run, tshark, tmp_path) -> None:
    capture, _, _ = run
    write_pcap(capture, tmp_path / "p.pcap", port_override={2525: 25})
    query = ("-Y", "tcp.stream == 1 && smtp.req", "-T", "fields", "-e", "tcp.dstport")
    rows = _fields(tshark(tmp_path / "p.pcap", *query))
    assert rows and all(r == ["25"] for r in rows)


def test_refused_flow_is_syn_then_rst_ack(run, tshark) -> None:
    _, _, out = run
    rows = _fields(tshark(out / "run.pcap", "-Y", "tcp.stream == 2", "-T", "fields", "-e", "tcp.flags"))
    assert rows == [["0x0002"], ["0x0014"]]  # SYN, then RST+ACK


# ---------------------------------------------------------------------------------------------- file structure


def _tcp(path: Path) -> list:
    return [p for p in rdpcap(str(path)) if TCP in p]


def test_sequence_and_ack_numbers_are_exact(run) -> None:
    capture, _, out = run
    packets = [p for p in _tcp(out / "run.pcap") if p[TCP].dport == 2525 or p[TCP].sport == 2525]
    syn, syn_ack, ack = packets[:3]
    assert str(syn[TCP].flags) == "S" and str(syn_ack[TCP].flags) == "SA" and str(ack[TCP].flags) == "A"
    assert syn_ack[TCP].ack == syn[TCP].seq + 1 and ack[TCP].ack == syn_ack[TCP].seq + 1
    nxt = {"c": syn[TCP].seq + 1, "s": syn_ack[TCP].seq + 1}
    stream = {"c": b"", "s": b""}
    for p in packets[2:]:
        side, peer = ("c", "s") if p[TCP].dport == 2525 else ("s", "c")
        payload = bytes(p[TCP].payload)
        assert p[TCP].seq == nxt[side]
        assert p[TCP].ack == nxt[peer]
        assert len(payload) <= MSS
        stream[side] += payload
        nxt[side] += len(payload) + (1 if "F" in str(p[TCP].flags) else 0)
    flow = capture.flows[1]
    assert stream["c"] == flow.payload(C2S) and stream["s"] == flow.payload(S2C)


def test_fin_order_follows_closed_by(run) -> None:
    _, _, out = run
    tcp = _tcp(out / "run.pcap")
    by_server = [str(p[TCP].flags) for p in tcp if 2525 in (p[TCP].sport, p[TCP].dport)][-3:]
    assert by_server == ["FA", "FA", "A"]
    last = [p for p in tcp if 2525 in (p[TCP].sport, p[TCP].dport)][-3:]
    assert last[0][TCP].sport == 2525  # the server's FIN comes first
    first = [p for p in tcp if p[TCP].sport == 40001 or p[TCP].dport == 40001][-3:]
    assert first[0][TCP].sport == 40001 and "F" in str(first[0][TCP].flags)


def test_big_segment_gets_acked_within_the_window(run) -> None:
    _, _, out = run
    tcp = [p for p in _tcp(out / "run.pcap") if 2525 in (p[TCP].sport, p[TCP].dport)]
    unacked, worst = 0, 0
    for p in tcp:
        if p[TCP].dport == 2525:
            unacked += len(bytes(p[TCP].payload))
            worst = max(worst, unacked)
        elif p[TCP].sport == 2525:
            unacked = 0
    assert len(BODY) > 8 * MSS and worst <= 8 * MSS


def test_timestamps_and_addresses_come_from_the_capture(run) -> None:
    _, _, out = run
    packets = rdpcap(str(out / "run.pcap"))
    assert packets[0].time == EPOCH + 1  # flow 0 opened at virtual time 1.0
    assert all(a.time <= b.time for a, b in itertools.pairwise(packets))
    first = packets[0]
    assert first[IP].src == CLIENT and first[IP].dst == SERVER and first[TCP].dport == 25
    assert first[Ether].src == mac_for(CLIENT) == "02:00:c6:33:64:07"
    assert first[Ether].dst == mac_for(SERVER) == "02:00:c0:a8:02:01"


def test_same_capture_gives_identical_bytes_and_seed_changes_them(run, tmp_path) -> None:
    capture, _, out = run
    write_pcap(capture, tmp_path / "again.pcap")
    assert (tmp_path / "again.pcap").read_bytes() == (out / "run.pcap").read_bytes()
    write_pcap(capture, tmp_path / "seeded.pcap", seed=7)
    assert (tmp_path / "seeded.pcap").read_bytes() != (out / "run.pcap").read_bytes()


def test_plaintext_capture_built_twice_is_byte_identical(tmp_path) -> None:
    for name in ("a", "b"):
        capture = Capture()
        _plain_big_flow(capture)
        _refused_flow(capture)
        write_pcap(capture, tmp_path / f"{name}.pcap")
    assert (tmp_path / "a.pcap").read_bytes() == (tmp_path / "b.pcap").read_bytes()


def test_overlapping_flows_are_interleaved_in_time_order() -> None:
    capture = Capture()
    a = capture.open(Endpoint(CLIENT, 1111), Endpoint(SERVER, 25), 0.0)
    b = capture.open(Endpoint("198.51.100.8", 2222), Endpoint(SERVER, 25), 0.5)
    a.record(S2C, 1.0, b"220 a\r\n")
    b.record(S2C, 0.7, b"220 b\r\n")
    packets = frames(capture)
    assert [f.usec for f in packets] == sorted(f.usec for f in packets)
    payloads = [bytes(Ether(f.data)[TCP].payload) for f in packets if Ether(f.data)[TCP].payload]
    assert payloads == [b"220 b\r\n", b"220 a\r\n"]


def test_unclosed_flow_has_no_fin_and_ipv6_works() -> None:
    capture = Capture()
    flow = capture.open(Endpoint("2001:db8::7", 40000), Endpoint("2001:db8::1", 25), 0.0)
    flow.record(S2C, 0.1, b"220 hi\r\n")
    packets = [Ether(f.data) for f in frames(capture)]
    assert all(IPv6 in p for p in packets)
    assert not any("F" in str(p[TCP].flags) for p in packets)
    assert [str(p[TCP].flags) for p in packets] == ["S", "SA", "A", "PA", "A"]


def test_wall_clock_times_are_kept_as_they_are() -> None:
    capture = Capture()
    capture.open(Endpoint(CLIENT, 1025), Endpoint(SERVER, 25), 1_800_000_000.25)
    assert frames(capture)[0].usec == 1_800_000_000_250_000


def test_client_port_zero_gets_one_port_per_flow() -> None:
    capture = Capture()
    for t in (0.0, 1.0):
        capture.open(Endpoint(CLIENT, 0), Endpoint(SERVER, 25), t).close(C2S, t + 0.5)
    syns = [Ether(f.data)[TCP] for f in frames(capture) if str(Ether(f.data)[TCP].flags) == "S"]
    assert [p.sport for p in syns] == [49152, 49153]
    assert syns[0].seq != syns[1].seq


def test_bad_port_override_and_bad_flows_are_reported(tmp_path) -> None:
    capture = Capture()
    capture.open(Endpoint(CLIENT, 1), Endpoint(SERVER, 25), 0.0)
    with pytest.raises(BadInput) as exc:
        write_pcap(capture, tmp_path / "x.pcap", port_override={2525: 70000})
    assert exc.value.field == "port_override"
    capture.open(Endpoint("198.51.100.9", 1), Endpoint("2001:db8::1", 25), 0.0)
    with pytest.raises(HarnessError, match="mix IPv4 and IPv6"):
        frames(capture)
    refused = Capture()
    flow = refused.open(Endpoint(CLIENT, 1), Endpoint(SERVER, 25), 0.0)
    flow.refused = True
    flow.record(C2S, 0.1, b"x")
    with pytest.raises(HarnessError, match="refused"):
        frames(refused)


def test_empty_capture_is_a_valid_empty_pcap(tmp_path) -> None:
    write_pcap(Capture(), tmp_path / "empty.pcap")
    assert (tmp_path / "empty.pcap").read_bytes()[:4] == bytes.fromhex("d4c3b2a1")
    assert len(rdpcap(str(tmp_path / "empty.pcap"))) == 0


# ---------------------------------------------------------------------------------------------- key log


def test_key_log_keeps_order_drops_repeats_and_writes_lines(tmp_path) -> None:
    log = KeyLog()
    a = b"CLIENT_HANDSHAKE_TRAFFIC_SECRET " + b"aa" * 32 + b" " + b"11" * 48
    b = b"SERVER_HANDSHAKE_TRAFFIC_SECRET " + b"aa" * 32 + b" " + b"22" * 48
    for line in (a, b, a, b + b"\n"):
        log.callback(line)
    assert log.lines == [a, b] and len(log) == 2
    log.write(tmp_path / "sub" / "keys.log")
    assert (tmp_path / "sub" / "keys.log").read_bytes() == a + b"\n" + b + b"\n"


def test_key_log_refuses_what_is_not_a_key_line() -> None:
    log = KeyLog()
    with pytest.raises(HarnessError):
        log.callback(b"CLIENT_RANDOM aa\nbb cc")
    with pytest.raises(HarnessError):
        log.callback(b"hello world")
    assert not log


def test_real_handshake_logs_each_secret_once(run) -> None:
    _, keylog, out = run
    lines = (out / "keys.log").read_bytes().splitlines()
    assert lines == keylog.lines and len(set(lines)) == len(lines)
    # both ends saw the same secrets: 4 traffic secrets + exporter secret, each once
    assert len({line.split(b" ")[0] for line in lines}) == len(lines)


def test_packed_headers_are_what_scapy_builds() -> None:
    """The writer packs headers itself for speed; scapy rebuilding each frame (checksums recomputed) agrees."""
    capture = Capture()
    v4 = capture.open(Endpoint(CLIENT, 40001), Endpoint(SERVER, 25), 0.0)
    v4.record(S2C, 0.1, b"220 hi\r\n")
    v4.record(C2S, 0.2, b"x" * 3001)  # odd length: checksum padding; three segments
    v4.close(S2C, 0.3)
    v6 = capture.open(Endpoint("2001:db8::7", 40002), Endpoint("2001:db8::1", 25), 0.0)
    v6.record(C2S, 0.1, b"EHLO odd\r\n.")
    refused = capture.open(Endpoint(CLIENT, 40003), Endpoint(SERVER, 25), 0.5)
    refused.refused = True
    packets = frames(capture)
    assert len(packets) > 15
    for frame in packets:
        rebuilt = Ether(frame.data)
        if IP in rebuilt:
            del rebuilt[IP].chksum
        del rebuilt[TCP].chksum
        assert bytes(rebuilt) == frame.data


def test_file_is_what_scapys_pcap_writer_writes(tmp_path: Path) -> None:
    """The file is packed with struct; scapy's RawPcapWriter, given the same frames, writes the same bytes."""
    capture = Capture()
    flow = capture.open(Endpoint(CLIENT, 40001), Endpoint(SERVER, 25), 0.0)
    flow.record(S2C, 0.1, b"220 hi\r\n")
    flow.close(C2S, 0.2)
    ours, theirs = tmp_path / "ours.pcap", tmp_path / "scapy.pcap"
    write_pcap(capture, ours)
    writer = RawPcapWriter(str(theirs), linktype=1, endianness="<", sync=False)
    writer.write_header(None)
    for frame in frames(capture):
        writer.write_packet(frame.data, sec=frame.usec // 1_000_000, usec=frame.usec % 1_000_000)
    writer.close()
    assert ours.read_bytes() == theirs.read_bytes()
