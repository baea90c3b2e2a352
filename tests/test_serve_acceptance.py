"""Issue 2 acceptance: ``smtplab serve`` checked with real clients nobody here wrote.

Python's smtplib, swaks and ``openssl s_client -starttls smtp`` against a served listener on its own
127.x address; every rule of docs/rules.md §3 on the wire; Maildir files and mail log lines on disk.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
from serving import Raw, Served, client_context, free_port, fresh_loopback, need_tool, serve

MESSAGE = "From: a@sender.example\r\nTo: bob@example.com\r\nSubject: test\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Served]:
    """One listener per TLS setting, shared by the tests of this module."""
    with (
        serve(tmp_path_factory.mktemp("no"), "--tls", "no") as no,
        serve(tmp_path_factory.mktemp("preferred"), "--tls", "preferred") as preferred,
        serve(tmp_path_factory.mktemp("required"), "--tls", "required") as required,
    ):
        yield {"no": no, "preferred": preferred, "required": required}


def smtp(server: Served) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, local_hostname="client.example", timeout=10)


def delivered_since(server: Served, before: int) -> list[bytes]:
    return [p.read_bytes() for p in server.maildir_new()[before:]]


# --- the three settings with smtplib ------------------------------------------------------------------


def test_no_never_offers_starttls_and_delivers_plaintext(served: dict[str, Served]) -> None:
    server = served["no"]
    before = len(server.maildir_new())
    with smtp(server) as client:
        code, _ = client.ehlo()
        assert code == 250 and not client.has_extn("starttls")
        assert client.docmd("STARTTLS")[0] == 502
        assert client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
    [message] = delivered_since(server, before)
    assert b"with ESMTP (no TLS)" in message.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert message.endswith(b"hello\r\n")


def test_preferred_delivers_in_plaintext_and_after_starttls(served: dict[str, Served]) -> None:
    server = served["preferred"]
    before = len(server.maildir_new())
    with smtp(server) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE)
    with smtp(server) as client:
        client.starttls(context=client_context())
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE)
    messages = delivered_since(server, before)
    assert len(messages) == 2
    [plain] = [m for m in messages if b"(no TLS)" in m]
    [tls] = [m for m in messages if m is not plain]
    assert b"version=TLSv1.3" in tls and b"cipher=TLS_" in tls
    lines = server.wait_log("TLS success")
    assert any(line.split("Info: ", 1)[1].startswith("New SMTP ICID") for line in lines)


def test_required_refuses_plaintext_commands_with_530(served: dict[str, Served]) -> None:
    server = served["required"]
    before = len(server.maildir_new())
    raw = Raw(server.host, server.port)
    assert raw.cmd(b"HELO client.example\r\n").startswith(b"530 5.7.0 Must issue a STARTTLS command first")
    assert raw.cmd(b"EHLO client.example\r\n").startswith(b"250-")
    for line in [b"MAIL FROM:<a@sender.example>", b"RCPT TO:<bob@example.com>", b"DATA", b"RSET", b"VRFY bob"]:
        assert raw.cmd(line + b"\r\n").startswith(b"530 5.7.0 "), line
    assert raw.cmd(b"NOOP\r\n").startswith(b"250 ")
    raw.close()
    with smtp(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE)
        assert refused.value.smtp_code == 530
    with smtp(server) as client:
        client.starttls(context=client_context())
        client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE)
    [message] = delivered_since(server, before)
    assert b"ESMTPS" in message and b"version=TLSv1.3" in message


# --- docs/rules.md §3 on the wire, under preferred and required -------------------------------------------------


@pytest.mark.parametrize("mode", ["preferred", "required"])
def test_starttls_rules_on_the_wire(served: dict[str, Served], mode: str) -> None:
    server = served[mode]
    before = len(server.maildir_new())
    raw = Raw(server.host, server.port)
    raw.cmd(b"EHLO client.example\r\n")
    assert raw.cmd(b"STARTTLS now\r\n").startswith(b"501 5.5.4 ")  # rule 1
    # rule 3 / 7: the MAIL behind STARTTLS in the same write is discarded, never executed inside TLS
    assert raw.cmd(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n").startswith(b"220 ")
    raw.starttls()
    # rule 4: the session forgot the EHLO; if the injected MAIL had run, this would be 503 nested MAIL
    assert raw.cmd(b"MAIL FROM:<a@sender.example>\r\n").startswith(b"503 5.5.1 Send EHLO first")
    ehlo = raw.cmd(b"EHLO client.example\r\n")
    assert ehlo.startswith(b"250-") and b"STARTTLS" not in ehlo  # rule 2
    assert raw.cmd(b"STARTTLS\r\n").startswith(b"503 5.5.1 ")  # rule 2
    assert raw.cmd(b"MAIL FROM:<a@sender.example>\r\n").startswith(b"250 ")
    assert raw.cmd(b"RCPT TO:<bob@example.com>\r\n").startswith(b"250 ")
    assert raw.cmd(b"DATA\r\n").startswith(b"354 ")
    assert raw.cmd(MESSAGE.encode() + b".\r\n").startswith(b"250 ")
    raw.cmd(b"QUIT\r\n")
    raw.close()
    [message] = delivered_since(server, before)
    assert b"injected@evil.example" not in message
    lines = server.wait_log("STARTTLS command injection")
    assert any("discarded 35 bytes" in line for line in lines)


@pytest.mark.parametrize("mode", ["preferred", "required"])
def test_line_limits_nul_and_bare_lf_on_the_wire(served: dict[str, Served], mode: str) -> None:
    raw = Raw(served[mode].host, served[mode].port)
    assert raw.cmd(b"NOOP " + b"x" * 600 + b"\r\n").startswith(b"500 5.5.2")  # rule 6
    assert raw.cmd(b"NOOP\x00\r\n").startswith(b"500 5.5.2")
    assert raw.cmd(b"NOOP\n").startswith(b"500 5.5.2")
    assert raw.cmd(b"NOOP\r\n").startswith(b"250 ")  # the listener is still serving
    raw.close()


def test_failed_handshake_is_logged_and_listener_survives(served: dict[str, Served]) -> None:
    server = served["required"]
    raw = Raw(server.host, server.port)
    raw.cmd(b"EHLO client.example\r\n")
    assert raw.cmd(b"STARTTLS\r\n").startswith(b"220 ")
    raw.sock.sendall(b"this is not a ClientHello\r\n" * 4)  # garbage instead of a handshake
    raw.sock.settimeout(5)
    while raw.sock.recv(4096):  # a TLS alert at most, then the listener closes (a timeout fails the test)
        pass
    raw.close()
    server.wait_log("TLS failed")
    with smtp(server) as client:
        assert client.noop()[0] == 250


def test_disconnect_mid_data_leaves_nothing_in_new(served: dict[str, Served]) -> None:
    server = served["no"]
    before = len(server.maildir_new())
    raw = Raw(server.host, server.port)
    for line in [b"EHLO x", b"MAIL FROM:<a@sender.example>", b"RCPT TO:<bob@example.com>", b"DATA"]:
        raw.cmd(line + b"\r\n")
    raw.sock.sendall(b"Subject: half\r\n\r\nonly half of a messa")
    raw.close()
    server.wait_log("connection lost before end of data")
    assert len(server.maildir_new()) == before
    assert not list((server.spool / "Inboundmail" / "tmp").iterdir())


# --- swaks and openssl s_client -------------------------------------------------------------------------


def _swaks(server: Served, *extra: str) -> subprocess.CompletedProcess[str]:
    swaks = need_tool("swaks")
    command = [
        swaks,
        "--server",
        server.host,
        "--port",
        str(server.port),
        "--from",
        "a@sender.example",
        "--to",
        "bob@example.com",
        "--helo",
        "client.example",
        "--timeout",
        "10",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_swaks_under_each_setting(served: dict[str, Served]) -> None:
    assert _swaks(served["no"]).returncode == 0
    no_tls = _swaks(served["no"], "--tls")
    assert no_tls.returncode != 0 and "STARTTLS" in no_tls.stdout + no_tls.stderr
    assert _swaks(served["preferred"]).returncode == 0
    assert _swaks(served["preferred"], "--tls").returncode == 0
    plaintext = _swaks(served["required"])
    assert plaintext.returncode != 0 and "530 5.7.0" in plaintext.stdout
    tls = _swaks(served["required"], "--tls")
    assert tls.returncode == 0, tls.stdout
    assert "~> MAIL FROM:<a@sender.example>" in tls.stdout  # swaks' own marker: sent inside TLS


def test_openssl_s_client_starttls(served: dict[str, Served]) -> None:
    openssl = need_tool("openssl")
    server = served["required"]
    before = len(server.maildir_new())
    script = "EHLO client.example\nMAIL FROM:<a@sender.example>\nRCPT TO:<bob@example.com>\nDATA\nhi\n.\nQUIT\n"
    result = subprocess.run(
        [
            openssl,
            "s_client",
            "-starttls",
            "smtp",
            "-connect",
            f"{server.host}:{server.port}",
            "-crlf",
            "-quiet",
            "-ign_eof",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "250 2.0.0 Ok: queued as" in result.stdout, result.stdout + result.stderr
    [message] = delivered_since(server, before)
    assert b"version=TLSv1" in message


# --- full mode: a public and a private listener, the HAT sending peers to different policies ------------


def test_full_mode_hat_sends_peers_to_policies(tmp_path: Path) -> None:
    public, private = fresh_loopback(), fresh_loopback()
    blocked_peer, trusted_peer, relay_peer = fresh_loopback(), fresh_loopback(), fresh_loopback()
    config = tmp_path / "appliance.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        hostname: esa.lab.example
        interfaces:
          - {{name: PublicNet, address: 192.168.2.1, prefix: 24}}
          - {{name: PrivateNet, address: 192.168.1.1, prefix: 24}}
        listeners:
          - name: Inboundmail
            type: public
            interface: PublicNet
            port: 25
            rat: [example.com]
            hat:
              sender_groups:
                - {{name: WHITELIST, members: ["{trusted_peer}"], policy: TRUSTED}}
                - {{name: BLACKLIST, members: ["{blocked_peer}"], policy: BLOCKED}}
              policies:
                ACCEPTED: {{behaviour: accept, tls: required}}
          - name: Outboundmail
            type: private
            interface: PrivateNet
            port: 25
            hat:
              sender_groups:
                - {{name: RELAYLIST, members: ["{relay_peer}"], policy: RELAYED}}
        """)
    )
    pub_port, priv_port = free_port(public), free_port(private)
    with serve(
        tmp_path / "run",
        "--config",
        str(config),
        "--bind",
        f"Inboundmail={public}:{pub_port}",
        "--bind",
        f"Outboundmail={private}:{priv_port}",
        host=public,
        port=pub_port,
    ) as server:

        def connect(host: str, port: int, source: str) -> smtplib.SMTP:
            return smtplib.SMTP(host, port, local_hostname="c.example", timeout=10, source_address=(source, 0))

        with pytest.raises(smtplib.SMTPConnectError) as refused:  # BLACKLIST -> BLOCKED: 554 banner
            connect(public, pub_port, blocked_peer)
        assert refused.value.smtp_code == 554
        with connect(public, pub_port, trusted_peer) as client:  # WHITELIST -> TRUSTED: TLS No
            client.ehlo()
            assert not client.has_extn("starttls")
            client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE)
        with connect(public, pub_port, fresh_loopback()) as client:  # ALL -> ACCEPTED: TLS Required
            client.ehlo()
            assert client.has_extn("starttls")
            assert client.docmd("MAIL FROM:<a@sender.example>")[0] == 530
        with connect(private, priv_port, relay_peer) as client:  # RELAYLIST -> RELAYED: any domain
            client.sendmail("a@lab.example", ["someone@elsewhere.example"], MESSAGE)
        with pytest.raises(smtplib.SMTPConnectError):  # private ALL -> BLOCKED
            connect(private, priv_port, fresh_loopback())
        assert len(server.maildir_new("Inboundmail")) == 1
        assert len(server.maildir_new("Outboundmail")) == 1
        lines = server.wait_log("SG RELAYLIST")
        assert any("SG WHITELIST match" in line for line in lines)
        assert any("SG BLACKLIST match" in line for line in lines)


