"""``smtplab serve``'s TCP transport on the real reactor: what leaves in each ``send``, plaintext and under TLS.

The listener is served through ``lab.smtp.eager_tcp.listen`` with a transport that records every ``send`` it
makes (before making it); a blocking client (``serving.Raw``) in a thread speaks SMTP to it.
"""

from __future__ import annotations

import itertools
import socket
import threading
from pathlib import Path
from typing import Any

import pytest_twisted
from labruntime import lab_runtime
from serving import Raw, free_port, fresh_loopback
from twisted.internet import protocol, reactor, threads
from twisted.python import log

from lab.appliance.config import quick_appliance
from lab.policy.modes import TLSMode
from lab.smtp.eager_tcp import EagerServer, ServingPort, ServingReactor

GROUP = b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
MESSAGE = b"Subject: eager\r\n\r\nhello\r\n.\r\n"


class Recorded(EagerServer):
    """An ``EagerServer`` that notes the bytes of each ``send`` before it is made."""

    sends: list[bytes] = []

    def writeSomeData(self, data: Any) -> Any:
        if len(data):
            Recorded.sends.append(bytes(data))
        return super().writeSomeData(data)


class RecordedPort(ServingPort):
    transport = Recorded


def _listen(tmp_path: Path) -> tuple[RecordedPort, str, int]:
    host = fresh_loopback()
    port = free_port(host)
    appliance = quick_appliance(host, port, TLSMode.PREFERRED)
    runtime = lab_runtime(appliance, reactor, tmp_path)
    Recorded.sends = []
    listening = RecordedPort(port, runtime.factory(appliance.listeners[0]), 50, host, reactor)
    listening.startListening()
    return listening, host, port


def _records(send: bytes) -> list[int]:
    """The content types of the whole TLS records in one send (an AssertionError if a record is cut)."""
    types, at = [], 0
    while at < len(send):
        length = int.from_bytes(send[at + 3 : at + 5], "big")
        assert at + 5 + length <= len(send), "a TLS record split across sends"
        types.append(send[at])
        at += 5 + length
    return types


def _plaintext(host: str, port: int) -> list[int]:
    client = Raw(host, port)
    client.cmd(b"EHLO client.example\r\n")
    marks = [len(Recorded.sends)]
    client.sock.sendall(GROUP)
    replies = b"".join(client.reply() for _ in range(3))
    assert replies.startswith(b"250 ") and replies.split(b"\r\n")[2].startswith(b"354 ")
    marks.append(len(Recorded.sends))
    client.cmd(MESSAGE)
    client.cmd(b"QUIT\r\n")
    client.close()
    return marks


def _tls(host: str, port: int) -> list[int]:
    client = Raw(host, port)
    client.cmd(b"EHLO client.example\r\n")
    assert client.cmd(b"STARTTLS\r\n").startswith(b"220 ")
    client.starttls()
    assert client.cmd(b"EHLO client.example\r\n").startswith(b"250-")  # the tickets come before this reply
    marks = [len(Recorded.sends)]
    client.sock.sendall(GROUP)
    for _ in range(3):
        client.reply()
    marks.append(len(Recorded.sends))
    assert client.cmd(MESSAGE).startswith(b"250 ")
    marks.append(len(Recorded.sends))
    assert client.cmd(b"QUIT\r\n").startswith(b"221 ")
    client.sock.recv(1)  # the close_notify: b"" once the TLS layer has it
    marks.append(len(Recorded.sends))
    client.close()
    return marks


@pytest_twisted.inlineCallbacks
def test_a_pipelined_group_is_answered_in_one_send(tmp_path: Path) -> None:
    listening, host, port = _listen(tmp_path)
    try:
        before, after = yield threads.deferToThread(_plaintext, host, port)
        assert after - before == 1
        assert Recorded.sends[before].count(b"\r\n") == 3 and Recorded.sends[before].startswith(b"250 ")
    finally:
        yield listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_under_tls_a_group_is_one_record_and_the_221_leaves_with_the_close_notify(tmp_path: Path) -> None:
    listening, host, port = _listen(tmp_path)
    try:
        marks = yield threads.deferToThread(_tls, host, port)
        sends = Recorded.sends
        spans = [sends[start:end] for start, end in itertools.pairwise(marks)]
        application = 23  # TLS 1.3 wraps every record after the handshake as application data
        assert [[_records(send) for send in span] for span in spans] == [
            [[application]],  # 250, 250, 354: one write, one record, one send
            [[application]],  # the 250, written when the spool answers (outside a read): sent at once
            [[application, application]],  # the 221 and the close_notify after it, in one send
        ]
    finally:
        yield listening.stopListening()


def test_the_listening_socket_takes_reuse_port_only_when_asked() -> None:
    host = fresh_loopback()
    for reuse in (False, True):
        port = ServingPort(free_port(host), None, 5, host, reactor, reuse_port=reuse)
        skt = port.createInternetSocket()
        try:
            assert bool(skt.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) is reuse
        finally:
            skt.close()


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("a handler that raises")
        self.transport.write(data)


def test_the_serving_reactor_carries_tcp_and_still_catches_a_handler_that_raises() -> None:
    """``ServingReactor`` skips the log context per event; an exception still closes only its connection, logged."""
    served = ServingReactor()
    host = fresh_loopback()
    port = served.listenTCP(0, protocol.Factory.forProtocol(Echo), interface=host).getHost().port
    logged: list[dict[str, Any]] = []
    log.addObserver(logged.append)
    running = threading.Thread(target=served.run, kwargs={"installSignalHandlers": False})
    running.start()
    try:
        with (
            socket.create_connection((host, port), timeout=10) as first,
            socket.create_connection((host, port), timeout=10) as second,
        ):
            first.sendall(b"ping")
            assert first.recv(4) == b"ping"
            second.sendall(b"boom")
            assert second.recv(4) == b""  # this connection is dropped ...
            first.sendall(b"pong")
            assert first.recv(4) == b"pong"  # ... the other goes on
        assert any(event.get("isError") and "a handler that raises" in str(event.get("failure")) for event in logged)
    finally:
        served.callFromThread(served.stop)
        running.join(10)
        log.removeObserver(logged.append)
    assert not running.is_alive()
