"""A bounded soak: hostile clients and normal senders at once against a real ``smtplab serve`` on loopback.

Short deadlines come from the appliance file so that the hostile clients are cut off in seconds. Bounded in count
(a fixed list of clients) and in time (every client has its own limit; the whole run well under a minute).
"""

from __future__ import annotations

import os
import smtplib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving import Served, client_context, free_port, fresh_loopback, serve
from test_backpressure import flood_unread, vm_rss_mb

APPLIANCE = """\
hostname: esa.soak.example
interfaces: [{name: Loopback, address: 127.0.0.1}]
listeners:
  - name: Inboundmail
    type: public
    interface: Loopback
    rat: ALL
    max_concurrency: 300
    timeouts: {idle: 3, command: 2, tls_handshake: 2, data: 5, session: 20, close_grace: 1}
    hat:
      defaults: {tls: preferred, max_concurrency_per_ip: 300, max_message_size: 1M}
"""
CLIENT_LIMIT = 15.0  # seconds any one client may take, whatever the server does


def _connect(server: Served) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=CLIENT_LIMIT)
    sock.recv(512)  # the banner
    return sock


def _until_closed(sock: socket.socket) -> bool:
    """Read until the server closes; True if it did within the client limit."""
    deadline = time.monotonic() + CLIENT_LIMIT
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except OSError:  # reset by an abort: closed too
        return True
    finally:
        sock.close()
    return False


def random_bytes(server: Served) -> bool:
    sock = _connect(server)
    for _ in range(20):
        sock.sendall(os.urandom(2048))
    return _until_closed(sock)


def slowloris(server: Served) -> bool:
    sock = _connect(server)
    deadline = time.monotonic() + CLIENT_LIMIT
    try:
        for byte in b"EHLO " + b"s" * 400:
            if time.monotonic() > deadline:
                return False
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
    except OSError:
        return True  # closed by the server while trickling
    return _until_closed(sock)


def stalled_handshake(server: Served) -> bool:
    sock = _connect(server)
    sock.sendall(b"EHLO stall.example\r\n")
    sock.recv(512)
    sock.sendall(b"STARTTLS\r\n")
    sock.recv(512)  # the 220; then nothing
    return _until_closed(sock)


def unread_pipeline(server: Served) -> bool:
    flood_unread(server.host, server.port, 5_000_000, stall=1.0, limit=CLIENT_LIMIT)
    return True


def smuggling(server: Served) -> bool:
    sock = _connect(server)
    sock.sendall(
        b"EHLO smuggle.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        b"Subject: smuggle\r\n\r\nbody\n.\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.com>\r\n"
        b"DATA\r\nevil\r\n\r.\r\nQUIT\r\n"
    )
    return _until_closed(sock)


def oversized(server: Served) -> bool:
    sock = _connect(server)
    sock.sendall(b"EHLO big.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    try:
        for _ in range(30):  # 3 MB against a 1 MB limit
            sock.sendall((b"x" * 998 + b"\r\n") * 100)
        sock.sendall(b".\r\nQUIT\r\n")
    except OSError:
        return True
    return _until_closed(sock)


def normal(server: Served, n: int) -> str | None:
    """One message; its token if the server acknowledged it with 250, else None."""
    token = f"soak-{n}-{os.getpid()}"
    try:
        with smtplib.SMTP(server.host, server.port, local_hostname="ok.example", timeout=CLIENT_LIMIT) as client:
            if n % 2:
                client.starttls(context=client_context())
            client.sendmail("a@example.net", ["b@example.com"], f"Subject: {token}\r\n\r\nhello\r\n")
            return token
    except (smtplib.SMTPException, OSError):
        return None


def test_hostile_clients_do_not_stop_normal_service(tmp_path: Path) -> None:
    host = fresh_loopback()
    port = free_port(host)
    config = tmp_path / "appliance.yaml"
    config.write_text(APPLIANCE)
    started = time.monotonic()
    with serve(
        tmp_path / "run", "--config", str(config), "--bind", f"Inboundmail={host}:{port}", host=host, port=port
    ) as server:
        pid = server.process.pid
        before = vm_rss_mb(pid)
        hostile = [random_bytes, slowloris, stalled_handshake, unread_pipeline, smuggling, oversized] * 4
        with ThreadPoolExecutor(max_workers=40) as pool:
            hostile_results = [pool.submit(attack, server) for attack in hostile]
            tokens = [pool.submit(normal, server, n) for n in range(40)]
            closed = [item.result(timeout=60) for item in hostile_results]
            acknowledged = [t for t in (item.result(timeout=60) for item in tokens) if t is not None]
        peak = vm_rss_mb(pid)

        assert all(closed), "a hostile client was not closed by the server within its limit"
        assert len(acknowledged) >= 30, f"only {len(acknowledged)} of 40 normal senders were served"
        assert normal(server, 1000) is not None  # still serving afterwards
        assert peak - before < 60, f"RSS grew from {before:.1f} MB to {peak:.1f} MB"

        spooled = b"".join(path.read_bytes() for path in server.maildir_new())
        missing = [t for t in acknowledged if f"Subject: {t}".encode() not in spooled]
        assert missing == [], f"acknowledged but not in the spool: {missing}"
    # read after the clean stop: the last sessions' close lines are written by then
    lines = server.log_lines()
    out, err = server.process.communicate()
    assert "Traceback" not in out + err
    opened = sum(" New SMTP ICID " in line for line in lines)
    ended = sum(" close" in line and "ICID" in line for line in lines)
    assert opened == ended, f"{opened} connections opened, {ended} closed in the mail log"
    assert time.monotonic() - started < 90
