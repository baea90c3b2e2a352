"""The appliance's delivery client: one connection to a receiving MTA, carrying queued messages.

It is the lab's one client engine (``lab.smtp.client.ScriptedClient`` and its ``StepInterpreter``: the same
reply reader, the same STARTTLS exchange with the discard of bytes buffered behind the 220, the same TLS
factory and transcript), driven by a coroutine instead of a step list. What it does about TLS comes from the
destination control's decision table (``lab.policy.destinations.decide``); what became of each recipient is
returned in a ``ConnectionReport`` for the engine (``lab.outbound.engine``) to act on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from lab.appliance.maillog import MailLog
from lab.outbound.mtasts import Policy, TLSOutcome
from lab.outbound.mtasts import decide as sts_decide
from lab.policy.destinations import DestinationTLS, Next, TLSEvent, decide
from lab.smtp.client import End, ScriptedClient
from lab.smtp.core.events import ReceivedReply
from lab.smtp.interpreter import StepInterpreter
from lab.smtp.steps import TLSOptions
from lab.smtp.transcript import Kind
from lab.tls.tlsctx import ClientTLS, tls_facts


@dataclass(frozen=True)
class Envelope:
    """One queued message as the connection carries it."""

    mid: int
    sender: str  # "" for the null reverse-path
    recipients: tuple[tuple[int, str], ...]  # (RID, address)
    data: bytes


@dataclass(frozen=True)
class Answer:
    """The receiver's answer about one recipient: the reply code, its enhanced status and text."""

    code: int
    status: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300


@dataclass
class ConnectionReport:
    """What one delivery connection did."""

    peer_ip: str
    connected: bool = False
    greeting: int | None = None
    receiving_helo: str | None = None
    tls_event: TLSEvent | None = None
    next: Next | None = None
    tls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    certificate_verified: bool | None = None
    certificate_problem: str | None = None  # RFC 8460 result type of a certificate that did not verify
    tls_error: str | None = None
    failure: str | None = None  # why the connection carried nothing (refused, greeting 421, lost ...)
    sts_result: str | None = None  # the MTA-STS check of this MX failed: its RFC 8460 result type
    sts_reason: str | None = None
    answers: dict[tuple[int, int], Answer] = field(default_factory=dict)  # (MID, RID) -> answer
    carried: list[int] = field(default_factory=list)  # MIDs whose DATA was sent


