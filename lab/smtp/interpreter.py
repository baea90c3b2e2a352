"""The step interpreter: what each step of ``lab.smtp.steps`` does on the wire and what it records.

It drives the client shell (``lab.smtp.client.ScriptedClient``: writes, replies, closes, bounded waits) and
reports what happened to the shell's ``Recorder``. The STARTTLS exchange (the command, its reply, the discard of
bytes buffered behind the 220, the handshake) is written once here and used by the ``starttls`` step and by the
``tls_policy`` composite, whose decisions come from the pure fallback table (``lab.policy.fallback``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.python.failure import Failure

from lab.policy.fallback import ClientTLS as Behaviour
from lab.policy.fallback import Next, Problem, after, attempts_starttls
from lab.smtp.client import Conn, End, Reply
from lab.smtp.message import message_bytes
from lab.smtp.steps import (
    Ehlo,
    ExpectClose,
    Helo,
    If,
    Mail,
    Quit,
    Raw,
    Reconnect,
    Send,
    StartTLS,
    Step,
    TLSOptions,
    TLSPolicy,
    Wait,
)
from lab.smtp.transcript import Kind
from lab.tls.tlsctx import tls_error_reason, tls_facts

if TYPE_CHECKING:
    from lab.smtp.client import ScriptedClient

_VERB = re.compile(r"^[A-Za-z]{1,16}$")
_DECISION_WORDS = {
    Next.PLAINTEXT: "going on in plaintext",
    Next.RETRY_PLAINTEXT: "retrying the delivery in plaintext on a new connection",
    Next.ABORT: "giving up",
    Next.IGNORE: "going on (this client does not require it)",
}


class StepInterpreter:
    """Runs a step list against one ``ScriptedClient`` shell."""

    def __init__(self, client: ScriptedClient) -> None:
        self.client = client
        self.transcript = client.transcript
        self.rec = client.recorder

    async def run(self, steps: Sequence[Step]) -> None:
        """Connect, then every step in order; ``End`` stops the script."""
        await self._open()
        await self._steps(steps)

    async def _steps(self, steps: Sequence[Step]) -> None:
        for step in steps:
            self.transcript.step = step.label or type(step).__name__.lower()
            await self._step(step)

    async def _step(self, step: Step) -> None:
        if isinstance(step, Ehlo):
            await self._ehlo(step.name, step)
        elif isinstance(step, Helo):
            await self._helo(step)
        elif isinstance(step, Send):
            await self._send(step)
        elif isinstance(step, Raw):
            await self._raw(step)
        elif isinstance(step, StartTLS):
            await self._starttls(step)
        elif isinstance(step, Mail):
            await self._mail(step)
        elif isinstance(step, Quit):
            await self._quit(step)
        elif isinstance(step, Wait):
            await self.client.until(lambda: False, step.seconds)
        elif isinstance(step, Reconnect):
            await self._reconnect(step)
        elif isinstance(step, ExpectClose):
            await self._expect_close(step)
        elif isinstance(step, If):
            caps = self.client.conn.caps if self.client.conn is not None else []
            await self._steps(step.then if step.capability in caps else step.else_)
        elif isinstance(step, TLSPolicy):
            await self._tls_policy(step)
        else:  # pragma: no cover - steps_from_data only builds the types above
            raise TypeError(f"unknown step {step!r}")

    # -- recording replies

    def _tls(self) -> bool:
        conn = self.client.conn
        return conn is not None and conn.tls

    def _note_reply(self, default: str, step: Step | None, reply: Reply, prefix: str = "") -> None:
        own = step.label if step is not None else None
        self.rec.replied(default, own, reply.code, tls=self._tls(), prefix=prefix)

    async def _check(self, step: Step, code: int) -> None:
        """Apply ``expect``: a mismatch ends the script (aborted) unless ``on_mismatch: continue``."""
        if step.expects(code):
            return
        wanted = ", ".join(step.expect)
        if step.on_mismatch == "continue":
            self.transcript.note(f"expected {wanted}, got {code}; going on", Kind.EXPECTATION)
            return
        self.transcript.error(f"expected {wanted}, got {code}: giving up", Kind.EXPECTATION)
        await self._give_up()

    async def _give_up(self) -> None:
        """The client's own decision to stop: QUIT if the connection still works, then end the script."""
        self.rec.aborted()
        conn = self.client.conn
        if conn is not None and conn.usable and not conn.tls_pending:
            with contextlib.suppress(End):
                await self._quit(None)
        raise End

    # -- connecting and commands

    async def _open(self, step: Step | None = None) -> None:
        await self.client.connect_once()
        banner = await self.client.reply("the greeting")
        conn = self.client.need()
        conn.banner = banner.code
        self.rec.greeted(banner.code)
        if step is not None:
            if step.label:
                self._note_reply("CONNECT", step, banner)
            await self._check(step, banner.code)

    async def _command(self, line: str, step: Step | None) -> Reply:
        verb = line.split(" ", 1)[0].upper()
        self.client.write(line.encode("utf-8") + b"\r\n")
        reply = await self.client.reply(verb)
        self._note_reply(verb if _VERB.match(verb) else "SEND", step, reply)
        return reply

    async def _ehlo(self, name: str, step: Step | None) -> Reply:
        reply = await self._command(f"EHLO {name}", step)
        conn = self.client.need()
        conn.caps = [_capability(text) for text in reply.lines[1:]] if reply.code == 250 else []
        self.rec.ehlo_seen("STARTTLS" in conn.caps)
        if step is not None:
            await self._check(step, reply.code)
        return reply

    async def _helo(self, step: Helo) -> None:
        reply = await self._command(f"HELO {step.name}", step)
        self.client.need().caps = []
        await self._check(step, reply.code)

    async def _send(self, step: Send) -> None:
        reply = await self._command(step.line, step)
        await self._check(step, reply.code)

    async def _raw(self, step: Raw) -> None:
        if step.separate:
            for chunk in step.chunks:
                self.client.write(chunk)
        else:
            self.client.write(step.data)
        verbs = [_raw_verb(line) for line in step.data.split(b"\n")]
        for i in range(step.expected_replies):
            reply = await self.client.reply(f"raw line {i + 1}")
            self._note_reply(verbs[i] if i < len(verbs) else "RAW", step, reply)
            await self._check(step, reply.code)
        if step.settle is not None:
            await self._settle_raw(step, verbs)

    async def _settle_raw(self, step: Raw, verbs: list[str]) -> None:
        """Listen ``step.settle`` seconds more: replies beyond the expected ones are recorded, not left queued."""
        conn = self.client.conn
        if conn is None:
            return
        await self.client.until(lambda: conn.is_lost or conn.error is not None, step.settle or 0.0)
        extra = 0
        while conn.replies:
            i = step.expected_replies + extra
            self._note_reply(verbs[i] if i < len(verbs) else "RAW", step, conn.replies.popleft())
            extra += 1
        if extra:
            self.transcript.note(
                f"{extra} more reply(ies) than the {step.expected_replies} expected", Kind.EXTRA_REPLIES
            )

    async def _mail(self, step: Mail) -> None:
        prefix = f"{step.label}." if step.label else ""
        reply = await self._command(f"MAIL FROM:<{step.mail_from}>", None)
        self.rec.relabel_last("MAIL", prefix, tls=self._tls())
        if not reply.positive:
            return await self._check(step, reply.code)
        accepted = 0
        for rcpt in step.rcpt_to:
            reply = await self._command(f"RCPT TO:<{rcpt}>", None)
            self.rec.relabel_last("RCPT", prefix, tls=self._tls())
            accepted += reply.positive
        if not accepted:
            return await self._check(step, reply.code)
        reply = await self._command("DATA", None)
        self.rec.relabel_last("DATA", prefix, tls=self._tls())
        if reply.code != 354:
            return await self._check(step, reply.code)
        conn = self.client.need()
        self.client.write(message_bytes(step), body=True)
        reply = await self.client.reply("the end of the message")
        self._note_reply("DOT", None, reply, prefix)
        if 200 <= reply.code < 300:
            self.rec.delivered(tls=conn.tls)
        await self._check(step, reply.code)

    async def _quit(self, step: Step | None) -> None:
        conn = self.client.need()
        reply = await self._command("QUIT", step)
        if step is not None:
            await self._check(step, reply.code)
        await self.client.hang_up(conn, server_first=True)

    async def _reconnect(self, step: Reconnect) -> None:
        if self.client.conn is not None:
            await self.client.hang_up(self.client.conn)
        await self._open(step)

    async def _expect_close(self, step: ExpectClose) -> None:
        conn = self.client.conn
        if conn is None:
            return
        if await self.client.wait_closed(conn, self.client.reply_timeout):
            return
        self.transcript.error(f"timeout: the server did not close within {self.client.reply_timeout:g}s", Kind.TIMEOUT)
        if step.on_mismatch == "continue":
            return
        self.rec.aborted()
        self.client.close(conn)
        raise End

    # -- the STARTTLS exchange (RFC 3207 4, 4.2), written once

    async def _starttls_command(self, step: Step | None, argument: str | None = None, inject: bytes = b"") -> Reply:
        """Send STARTTLS (with any bytes injected in the same write) and read its reply."""
        conn = self.client.need()
        line = b"STARTTLS" + (b" " + argument.encode("utf-8") if argument is not None else b"") + b"\r\n"
        if inject:
            self.transcript.sent(line, tls=conn.tls)
            self.transcript.note(f"injecting {len(inject)} bytes in the same write behind STARTTLS", Kind.INJECTING)
            self.transcript.sent(inject, tls=conn.tls)
            if conn.tls:
                conn.sent_in_tls += 1
            conn.transport.write(line + inject)
        else:
            self.client.write(line)
        reply = await self.client.reply("STARTTLS")
        self._note_reply("STARTTLS", step, reply)
        self.rec.starttls_replied(reply.code)
        return reply

    async def _after_220(self, options: TLSOptions, *, injected: bool) -> bool:
        """Discard what the server sent behind the 220, then do (or fake) the handshake; True if TLS is up."""
        conn = self.client.need()
        leftover = conn.discard_buffered()
        if leftover:
            self.transcript.note(
                f"discarded {leftover} bytes of server data received after 220 (response injection)",
                Kind.RESPONSE_INJECTION_DISCARDED,
            )
            self.client.flow(conn)
        self.rec.response_injection(bool(leftover))
        if options.plaintext_after_220:
            self.transcript.note(
                "ignoring the 220: going on in plaintext instead of a ClientHello", Kind.PLAINTEXT_AFTER_220
            )
            return False
        if options.abort_mid_handshake:
            await self._abort_handshake(conn, options)
            return False
        return await self._handshake(conn, options, injected=injected)

    async def _handshake(self, conn: Conn, options: TLSOptions, *, injected: bool) -> bool:
        client = self.client
        creator = client.tls_factory(options)
        conn.tls_pending = True
        conn.transport.startTLS(creator)
        await client.until(lambda: conn.tls or conn.is_lost, client.reply_timeout)
        if conn.tls:
            self._tls_up(conn, creator)
            if injected:
                await client.until(lambda: conn.is_lost or bool(self.rec.obs.injection_executed), client.settle)
                self.rec.injection_settled()
            return True
        conn.tls_pending = False
        if conn.is_lost:
            reason = _tls_reason(conn.lost)
            self.transcript.error(f"TLS handshake failed: {reason}", Kind.HANDSHAKE_FAILED)
        else:
            reason = f"timeout after {client.reply_timeout:g}s"
            self.transcript.error(f"timeout: TLS handshake not done within {client.reply_timeout:g}s", Kind.TIMEOUT)
            client.close(conn, abort=True)
        self.rec.tls_failed(reason)
        return False

    def _tls_up(self, conn: Conn, creator: Any) -> None:
        handle = conn.transport.getHandle()
        assert handle is not None  # called once the handshake completed
        facts = tls_facts(handle)
        self.transcript.note(f"TLS started with cipher {facts.version}:{facts.cipher}:{facts.bits}", Kind.TLS_STARTED)
        verified = None
        check = getattr(creator, "server_cert_verified", None)
        if check is not None:
            verified = bool(check(handle))
            name = getattr(creator, "server_name", None)
            self.transcript.note(
                f"TLS server certificate {'verified' if verified else 'not verified'}"
                + (f" for {name}" if name else " (no server name to verify against)")
                + (f" (subject {facts.peer_subject})" if facts.peer_subject else ""),
                Kind.CERT_CHECKED,
            )
        conn.caps = []  # RFC 3207 4.2: forget what was learnt before TLS
        conn.verified = verified
        self.rec.tls_up(facts.version, facts.cipher, verified)

    async def _abort_handshake(self, conn: Conn, options: TLSOptions) -> None:
        """Send a real ClientHello, then close: the server sees a handshake cut short."""
        creator: Any = self.client.tls_factory(options)  # a zope interface: mypy reads it only with its plugin
        tls = creator.clientConnectionForTLS(conn.protocol)
        with contextlib.suppress(SSL.WantReadError):
            tls.do_handshake()
        hello = tls.bio_read(65536)
        self.transcript.note(f"sent a ClientHello ({len(hello)} bytes), closing mid-handshake", Kind.HANDSHAKE_ABORTED)
        conn.transport.write(hello)
        self.rec.tls_failed("aborted by the client after the ClientHello")
        self.client.close(conn)
        await self.client.wait_closed(conn, self.client.close_wait)

    async def _starttls(self, step: StartTLS) -> None:
        conn = self.client.need()
        reply = await self._starttls_command(step, step.argument, step.inject)
        await self._check(step, reply.code)
        if reply.code != 220:
            if step.inject:
                await self._injected_replies(conn, step)
            return
        if conn.tls:
            self.transcript.error("220 to STARTTLS inside TLS: not starting TLS twice", Kind.EXPECTATION)
            await self._give_up()
        await self._after_220(step.tls, injected=bool(step.inject))

    async def _injected_replies(self, conn: Conn, step: StartTLS) -> None:
        """STARTTLS was refused, so the injected lines were ordinary pipelined commands: read one reply each."""
        for line in (line for line in step.inject.split(b"\r\n") if line):
            reply = await self.client.reply(f"injected {_raw_verb(line)}")
            self._note_reply(_raw_verb(line), step, reply)
            if reply.code == 354:  # the server now reads a message body: hang up rather than send one
                self.transcript.note(
                    "the injected DATA was accepted in plaintext; closing instead of sending a body", Kind.DECISION
                )
                self.rec.aborted()
                conn.transport.abortConnection()
                raise End

    # -- the composite: EHLO, then what the fallback table says

    async def _tls_policy(self, step: TLSPolicy) -> None:
        behaviour = step.behaviour
        conn = self.client.need()
        if conn.banner is not None and conn.banner != 220:
            self.transcript.error(f"greeting {conn.banner}: the server does not want mail from us", Kind.EXPECTATION)
            await self._give_up()
        reply = await self._ehlo(step.ehlo, None)
        advertised = reply.code == 250 and "STARTTLS" in conn.caps
        if behaviour is Behaviour.SKIP:
            return
        self.rec.may_fall_back()
        if not attempts_starttls(behaviour, advertised):
            return await self._decide(step, Problem.NOT_ADVERTISED, "STARTTLS not advertised")
        reply = await self._starttls_command(None)
        if reply.code != 220:
            return await self._decide(step, Problem.REFUSED, f"STARTTLS answered {reply.code}")
        if not await self._after_220(step.tls, injected=False):
            if step.tls.plaintext_after_220:
                return
            if step.tls.abort_mid_handshake:
                self.rec.aborted()
                raise End
            return await self._decide(step, Problem.HANDSHAKE_FAILED, "the TLS handshake failed")
        if conn.verified is False and after(behaviour, Problem.VERIFY_FAILED) is not Next.IGNORE:
            await self._decide(step, Problem.VERIFY_FAILED, "the server certificate did not verify")
        await self._ehlo(step.ehlo, None)

    async def _decide(self, step: TLSPolicy, problem: Problem, why: str) -> None:
        nxt = after(step.behaviour, problem)
        conn = self.client.conn
        if nxt is Next.PLAINTEXT and (conn is None or not conn.usable):
            nxt = Next.RETRY_PLAINTEXT
        self.transcript.note(f"{step.behaviour.value}: {why}: {_DECISION_WORDS[nxt]}", Kind.DECISION)
        if nxt is Next.ABORT:
            await self._give_up()
        if nxt is Next.IGNORE:
            return
        self.rec.fell_back()
        if nxt is Next.RETRY_PLAINTEXT:
            if conn is not None and conn.usable:
                await self._quit(None)
            await self._reconnect(Reconnect())
            await self._ehlo(step.ehlo, None)


def _capability(text: bytes) -> str:
    words = text.decode("ascii", "replace").split()
    return words[0].upper() if words else ""


def _raw_verb(line: bytes) -> str:
    word = line.split(b" ", 1)[0].strip(b"\r").decode("ascii", "replace")
    return word.upper() if _VERB.match(word) else "RAW"


def _tls_reason(reason: Failure | None) -> str:
    if reason is None:
        return "connection lost"
    if isinstance(reason.value, SSL.Error):
        return tls_error_reason(reason.value)
    return f"connection closed during the handshake ({type(reason.value).__name__})"
