"""STARTTLS stripping (docs/rules.md §5): rewriting the EHLO capability, answering STARTTLS, on the memory carrier."""

from __future__ import annotations

from typing import Any

import pytest
from test_transport import (
    CLIENT,
    SERVER,
    MiniServer,
    ScriptClient,
    client_factory,
    session,
    tls_pair_fixture,  # noqa: F401  (the shared certificate fixture)
)
from twisted.internet.protocol import ServerFactory

from lab.errors import BadInput
from lab.net.capture import Direction
from lab.net.memory import MemoryNetwork
from lab.net.middlebox import MiddleboxChain, StartTLSStripper
from lab.tls.tlsctx import ClientTLS, ServerTLS

Pair = tuple[ServerTLS, ClientTLS]
EHLO_REPLY = b"250-mini\r\n250-STARTTLS\r\n250 SIZE 1000\r\n"


def feed_server(box: StartTLSStripper, chunks: list[bytes]) -> bytes:
    state = box.open()
    out = b"".join(state.from_server(c).forward for c in chunks)
    return out + state.end(Direction.S2C).forward


@pytest.mark.parametrize("cut", range(1, len(EHLO_REPLY)))
def test_rewrite_survives_every_chunk_boundary(cut: int) -> None:
    box = StartTLSStripper()
    out = feed_server(box, [EHLO_REPLY[:cut], EHLO_REPLY[cut:]])
    assert out == b"250-mini\r\n250-XXXXXXXA\r\n250 SIZE 1000\r\n"
    assert len(out) == len(EHLO_REPLY)
    assert box.notes == ["middlebox rewrote STARTTLS: 250-STARTTLS -> 250-XXXXXXXA"]


def test_last_line_keeps_its_space_so_the_reply_still_ends() -> None:
    box = StartTLSStripper()
    assert feed_server(box, [b"250-mini\r\n250 starttls\r\n"]) == b"250-mini\r\n250 XXXXXXXA\r\n"


def test_other_lines_and_partial_lines_pass_unchanged() -> None:
    box = StartTLSStripper()
    state = box.open()
    assert state.from_server(b"220 mx ESMTP STARTTLS ready\r\n250-8BITMIME\r\n250-STA").forward == (
        b"220 mx ESMTP STARTTLS ready\r\n250-8BITMIME\r\n"
    )
    assert state.end(Direction.S2C).forward == b"250-STA"  # held back until the line was complete, then released
    assert box.notes == []


def test_tls_records_pass_at_once_without_waiting_for_a_line_end() -> None:
    box = StartTLSStripper(answer_starttls=454)
    state = box.open()
    record = b"\x16\x03\x03\x00\x05hello"  # no newline anywhere: a line buffer would stall here
    assert state.from_server(b"220 go ahead\r\n" + record).forward == b"220 go ahead\r\n" + record
    assert state.from_server(b"250-STARTTLS\r\n").forward == b"250-STARTTLS\r\n"  # binary now: hands off
    assert state.from_client(record).forward == record


def test_answer_starttls_replies_itself_and_forwards_nothing() -> None:
    box = StartTLSStripper(rewrite=False, answer_starttls=454)
    state = box.open()
    relay = state.from_client(b"EHLO a\r\nstarttls\r\nNOOP\r\n")
    assert relay.forward == b"EHLO a\r\nNOOP\r\n"
    assert relay.reply == b"454 4.7.0 TLS not available\r\n"
    assert box.notes == ["middlebox answered STARTTLS itself: 454 4.7.0 TLS not available (not forwarded)"]
    assert state.from_server(EHLO_REPLY).forward == EHLO_REPLY  # rewrite off


def test_message_bodies_are_left_alone() -> None:
    box = StartTLSStripper(answer_starttls=454)
    state = box.open()
    state.from_client(b"DATA\r\n")
    state.from_server(b"354 go on\r\n")
    body = state.from_client(b"Subject: x\r\n\r\nSTARTTLS\r\n.\r\n")
    assert body.forward == b"Subject: x\r\n\r\nSTARTTLS\r\n.\r\n" and body.reply == b""
    assert state.from_client(b"STARTTLS\r\n").reply.startswith(b"454 ")  # a command again after the "."


def test_bad_answer_code_is_bad_input() -> None:
    with pytest.raises(BadInput, match="answer_starttls"):
        StartTLSStripper(answer_starttls=220)


def test_chain_sends_an_answer_back_through_the_boxes_nearer_the_client() -> None:
    near, far = StartTLSStripper(rewrite=True), StartTLSStripper(rewrite=False, answer_starttls=454)
    chain = MiddleboxChain([near.open(), far.open()])
    to_server, to_client = chain.from_client(b"STARTTLS\r\n")
    assert (to_server, to_client) == (b"", b"454 4.7.0 TLS not available\r\n")
    to_server, to_client = chain.from_server(EHLO_REPLY)
    assert to_client == b"250-mini\r\n250-XXXXXXXA\r\n250 SIZE 1000\r\n" and to_server == b""
    assert len(near.notes) == 1 and len(far.notes) == 1