class DeliveryInterpreter(StepInterpreter):
    """Greeting, EHLO, STARTTLS as the setting says, then each envelope; every problem ends in the report."""

    def __init__(
        self,
        client: ScriptedClient,
        *,
        dcid: int,
        hostname: str,
        setting: DestinationTLS,
        names: Sequence[str],
        trust_pems: Sequence[bytes],
        envelopes: Sequence[Envelope],
        maillog: MailLog,
        report: ConnectionReport,
        client_cert: str = "none",
        sts: Policy | None = None,
    ) -> None:
        super().__init__(client)
        self.sts = sts  # the recipient domain's MTA-STS policy in force: every MX is checked against it
        self.dcid, self.hostname, self.setting = dcid, hostname, setting
        self.names = tuple(names)  # the receiving host, then the destination domain: what a certificate may name
        self.trust_pems = tuple(trust_pems)
        self.envelopes = envelopes
        self.log = maillog
        self.report = report
        self.client_cert = client_cert

    async def deliver(self) -> None:
        try:
            await self._session()
        except End:
            conn = self.client.conn
            if self.report.failure is None:
                if conn is None:
                    self.report.failure = self._last_error("connection failed")
                elif conn.error is not None:
                    self.report.failure = f"bad reply: {conn.error}"
                else:
                    self.report.failure = self._last_error("connection lost")
            raise

    def _last_error(self, default: str) -> str:
        """The transcript's last error (``connection failed: Connection refused``...), as the reason."""
        errors = [e.text for e in self.transcript.entries if e.kind is not None and e.direction.value == "error"]
        return errors[-1] if errors else default

    async def _session(self) -> None:
        report = self.report
        await self.client.connect_once()
        report.connected = True
        banner = await self.client.reply("the greeting")
        conn = self.client.need()
        conn.banner = report.greeting = banner.code
        self.rec.greeted(banner.code)
        first = banner.lines[0].split() if banner.lines else []
        report.receiving_helo = first[0].decode("ascii", "replace") if first else None
        if banner.code != 220:
            report.failure = f"greeting {_one_line(banner)}"
            await self._quit_quietly()
            return
        ehlo = await self._ehlo(self.hostname, None)
        if ehlo.code != 250:
            report.failure = f"EHLO answered {_one_line(ehlo)}"
            await self._quit_quietly()
            return
        report.next = await self._negotiate()
        if report.next is Next.DEFER:
            await self._quit_quietly()
            return
        if report.next is Next.TLS:
            ehlo = await self._ehlo(self.hostname, None)
            if ehlo.code != 250:
                report.failure = f"EHLO inside TLS answered {_one_line(ehlo)}"
                await self._quit_quietly()
                return
        for envelope in self.envelopes:
            await self._transaction(envelope)
        await self._quit_quietly()

    # -- TLS, as the destination control says

    async def _negotiate(self) -> Next:
        report, conn = self.report, self.client.need()
        if not self.setting.attempts_tls:
            return Next.CLEAR
        event: TLSEvent
        if "STARTTLS" not in conn.caps:
            event = TLSEvent.NOT_ADVERTISED
            report.tls_error = "STARTTLS not advertised"
            self.log.dcid_no_starttls(self.dcid)
        else:
            reply = await self._starttls_command(None)
            if reply.code != 220:
                event = TLSEvent.REFUSED
                report.tls_error = f"STARTTLS answered {_one_line(reply)}"
                self.log.dcid_tls_failed(self.dcid, report.tls_error)
            else:
                options = TLSOptions(
                    server_name=self.names[0], verify=self.setting.verifies, client_cert=self.client_cert
                )
                if await self._after_220(options, injected=False):
                    event = self._tls_up_facts()
                else:
                    event = TLSEvent.FAILED_AFTER_220
                    report.tls_error = self.rec.obs.tls_error or "the TLS handshake failed"
                    self.log.dcid_tls_failed(self.dcid, report.tls_error)
        report.tls_event = event
        nxt = decide(self.setting, event)
        self.transcript.note(f"{self.setting}: TLS {event}: {nxt}", Kind.DECISION)
        if self.sts is not None:
            nxt = self._check_sts(self.sts, event, nxt)
        if nxt is Next.DEFER and self.setting.required:
            self.log.dcid_tls_required(self.dcid, report.peer_ip)
        return nxt

    def _check_sts(self, policy: Policy, event: TLSEvent, nxt: Next) -> Next:
        """RFC 8461 4-5 for this MX: the mx patterns, STARTTLS, the certificate; enforce defers what fails."""
        report, mx = self.report, self.names[0]
        problem = report.certificate_problem
        outcome = TLSOutcome(
            starttls_offered=event not in (TLSEvent.NOT_ADVERTISED, TLSEvent.REFUSED),
            handshake_ok=event is not TLSEvent.FAILED_AFTER_220,
            certificate_trusted=problem not in ("certificate-not-trusted",),
            certificate_names_host=problem != "certificate-host-mismatch",
            certificate_expired=problem == "certificate-expired",
            failure=report.tls_error,
        )
        decision = sts_decide(policy, mx, outcome)
        action = None
        if decision.result_type is not None:
            reason = decision.reason
            if reason == decision.result_type:  # a certificate problem: say what it is about this MX
                reason = _CERTIFICATE_PROBLEMS.get(reason, reason).format(mx=mx)
            report.sts_result, report.sts_reason = decision.result_type, reason
            if not decision.deliver:
                nxt, action = Next.DEFER, "not delivered"
            else:
                action = "delivered anyway" if nxt is not Next.DEFER else None
        self.log.dcid_mtasts(self.dcid, str(policy.mode), mx, decision.result_type, action)
        self.transcript.note(f"MTA-STS {policy.mode}: {decision.result_type or 'ok'}: {nxt}", Kind.DECISION)
        return nxt

    def _tls_up_facts(self) -> TLSEvent:
        report, conn = self.report, self.client.need()
        handle = conn.transport.getHandle()
        assert handle is not None  # TLS is up
        facts = tls_facts(handle)
        report.tls, report.tls_version, report.cipher = True, facts.version, facts.cipher
        self.log.dcid_tls_success(self.dcid, facts.version, facts.cipher)
        if not self.setting.verifies and self.sts is None:
            return TLSEvent.OK
        # MTA-STS: the certificate must be valid for the MX host itself (RFC 8461 4.2), not the domain
        names = self.names[:1] if self.sts is not None else self.names
        problem = certificate_problem(handle, names, self.trust_pems)
        report.certificate_verified = problem is None
        report.certificate_problem = problem
        if problem is None:
            self.log.dcid_certificate(self.dcid, True)
            return TLSEvent.OK
        self.log.dcid_certificate(self.dcid, False, f"{problem} (names checked: {', '.join(names)})")
        return TLSEvent.UNVERIFIED

    # -- one message

    async def _transaction(self, envelope: Envelope) -> None:
        conn = self.client.need()
        self.log.delivery_start(self.dcid, envelope.mid, [rid for rid, _ in envelope.recipients])
        reply = await self._command(f"MAIL FROM:<{envelope.sender}>", None)
        if not reply.positive:
            self._answer_all(envelope, envelope.recipients, reply)
            return
        accepted: list[tuple[int, str]] = []
        for rid, address in envelope.recipients:
            reply = await self._command(f"RCPT TO:<{address}>", None)
            if reply.positive:
                accepted.append((rid, address))
            else:
                self._answer_all(envelope, [(rid, address)], reply)
        if not accepted:
            await self._command("RSET", None)
            return
        reply = await self._command("DATA", None)
        if reply.code != 354:
            self._answer_all(envelope, accepted, reply)
            await self._command("RSET", None)
            return
        self.client.write(dot_stuffed(envelope.data), body=True)
        reply = await self.client.reply("the end of the message")
        self._note_reply("DOT", None, reply)
        self.report.carried.append(envelope.mid)
        if 200 <= reply.code < 300:
            self.rec.delivered(tls=conn.tls)
        self._answer_all(envelope, accepted, reply)

    def _answer_all(self, envelope: Envelope, recipients: Sequence[tuple[int, str]], reply: ReceivedReply) -> None:
        answer = Answer(reply.code, _status(reply), _one_line(reply))
        for rid, _ in recipients:
            self.report.answers[(envelope.mid, rid)] = answer

    async def _quit_quietly(self) -> None:
        conn = self.client.conn
        if conn is not None and conn.usable and not conn.tls_pending:
            await self._quit(None)


