"""The scripted client engine: reply parsing, transcript, TLS rules, bounded waits, step parsing.

Most tests run over the in-memory carrier (real TLS, virtual time); one runs over real TCP on 127.0.0.x.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from lab.errors import BadInput
from lab.net.capture import Direction
from lab.net.memory import MemoryNetwork
from lab.smtp.client import MAX_REPLY_LINE, ClientRecord, ScriptedClient, message_bytes
from lab.smtp.remote_mta import RemoteMTAFactory
from lab.smtp.steps import Mail, Step, TLSOptions, code_matches, decode_escapes, steps_from_data
from lab.smtp.transcript import escape, split_lines
from lab.tls.tlsctx import lab_client_tls
from lab.yamlsource import parse_yaml

SERVER, CLIENT = "192.168.2.1", "198.51.100.7"


def run(
    steps: list[Step] | str, factory: protocol.ServerFactory | None, tmp_path: Path, **options: Any
) -> tuple[ClientRecord, MemoryNetwork]:
    """Run ``steps`` (or YAML text) against ``factory`` on a fresh memory network."""
    net = MemoryNetwork()
    if factory is not None:
        if isinstance(factory, RemoteMTAFactory):
            factory.clock = net.clock
        net.listen(SERVER, 25, factory)
    if isinstance(steps, str):
        steps = steps_from_data(parse_yaml(steps, "test.yaml"), file="test.yaml")
    client = ScriptedClient(
        steps,
        clock=net.clock,
        connect=lambda f: net.connect(CLIENT, SERVER, 25, f),
        tls_factory=lab_client_tls(state_dir=tmp_path),
        target=f"{SERVER}:25",
        **options,
    )
    record = net.run_until(client.run(), timeout=3600)
    net.run()  # let the server side see the end of the connection too
    return record, net


def sent(record: ClientRecord) -> list[str]:
    return [line[4:] for line in record.transcript if line.startswith((" -> ", " ~> "))]


def mta(mode: str = "ok", **kw: Any) -> RemoteMTAFactory:
    return RemoteMTAFactory("mx.remote.test", starttls=mode, **kw)


class Banner(protocol.Protocol):
    """A server that greets with ``data`` and then never says anything again."""

    data = b"220 quiet.example ESMTP\r\n"

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)


def banner_server(data: bytes) -> protocol.ServerFactory:
    return protocol.ServerFactory.forProtocol(type("B", (Banner,), {"data": data}))


# -- the transcript


def test_transcript_uses_swaks_markers_and_names_the_cipher(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}, {starttls: {}}, {ehlo: c.example}, {quit: {}}]", mta(), tmp_path)
    lines = record.transcript
    assert lines[:3] == [
        "=== Trying 192.168.2.1:25...",
        "=== Connected to 192.168.2.1.",
        "<-  220 mx.remote.test ESMTP smtplab remote MTA",
    ]
    assert " -> EHLO c.example" in lines and " -> STARTTLS" in lines
    assert "=== TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384:256" in lines
    assert " ~> EHLO c.example" in lines and "<~  250 8BITMIME" in lines and " ~> QUIT" in lines
    assert lines.index("=== TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384:256") < lines.index(" ~> QUIT")


def test_same_run_gives_the_same_transcript_and_times(tmp_path: Path) -> None:
    script = "[{tls_policy: prefer}, {mail: {from: a@example.net, to: b@example.com}}, quit]"
    first, _ = run(script, mta(), tmp_path)
    second, _ = run(script, mta(), tmp_path)
    assert first.transcript == second.transcript
    assert first.times == second.times
    assert first.observed == second.observed


def test_escape_shows_nul_bare_lf_and_bare_cr_but_not_crlf() -> None:
    assert split_lines(b"MAIL FROM:<a>\r\nX\x00Y\nZ\rW\r\n") == ["MAIL FROM:<a>", "X\\x00Y\\n", "Z\\rW"]
    assert escape(b"\xff\t") == "\\xff\\t"
    assert escape(b"A" * 400).endswith(" [... 100 more bytes]")


# -- replies


def test_multiline_ehlo_gives_capabilities_and_they_are_forgotten_after_tls(tmp_path: Path) -> None:
    script = """
    - ehlo: c.example
    - if: {capability: STARTTLS, then: [{send: NOOP, as: seen-before}]}
    - starttls: {}
    - if: {capability: PIPELINING, then: [{send: NOOP, as: remembered}], else: [{send: NOOP, as: forgotten}]}
    - ehlo: c.example
    - if: {capability: STARTTLS, then: [{send: NOOP, as: starttls-inside-tls}]}
    - quit
    """
    record, _ = run(script, mta(), tmp_path)
    replies = record.observed["replies"]
    assert replies["seen-before"] == 250 and replies["forgotten"] == 250
    assert "remembered" not in replies and "starttls-inside-tls" not in replies
    assert record.observed["starttls_advertised"] is True


def test_reply_line_over_the_limit_ends_the_connection(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}]", banner_server(b"220-" + b"x" * (MAX_REPLY_LINE + 10) + b"\r\n"), tmp_path)
    assert f"<** reply line longer than {MAX_REPLY_LINE} bytes; closing the connection" in record.transcript
    assert record.observed["aborted"] is True and record.observed["connected"] is False
    assert record.observed["closed_by"] == "client"


def test_malformed_reply_is_refused(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}]", banner_server(b"hello there\r\n"), tmp_path)
    assert "<** malformed reply line (no 3-digit code); closing the connection" in record.transcript
    assert record.observed["connected"] is False


def test_replies_are_labelled_by_verb_with_tls_suffix_and_repeats(tmp_path: Path) -> None:
    script = "[{ehlo: c.example}, {send: NOOP}, {send: NOOP}, {starttls: {}}, {send: NOOP}, {send: RSET, as: mine}]"
    record, _ = run(script, mta(), tmp_path)
    assert record.observed["replies"] == {
        "EHLO": 250,
        "NOOP": 250,
        "NOOP#2": 250,
        "STARTTLS": 220,
        "NOOP/tls": 250,
        "mine": 250,
    }


# -- STARTTLS rules of a correct client


def test_response_injection_is_discarded_and_the_real_ehlo_reply_is_used(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}, {starttls: {}}, {ehlo: c.example}]", mta("response-injection"), tmp_path)
    assert record.observed["response_injection_discarded"] is True
    assert "=== discarded 20 bytes of server data received after 220 (response injection)" in record.transcript
    assert record.observed["tls"] is True
    # the injected "250 injected" did not become the reply to the EHLO inside TLS: the capability list did
    tls_lines = [line for line in record.transcript if line.startswith("<~  ")]
    assert tls_lines[0] == "<~  250-mx.remote.test"


def test_clean_server_gives_no_discard(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}, {starttls: {}}]", mta(), tmp_path)
    assert record.observed["response_injection_discarded"] is False
    assert not any("discarded" in line for line in record.transcript)


def test_injection_executed_is_detected_only_when_the_server_runs_the_injected_bytes(tmp_path: Path) -> None:
    script = "[{ehlo: c.example}, {starttls: {inject: 'NOOP\\r\\n'}}, {ehlo: c.example}, quit]"
    vulnerable, _ = run(script, mta(injection_vulnerable=True), tmp_path)
    assert vulnerable.observed["injection_executed"] is True
    assert vulnerable.observed["replies"]["EHLO/tls"] == 250
    safe, net = run(script, mta(), tmp_path)
    assert safe.observed["injection_executed"] is False
    flow = net.capture.flows[0]
    assert b"STARTTLS\r\nNOOP\r\n" in flow.payload(Direction.C2S)  # both in the one write, as staged


def test_starttls_with_argument_sends_it(tmp_path: Path) -> None:
    record, net = run("[{ehlo: c.example}, {starttls: {argument: foo}}]", mta(), tmp_path)
    assert record.observed["starttls_reply"] == 501
    assert b"STARTTLS foo\r\n" in net.capture.flows[0].payload(Direction.C2S)


def test_abort_mid_handshake_sends_a_clienthello_and_closes(tmp_path: Path) -> None:
    factory = mta()
    record, net = run("[{ehlo: c.example}, {starttls: {tls: {abort_mid_handshake: true}}}]", factory, tmp_path)
    c2s = net.capture.flows[0].payload(Direction.C2S)
    hello = c2s[c2s.index(b"STARTTLS\r\n") + len(b"STARTTLS\r\n") :]
    assert hello[:1] == b"\x16" and hello[5:6] == b"\x01"  # a TLS handshake record holding a ClientHello
    assert record.observed["closed_by"] == "client" and record.observed["tls"] is False
    assert factory.sessions[0].tls is False and factory.sessions[0].tls_error is not None


def test_plaintext_after_220_goes_on_without_a_clienthello(tmp_path: Path) -> None:
    factory = mta()
    record, _ = run(
        "[{ehlo: c.example}, {starttls: {tls: {plaintext_after_220: true}}}, {send: NOOP}]", factory, tmp_path
    )
    assert " -> NOOP" in record.transcript
    assert factory.sessions[0].tls_error == "wrong version number"  # the server read plaintext as a TLS record


def test_second_handshake_failure_reason_is_kept(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}, {starttls: {}}, {send: NOOP}]", mta("handshake-fail"), tmp_path)
    assert record.observed["tls_error"] == "tls alert handshake failure"
    assert "<** TLS handshake failed: tls alert handshake failure" in record.transcript
    assert "<** not connected: the script ends" in record.transcript


# -- bounded waits


def test_silent_server_times_out_on_the_greeting_in_virtual_time(tmp_path: Path) -> None:
    record, net = run("[{ehlo: c.example}]", banner_server(b""), tmp_path, reply_timeout=30.0)
    assert "<** timeout: no reply to the greeting within 30s" in record.transcript
    assert record.observed["aborted"] is True and record.observed["connected"] is False
    assert 30.0 <= net.clock.seconds() < 31.0


def test_timeout_after_a_command_is_bounded_too(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}, {send: NOOP}]", banner_server(Banner.data), tmp_path, reply_timeout=7)
    assert record.transcript[-1] == "<** timeout: no reply to EHLO within 7s"
    assert record.observed["connected"] is True and record.observed["closed_by"] == "client"


def test_connection_refused_is_reported(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}]", None, tmp_path)
    assert record.transcript[-1].startswith("<** connection failed: ")
    assert record.observed["connected"] is False and record.observed["connections"] == 0


def test_wait_uses_virtual_time_and_reconnect_opens_a_second_connection(tmp_path: Path) -> None:
    record, net = run("[{ehlo: c.example}, {wait: 120}, {reconnect: {}}, {ehlo: c.example}, quit]", mta(), tmp_path)
    assert record.observed["connections"] == 2
    assert record.observed["replies"]["EHLO#2"] == 250
    assert record.connections[1].opened - record.connections[0].opened >= 120
    assert len(net.capture.flows) == 2 and net.capture.flows[0].client.port != net.capture.flows[1].client.port


def test_expect_close_waits_for_the_server(tmp_path: Path) -> None:
    closed, _ = run("[{send: QUIT}, {expect_close: {}}]", mta(), tmp_path)
    assert closed.observed["closed_by"] == "server" and closed.observed["aborted"] is False
    stays, _ = run("[{send: NOOP}, {expect_close: {}}]", mta(), tmp_path, reply_timeout=5)
    assert "<** timeout: the server did not close within 5s" in stays.transcript
    assert stays.observed["aborted"] is True


# -- expectations


def test_expect_mismatch_gives_up_with_quit(tmp_path: Path) -> None:
    record, _ = run("[{send: 'MAIL FROM:<a@example.net>', expect: [2xx]}, {send: NOOP}]", mta(), tmp_path)
    assert "<** expected 2xx, got 503: giving up" in record.transcript
    assert sent(record) == ["MAIL FROM:<a@example.net>", "QUIT"]
    assert record.observed["aborted"] is True


def test_expect_mismatch_may_go_on(tmp_path: Path) -> None:
    script = "[{send: 'MAIL FROM:<a@example.net>', expect: 250, on_mismatch: continue}, {send: NOOP}]"
    record, _ = run(script, mta(), tmp_path)
    assert sent(record) == ["MAIL FROM:<a@example.net>", "NOOP"]
    assert record.observed["aborted"] is False


def test_code_patterns() -> None:
    assert code_matches(250, "2xx") and code_matches(250, "25x") and code_matches(250, "250")
    assert not code_matches(354, "2xx") and not code_matches(530, "53x".replace("3", "4"))


# -- hostile input and transactions


def test_raw_pipelined_chunks_get_one_labelled_reply_per_line(tmp_path: Path) -> None:
    script = r"""
    - ehlo: c.example
    - raw: ["MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.com>\r\n", "N\x00OP\r\n"]
    """
    record, net = run(script, mta(), tmp_path)
    assert record.observed["replies"] == {"EHLO": 250, "MAIL": 250, "RCPT": 250, "RAW": 500}
    assert " -> N\\x00OP" in record.transcript
    assert b"N\x00OP\r\n" in net.capture.flows[0].payload(Direction.C2S)


def test_raw_settle_records_the_replies_beyond_the_expected_ones(tmp_path: Path) -> None:
    """``settle``: more replies than expected are recorded (LABEL#2 ...), not left for the next step to take."""
    script = r"""
    - ehlo: c.example
    - {raw: {data: "NOOP\r\nNOOP\r\nRSET\r\n", replies: 1, settle: 1}, as: BLOCK}
    - {raw: {data: "NOOP\r\n", settle: 2}, as: ONE}
    - quit
    """
    record, _ = run(script, mta(), tmp_path)
    replies = record.observed["replies"]
    assert replies == {"EHLO": 250, "BLOCK": 250, "BLOCK#2": 250, "BLOCK#3": 250, "ONE": 250, "QUIT": 221}
    assert "=== 2 more reply(ies) than the 1 expected" in record.transcript
    with pytest.raises(BadInput, match=r"steps\[0\]\.raw"):
        steps_from_data(parse_yaml("- {raw: {data: x, settle: 0}}", "s.yaml"), file="s.yaml")


def test_mail_transaction_records_each_reply_and_delivers(tmp_path: Path) -> None:
    factory = mta()
    script = "[{ehlo: c.example}, {mail: {from: a@example.net, to: [b@example.com, c@example.com], marker: M-1}}]"
    record, _ = run(script, factory, tmp_path)
    assert record.observed["replies"] == {"EHLO": 250, "MAIL": 250, "RCPT": 250, "RCPT#2": 250, "DATA": 354, "DOT": 250}
    assert record.observed["delivered"] is True and record.observed["delivered_plaintext"] is True
    assert factory.messages[0].rcpt_to == ["b@example.com", "c@example.com"]
    assert b"M-1\r\n" in factory.messages[0].data


def test_message_body_is_dot_stuffed_and_padded_to_size() -> None:
    stuffed = message_bytes(Mail("a@x", ("b@y",), body=".hidden\nplain"))
    assert b"\r\n..hidden\r\nplain\r\n.\r\n" in stuffed
    sized = message_bytes(Mail("a@x", ("b@y",), size=5000))
    assert abs(len(sized) - len(b".\r\n") - 5000) <= 2


def test_long_body_is_summarised_in_the_transcript(tmp_path: Path) -> None:
    record, _ = run("[{ehlo: c.example}, {mail: {from: a@x.net, to: b@y.com, size: 100000}}]", mta(), tmp_path)
    assert any(line.startswith(" -> [... ") and "more lines" in line for line in record.transcript)
    assert len(record.transcript) < 80
    assert record.observed["delivered"] is True


# -- steps as data


def test_schema_fragment_is_valid_draft_2020_12() -> None:
    schema = json.loads(resources.files("lab").joinpath("schemas", "steps.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "steps" in schema["$defs"]


def test_every_action_parses() -> None:
    text = r"""
    - {ehlo: a.example, as: first, expect: [2xx, 354]}
    - {helo: a.example}
    - {send: NOOP}
    - {raw: {data: 'A\r\n', replies: 0}}
    - {starttls: {inject: 'MAIL FROM:<x>\r\n', tls: {versions: [1.0, TLSv1.1], sni: mx.example, client_cert: lab}}}
    - {mail: {from: a@b.example, to: c@d.example, size: 10}}
    - quit
    - {wait: 1.5}
    - {reconnect: {}}
    - {expect_close: }
    - {if: {capability: starttls, then: [quit]}}
    - {tls_policy: {behaviour: require-verify, ehlo: me.example}}
    """
    steps = steps_from_data(parse_yaml(text, "s.yaml"), file="s.yaml")
    assert [type(s).__name__ for s in steps] == [
        "Ehlo", "Helo", "Send", "Raw", "StartTLS", "Mail", "Quit", "Wait", "Reconnect", "ExpectClose", "If",
        "TLSPolicy",
    ]  # fmt: skip
    assert steps[0].label == "first" and steps[0].expect == ("2xx", "354")
    assert steps[3].chunks == (b"A\r\n",) and steps[3].expected_replies == 0
    assert steps[4].inject == b"MAIL FROM:<x>\r\n"
    assert steps[4].tls == TLSOptions(min_version="1.0", max_version="1.1", server_name="mx.example", client_cert="lab")
    assert steps[10].capability == "STARTTLS"
    assert steps[11].tls.verify is True and steps[11].ehlo == "me.example"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- {ehlo: x, helo: y}", "s.yaml:2: steps[0]: one action per step, found ehlo, helo"),
        ("- {fly: away}", "s.yaml:2: steps[0]: no action in step (found fly;"),
        ("- ehlo: x\n- {send: NOOP, expect: 700}", "s.yaml:3: steps[1].expect: 700 is greater than the maximum"),
        ("- {starttls: {tls: {versions: [1.3, 1.2]}}}", "steps[0].starttls.tls: min version 1.3 is above max"),
        ("- {mail: {from: a@b}}", "steps[0].mail: 'to' is a required property"),
        ("- {if: {capability: X, then: [{wait: -1}]}}", "steps[0].if.then[0].wait: -1 is less than the minimum of 0"),
        ('- {send: "A\\r\\nB"}', "steps[0].send: send is one command line"),
        ("- {tls_policy: sometimes}", "steps[0].tls_policy: 'sometimes' is not valid"),
        ("- {starttls: {tls: {client_cert: mine}}}", "steps[0].starttls.tls.client_cert: 'mine' is not one of"),
        ("- {tls_policy: {behaviour: require, tls: {ciphers: NOPE}}}", "steps[0].tls_policy.tls.ciphers: no usable"),
    ],
)
def test_bad_steps_name_file_line_and_field(text: str, message: str) -> None:
    with pytest.raises(BadInput) as caught:
        steps_from_data(parse_yaml("\n" + text, "s.yaml"), file="s.yaml")
    assert message in str(caught.value)


def test_escapes_in_single_quoted_yaml() -> None:
    assert decode_escapes("A\\r\\nB\\x00\\xff\\\\") == b"A\r\nB\x00\xff\\"
    assert decode_escapes("\xff") == b"\xff"


# -- the same engine over real TCP


@pytest_twisted.ensureDeferred
async def test_over_real_tcp_on_loopback(tmp_path: Path) -> None:
    factory = mta()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        address = port.getHost()
        script = "[{tls_policy: prefer}, {mail: {from: a@example.net, to: b@example.com}}, quit]"
        steps = steps_from_data(parse_yaml(script, "t.yaml"))
        client = ScriptedClient(
            steps,
            clock=reactor,
            connect=lambda f: TCP4ClientEndpoint(reactor, "127.0.0.1", address.port, timeout=5).connect(f),
            tls_factory=lab_client_tls(state_dir=tmp_path),
            reply_timeout=5,
        )
        record = await client.run()
    finally:
        await port.stopListening()
    assert record.observed["delivered_tls"] is True
    assert record.transcript[1] == "=== Connected to 127.0.0.1."
    assert factory.messages and factory.messages[0].tls is True