class SplitServer(MiniServer):
    """Writes its EHLO reply in two chunks, one latency apart, cut inside the word STARTTLS."""

    def lineReceived(self, line: bytes) -> None:
        if line.upper().startswith(b"EHLO") and not self.in_tls:
            self.lines.append((False, line))
            self.transport.write(EHLO_REPLY[:16])
            self.factory.clock.callLater(0.01, self.transport.write, EHLO_REPLY[16:])
            return
        super().lineReceived(line)


def test_stripped_on_the_memory_carrier_client_never_sees_starttls(tls_pair: Pair) -> None:
    net = MemoryNetwork()
    box = StartTLSStripper()
    factory = ServerFactory()
    factory.clock = net.clock  # type: ignore[attr-defined]
    servers: list[SplitServer] = []

    def build(addr: Any) -> SplitServer:
        server = SplitServer(tls_pair[0])
        server.factory = factory
        servers.append(server)
        return server

    factory.buildProtocol = build  # type: ignore[method-assign]
    net.listen(SERVER, 25, factory)
    client: ScriptClient = net.run_until(
        net.connect(CLIENT, SERVER, 25, client_factory([b"EHLO a", b"QUIT"], tls_pair[1]), middleboxes=[box])
    )
    net.run()
    assert (False, b"250-XXXXXXXA") in client.replies
    assert not any(b"STARTTLS" in line for _, line in client.replies)
    (flow,) = net.capture.flows
    s2c = flow.payload(Direction.S2C)  # the capture is the client's side of the middlebox
    assert b"250-XXXXXXXA\r\n" in s2c and b"STARTTLS" not in s2c
    assert box.notes == ["middlebox rewrote STARTTLS: 250-STARTTLS -> 250-XXXXXXXA"]
    assert servers[0].lines[0] == (False, b"EHLO a")


def test_answered_starttls_never_reaches_the_server_and_the_client_stays_plain(tls_pair: Pair) -> None:
    box = StartTLSStripper(rewrite=False, answer_starttls=454)
    net, server, client = session(
        tls_pair, [b"EHLO a", b"STARTTLS", b"MAIL FROM:<a@example.net>", b"QUIT"], middleboxes=[box]
    )
    assert (False, b"454 4.7.0 TLS not available") in client.replies
    assert [line for _, line in server.lines] == [b"EHLO a", b"MAIL FROM:<a@example.net>", b"QUIT"]
    assert server.handshakes == client.handshakes == 0
    (flow,) = net.capture.flows
    assert b"STARTTLS\r\n" in flow.payload(Direction.C2S)  # the client did send it ...
    assert b"454 4.7.0 TLS not available\r\n" in flow.payload(Direction.S2C)  # ... and saw this answer
    assert b"MAIL FROM:<a@example.net>" in flow.payload(Direction.C2S)  # so the envelope went out in plaintext


def test_a_middlebox_object_serves_several_connections_with_fresh_state(tls_pair: Pair) -> None:
    box = StartTLSStripper()
    for _ in range(2):
        _, _, client = session(tls_pair, [b"EHLO a", b"QUIT"], middleboxes=[box])
        assert (False, b"250-XXXXXXXA") in client.replies
    assert len(box.notes) == 2


def test_tls_through_a_passive_middlebox_still_works(tls_pair: Pair) -> None:
    box = StartTLSStripper(rewrite=False)
    _, server, client = session(tls_pair, [b"EHLO a", b"STARTTLS", b"EHLO a", b"QUIT"], middleboxes=[box])
    assert server.handshakes == client.handshakes == 1
    assert client.handle is not None and client.handle.get_protocol_version_name() == "TLSv1.3"
    assert (True, b"221 bye") in client.replies and box.notes == []


def test_lines_are_read_as_the_smtp_core_reads_them() -> None:
    """A line is STARTTLS (or the 250 listing it) for the middlebox exactly when the lab's SMTP core says so."""
    box = StartTLSStripper(rewrite=True, answer_starttls=454)
    state = box.open()
    relay = state.from_client(b"STARTTLSX\r\nSTARTTLS now\r\n")
    assert relay.forward == b"STARTTLSX\r\n" and relay.reply.startswith(b"454 ")  # a verb, and a verb with argument
    lines = [b"250-starttls \t\r\n", b"250-STARTTLS2\r\n", b"251 STARTTLS\r\n", b"250STARTTLS\r\n"]
    out = state.from_server(b"".join(lines)).forward
    assert out == b"250-XXXXXXXA \t\r\n" + b"".join(lines[1:])