#: RFC 8460 result types of a certificate that does not do for MTA-STS, as one line about the MX.
_CERTIFICATE_PROBLEMS = {
    "certificate-host-mismatch": "the certificate does not name {mx}",
    "certificate-expired": "the certificate of {mx} has expired",
    "certificate-not-trusted": "the certificate of {mx} does not chain to a trusted CA",
}


def dot_stuffed(data: bytes) -> bytes:
    """The DATA content for ``data`` (RFC 5321 4.5.2): CRLF line ends, a dot doubled at a line start, ``.CRLF``."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def certificate_problem(handle: SSL.Connection, names: Sequence[str], trust_pems: Sequence[bytes]) -> str | None:
    """None when the receiver's certificate chains to a trusted CA and names one of ``names`` (CN or
    subjectAltName DNS, RFC 2818 wildcards, as ``lab.tls.tlsctx.ClientTLS`` checks); otherwise the RFC 8460
    result type: ``certificate-expired``, ``certificate-host-mismatch`` (trusted, but for another name) or
    ``certificate-not-trusted``."""
    for name in names:
        if ClientTLS(server_name=name, trust_pems=trust_pems).server_cert_verified(handle):
            return None
    leaf = handle.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return "certificate-not-trusted"
    if not _names_of(leaf) and _common_name_verifies(handle, leaf, names, trust_pems):
        return None
    if leaf.not_valid_after_utc < dt.datetime.now(dt.UTC):
        return "certificate-expired"
    for own in _names_of(leaf):
        if ClientTLS(server_name=own, trust_pems=trust_pems).server_cert_verified(handle):
            return "certificate-host-mismatch"
    return "certificate-not-trusted"


def _common_name_verifies(
    handle: SSL.Connection, leaf: x509.Certificate, names: Sequence[str], trust_pems: Sequence[bytes]
) -> bool:
    """A certificate without subjectAltName DNS names is matched by its CN (RFC 6125 6.4.4; RFC 2818 wildcards),
    its chain checked against the trusted CAs with OpenSSL's store."""
    common_names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not any(_matches(cn, name) for cn in common_names for name in names):
        return False
    store = crypto.X509Store()
    for pem in trust_pems:
        for ca in x509.load_pem_x509_certificates(pem):
            store.add_cert(crypto.X509.from_cryptography(ca))
    chain = [crypto.X509.from_cryptography(c) for c in handle.get_peer_cert_chain(as_cryptography=True) or []]
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), chain).verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


def _matches(pattern: str, name: str) -> bool:
    """RFC 2818 3.1: ``*.example.com`` matches one label in front of ``example.com``, nothing else."""
    pattern, name = pattern.rstrip(".").lower(), name.rstrip(".").lower()
    if pattern.startswith("*."):
        first, _, rest = name.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == name


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.replace("*.", "wildcard.", 1) for name in san.get_values_for_type(x509.DNSName)]


def _status(reply: ReceivedReply) -> str:
    """The enhanced status code (RFC 3463) at the start of the reply's text, or one made of the reply code."""
    words = reply.lines[-1].split() if reply.lines else []
    if words:
        first = words[0].decode("ascii", "replace")
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(reply.code)[0]:
            return first
    return f"{str(reply.code)[0]}.0.0"


def _one_line(reply: ReceivedReply) -> str:
    return reply.text.replace("\r\n", " / ")