def test_max_concurrency_one_too_many_gets_421(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "no", "--max-concurrency", "20") as server:
        held = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(20)]
        try:
            for sock in held:
                assert sock.recv(100).startswith(b"220 ")
            extra = socket.create_connection((server.host, server.port), timeout=10)
            assert extra.recv(100).startswith(b"421 4.3.2")
            assert extra.recv(100) == b""  # and closed
            extra.close()
        finally:
            for sock in held:
                sock.close()


def test_bad_flags_and_config_exit_3(tmp_path: Path) -> None:
    import sys

    def smtplab(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=30)

    for args, needle in [
        (["serve", "--listen", "192.168.2.1:25"], "not a loopback address"),
        (["serve", "--listen", "127.0.0.1:notaport"], "is not HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:2525", "--tls", "sometimes"], "--tls: 'sometimes' is not one of"),
        (["serve", "--listen", "127.0.0.1:2525", "--cert", str(tmp_path / "missing.pem"), "--key", "x"], "missing.pem"),
    ]:
        result = smtplab(*args)
        assert result.returncode == 3, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "hostname: esa\ninterfaces: [{name: P, address: 192.168.2.1}]\nlisteners:\n  - name: In\n"
        "    type: public\n    interface: P\n    hat:\n      policies:\n        ACCEPTED: {tls: sometimes}\n"
    )
    result = smtplab("serve", "--config", str(bad))
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "bad.yaml:9:" in result.stderr and "sometimes" in result.stderr
