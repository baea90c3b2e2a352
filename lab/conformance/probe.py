"""Policy inference: which TLS policy does a target implement, and where does it break an RFC MUST or SHOULD
(a deviation) or only differ from the lab listener's own choices (a difference, docs/rules.md)?

A short battery of questions, each one connection driven by the lab's one client engine
(``lab.smtp.client.ScriptedClient`` with steps from ``lab.smtp.steps``) over a carrier (``lab.net.carrier``):
real TCP to a loopback address for ``smtplab probe HOST:PORT``, or the memory carrier on virtual time.
The answers are judged by reply *classes*, never by our wording (other MTAs say 454, 500, 503 ...):

- No: STARTTLS not advertised, or refused;
- Preferred: advertised, plaintext MAIL and RCPT accepted;
- Required: advertised, plaintext MAIL (or RCPT) refused, accepted after TLS; with client-certificate
  verification when the handshake carries a CertificateRequest and MAIL is refused without a verifying one.

Every deviation comes with the transcript lines that prove it. No mail is ever sent: MAIL/RCPT answers are
enough for the classification, and each transaction ends with RSET.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from lab.conformance.profile import DEFAULT_FROM, default_recipient, format_address
from lab.errors import EXIT_FAILED, EXIT_OK, HarnessError
from lab.net.carrier import EXTERNAL_CARRIER, ICarrier, open_carrier
from lab.policy.modes import TLSMode
from lab.scenario.observations import Observations
from lab.smtp.client import ClientRecord, ScriptedClient
from lab.smtp.steps import DEFAULT_EHLO, Ehlo, Helo, Quit, Raw, Send, StartTLS, Step, TLSOptions
from lab.smtp.transcript import NOTE, Direction, Entry, Kind, render
from lab.tls.certs import CertKey
from lab.tls.tlsctx import ClientCerts, ClientTLSFactory

#: Longer than the 512 octets RFC 5321 4.5.3.1.4 allows for a command line (CRLF included).
LONG_LINE = b"NOOP " + b"X" * 600 + b"\r\n"
STARTTLS_ARGUMENT = "SMTPLAB-PROBE"
#: A whole probe may take this many ``timeout``s (about a dozen questions, each bounded by a few of them).
PROBE_BUDGET = 60

#: What a finding breaks: an RFC MUST or SHOULD (a deviation), or only the lab listener's own choice (a
#: difference: docs/rules.md says so, and the RFCs leave it to the server).
MUST, SHOULD, DIFFERENCE = "MUST", "SHOULD", "difference"

#: id -> (title, the rule at stake, its level). The ids are stable: scripts and profiles may rely on them.
CHECKS: dict[str, tuple[str, str, str]] = {
    "starttls-refused": (
        "advertises STARTTLS but refuses it",
        "RFC 3207 §4 allows 454 (TLS not available); docs/rules.md §2",
        DIFFERENCE,
    ),
    "starttls-unadvertised": (
        "accepts STARTTLS although EHLO does not offer it",
        "docs/rules.md §2 (No: STARTTLS gets 502); no RFC asks a server to refuse it",
        DIFFERENCE,
    ),
    "helo-before-starttls": (
        "serves HELO before STARTTLS under Required",
        "RFC 3207 §4 (SHOULD: 530 to commands but NOOP, EHLO, STARTTLS, QUIT); docs/rules.md §2",
        SHOULD,
    ),
    "starttls-injection": (
        "executes commands pipelined behind STARTTLS inside TLS",
        "RFC 3207 §4.2 (MUST discard what came before the handshake; CVE-2011-0411); docs/rules.md §3.3",
        MUST,
    ),
    "starttls-pipelined-plaintext": (
        "answers commands pipelined behind STARTTLS in plaintext",
        "RFC 3207 §4.2 (MUST), RFC 2920 §3.1; docs/rules.md §3.3, §3.7",
        MUST,
    ),
    "state-across-tls": (
        "keeps the EHLO state across the TLS handshake",
        "RFC 3207 §4.2 (MUST discard the EHLO argument); docs/rules.md §3.4",
        MUST,
    ),
    "mail-without-ehlo": (
        "accepts MAIL without any EHLO/HELO, so also right after the handshake",
        "RFC 5321 §4.1.4 puts EHLO first on the client; requiring it is the server's choice; docs/rules.md §3.4",
        DIFFERENCE,
    ),
    "envelope-across-tls": (
        "keeps the envelope across the TLS handshake",
        "RFC 3207 §4.2 (MUST discard knowledge from before the handshake); docs/rules.md §3.4",
        MUST,
    ),
    "starttls-twice": (
        "accepts STARTTLS inside TLS",
        "RFC 3207 §4.1 forbids the client to send it; refusing it (503) is the lab's choice; docs/rules.md §3.2",
        DIFFERENCE,
    ),
    "starttls-in-tls-ehlo": (
        "advertises STARTTLS inside TLS",
        "RFC 3207 §4.2 (MUST NOT list STARTTLS after the handshake); docs/rules.md §3.2",
        MUST,
    ),
    "starttls-argument": (
        "accepts STARTTLS with an argument",
        "RFC 3207 §4 (no parameters; 501 listed, no MUST); docs/rules.md §3.1",
        DIFFERENCE,
    ),
    "long-command-line": (
        "accepts a command line longer than 512 octets",
        "RFC 5321 §4.5.3.1 (512 is a minimum; implementations should avoid limits); docs/rules.md §3.6",
        DIFFERENCE,
    ),
    "nul-in-command": (
        "accepts a NUL byte in a command line",
        "docs/rules.md §3.6 (the lab refuses NUL; RFC 5321 §4.5.3.1 asks implementations to avoid limits)",
        DIFFERENCE,
    ),
}


class ProbeUnreachable(HarnessError):
    """No SMTP conversation was possible (refused, timed out, not a 220 greeting): exit 2, one line."""


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe needs; ``rcpt_to`` None means ``postmaster@`` the target's domain (or example.com)."""

    host: str
    port: int
    ehlo: str = DEFAULT_EHLO
    mail_from: str = DEFAULT_FROM
    rcpt_to: str | None = None
    ca_pems: tuple[bytes, ...] = ()
    server_name: str | None = None
    client_cert: CertKey | None = None
    timeout: float = 10.0  # one reply, one handshake, one connect
    settle: float = 0.5  # how long to listen inside TLS for replies to injected bytes
    source: str | None = None  # the address to connect from (None: the kernel's choice; the memory carrier needs one)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def recipient(self) -> str:
        return self.rcpt_to or default_recipient(self.server_name or self.host)


@dataclass(frozen=True)
class Finding:
    """One finding (a deviation: an RFC MUST or SHOULD broken; or a difference from the lab's own listener),
    with the transcript lines that prove it."""

    id: str
    evidence: tuple[str, ...]

    @property
    def title(self) -> str:
        return CHECKS[self.id][0]

    @property
    def rule(self) -> str:
        return CHECKS[self.id][1]

    @property
    def level(self) -> str:
        """``MUST`` or ``SHOULD`` (a deviation), or ``difference``."""
        return CHECKS[self.id][2]

    @property
    def is_deviation(self) -> bool:
        return self.level != DIFFERENCE

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "title": self.title, "rule": self.rule, "level": self.level}
        return {**out, "evidence": list(self.evidence)}


@dataclass
class Answer:
    """One question's connection: the engine's record plus what the TLS layer saw."""

    name: str
    header: str  # the note that opens this question in the probe's transcript
    record: ClientRecord
    cert_requested: bool = False
    ca_names: list[str] = field(default_factory=list)

    @property
    def observed(self) -> Observations:
        return self.record.observed

    @property
    def lines(self) -> list[Entry]:
        """The transcript entries of this question (the text view is ``render(lines)``)."""
        return self.record.entries

    def code(self, label: str) -> int | None:
        value = self.observed.get("replies", {}).get(label)
        return int(value) if value is not None else None

    def ok(self, label: str) -> bool:
        return positive(self.code(label))

    @property
    def tls(self) -> bool:
        return bool(self.observed.get("tls"))


@dataclass(frozen=True)
class ProbeReport:
    target: str
    policy: TLSMode
    verify_client: bool
    starttls_advertised: bool
    conclusive: bool
    basis: str
    evidence: tuple[str, ...]
    tls: dict[str, str] | None
    server_cert_verified: bool | None
    client_cert_requested: bool
    client_ca_names: tuple[str, ...]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...]
    checks: dict[str, dict[str, int]]
    transcript: tuple[str, ...]

    @property
    def deviations(self) -> tuple[Finding, ...]:
        """Findings that break an RFC MUST or SHOULD."""
        return tuple(f for f in self.findings if f.is_deviation)

    @property
    def differences(self) -> tuple[Finding, ...]:
        """Findings that only differ from the lab listener's own choices (docs/rules.md), not failures."""
        return tuple(f for f in self.findings if not f.is_deviation)

    @property
    def exit_code(self) -> int:
        """0: classified, no deviation; 1: deviations found or the classification is a guess (differences are
        not failures)."""
        return EXIT_FAILED if self.deviations or not self.conclusive else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "policy": str(self.policy),
            "verify_client": self.verify_client,
            "starttls_advertised": self.starttls_advertised,
            "conclusive": self.conclusive,
            "basis": self.basis,
            "evidence": list(self.evidence),
            "tls": self.tls,
            "server_cert_verified": self.server_cert_verified,
            "client_cert_requested": self.client_cert_requested,
            "client_ca_names": list(self.client_ca_names),
            "deviations": [f.to_dict() for f in self.deviations],
            "differences": [f.to_dict() for f in self.differences],
            "notes": list(self.notes),
            "checks": {name: dict(replies) for name, replies in self.checks.items()},
            "transcript": list(self.transcript),
        }

    def summary(self) -> list[str]:
        """The human view: policy and why, TLS facts, each deviation with its evidence, notes."""
        label = {TLSMode.NO: "No", TLSMode.PREFERRED: "Preferred", TLSMode.REQUIRED: "Required"}[self.policy]
        if self.verify_client:
            label += ", verify client certificate"
        guess = "" if self.conclusive else " (inconclusive: best guess)"
        out = [f"Target: {self.target}", f"Policy: {label}{guess}", f"  because {self.basis}"]
        if self.tls:
            out.append(f"TLS: {self.tls['version']} {self.tls['cipher']}")
        if self.server_cert_verified is not None:
            out.append(f"Server certificate: {'verified' if self.server_cert_verified else 'did NOT verify'}")
        if self.client_cert_requested:
            names = ", ".join(self.client_ca_names) or "no CA names"
            out.append(f"Client certificate: requested by the server ({names})")
        out.append(f"Deviations (an RFC MUST or SHOULD broken): {len(self.deviations) or 'none found'}")
        for finding in self.deviations:
            out.append(f"  {finding.id} [{finding.level}]: {finding.title} ({finding.rule})")
            out += [f"      {line}" for line in finding.evidence]
        out.append(f"Differences from the lab's own listener (not failures): {len(self.differences) or 'none'}")
        for finding in self.differences:
            out.append(f"  {finding.id}: {finding.title} ({finding.rule})")
            out += [f"      {line}" for line in finding.evidence]
        out += [f"Note: {note}" for note in self.notes]
        return out


def envelope_ok(answer: Answer | None, prefix: str) -> bool:
    """MAIL and RCPT (labelled ``PREFIX.MAIL``, ``PREFIX.RCPT``) both accepted."""
    return answer is not None and answer.ok(f"{prefix}MAIL") and answer.ok(f"{prefix}RCPT")


def tls_outcome(answer: Answer) -> str:
    """How a TLS session went, in a few words: ``handshake failed (...)``, ``EHLO 421``, ``MAIL/RCPT 554/554``."""
    if not answer.tls:
        return f"the handshake failed: {answer.observed.get('tls_error', 'no reason given')}"
    ehlo = answer.code("tls.EHLO")
    if not positive(ehlo):
        return f"EHLO {ehlo}" if ehlo is not None else "no reply to EHLO"
    return f"MAIL/RCPT {answer.code('tls.MAIL')}/{answer.code('tls.RCPT')}"


def positive(code: int | None) -> bool:
    return code is not None and 200 <= code < 400


def refused(code: int | None) -> bool:
    return code is not None and code >= 400


# -- evidence: verbatim transcript lines


def _is_sent(entry: Entry) -> bool:
    return entry.direction is Direction.SENT


def exchange(entries: Sequence[Entry], wanted: Callable[[Entry], bool], *, after: int = 0) -> list[Entry]:
    """The first sent entry from ``after`` on that ``wanted`` accepts, and what came back until the next one."""
    for i in range(after, len(entries)):
        if _is_sent(entries[i]) and wanted(entries[i]):
            out = [entries[i]]
            for entry in entries[i + 1 :]:
                if _is_sent(entry):
                    break
                out.append(entry)
            return out
    return []


def sent(command: str, *, tls: bool | None = None) -> Callable[[Entry], bool]:
    """A predicate: an entry the client sent (in plaintext, inside TLS, or either) starting with ``command``."""

    def wanted(entry: Entry) -> bool:
        layer = tls is None or entry.tls == tls
        return _is_sent(entry) and layer and entry.text.upper().startswith(command.upper())

    return wanted


def of_kind(kind: Kind) -> Callable[[Entry], bool]:
    """A predicate: a note or error of ``kind`` (``Kind.TLS_STARTED``, ...)."""
    return lambda entry: entry.kind is kind


def tls_started_at(entries: Sequence[Entry]) -> int | None:
    return next((i for i, entry in enumerate(entries) if entry.kind is Kind.TLS_STARTED), None)


def span(entries: Sequence[Entry], start: Callable[[Entry], bool], end: Callable[[Entry], bool]) -> list[Entry]:
    """From the first entry ``start`` accepts through the first entry after it that ``end`` accepts."""
    for i, entry in enumerate(entries):
        if start(entry):
            for j in range(i + 1, len(entries)):
                if end(entries[j]):
                    return list(entries[i : j + 1])
            return list(entries[i:])
    return []


class Prober:
    """Runs the questions one after another (each bounded by the engine's timeouts) and judges the answers."""

    def __init__(self, settings: ProbeSettings, carrier: ICarrier, workdir: Path) -> None:
        self.settings = settings
        self.carrier = carrier
        self.workdir = workdir
        # --cert for ``lab``; for ``untrusted`` one from a CA made up for this probe, which no server can trust
        self.certs = ClientCerts(workdir, settings.ehlo, lab=settings.client_cert, issue_lab=False)
        self.answers: dict[str, Answer] = {}
        self.transcript: list[str] = []
        self.findings: list[Finding] = []
        self.policy_evidence: list[str] = []
        self.notes: list[str] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        s = self.settings
        return self.carrier.connect(s.source, s.host, s.port, factory)

    async def ask(self, name: str, why: str, steps: Sequence[Step]) -> Answer:
        s = self.settings
        # a fresh factory per question: it notes whether this question's handshake asked for a certificate
        tls = ClientTLSFactory(server_name=s.server_name or s.host, trust_pems=s.ca_pems, certs=self.certs, watch=True)
        client = ScriptedClient(
            steps,
            clock=self.carrier.clock,
            connect=self.connect,
            tls_factory=tls,
            reply_timeout=self.settings.timeout,
            target=self.settings.address,
            settle=self.settings.settle,
            close_wait=min(5.0, self.settings.timeout),
        )
        record = await client.run()
        answer = Answer(name, f"{NOTE}probe {name}: {why}", record, tls.cert_requested, tls.ca_names)
        self.answers[name] = answer
        self.transcript.append(answer.header)
        self.transcript += record.transcript
        return answer

    def found(self, check: str, *parts: tuple[Answer, Sequence[Entry]]) -> None:
        """Record a deviation; each part is the lines of one question, shown under that question's header."""
        if check not in CHECKS:  # pragma: no cover - a typo in this module
            raise HarnessError(f"unknown probe check {check!r}")
        evidence: list[str] = []
        for answer, lines in parts:
            evidence += [answer.header, *render(lines)]
        self.findings.append(Finding(check, tuple(evidence)))

    def cite(self, answer: Answer | None, *wanted: Callable[[Entry], bool]) -> None:
        """Quote the exchanges of ``answer`` that the policy decision rests on."""
        if answer is None:
            return
        lines = [entry for predicate in wanted for entry in exchange(answer.lines, predicate)]
        if answer.tls and not any(entry.kind is Kind.TLS_STARTED for entry in lines):
            start = tls_started_at(answer.lines)
            lines += [answer.lines[start]] if start is not None else []
        if lines:
            self.policy_evidence += [answer.header, *render(lines)]

    # -- steps

    def greet(self) -> list[Step]:
        return [Ehlo(self.settings.ehlo)]

    def envelope(self, prefix: str) -> list[Step]:
        s = self.settings
        return [
            Send(f"MAIL FROM:<{s.mail_from}>", label=f"{prefix}MAIL"),
            Send(f"RCPT TO:<{s.recipient}>", label=f"{prefix}RCPT"),
            Send("RSET", label=f"{prefix}RSET"),
        ]

    def starttls(self, client_cert: str = "none", **kwargs: Any) -> StartTLS:
        return StartTLS(tls=TLSOptions(client_cert=client_cert), **kwargs)

    def mail_after_handshake(self, client_cert: str, mail_label: str) -> list[Step]:
        """STARTTLS, then MAIL straight away (no EHLO inside TLS), RSET and QUIT: does the server keep state?"""
        return [
            self.starttls(client_cert, label="STARTTLS"),
            Send(f"MAIL FROM:<{self.settings.mail_from}>", label=mail_label),
            Send("RSET"),
            Quit(),
        ]

    # -- the run

    async def run(self) -> ProbeReport:
        s = self.settings
        plain = await self.ask(
            "plain", "EHLO, MAIL and RCPT in plaintext", [*self.greet(), *self.envelope("plain."), Quit()]
        )
        self._check_reachable(plain)
        advertised = bool(plain.observed.get("starttls_advertised"))
        await self._line_limits()
        if not advertised:
            return await self._not_advertised(plain)

        main = await self.ask(
            "tls",
            "STARTTLS, EHLO, MAIL and RCPT inside TLS, then STARTTLS again",
            [
                *self.greet(),
                self.starttls(label="tls.STARTTLS"),
                Ehlo(s.ehlo, label="tls.EHLO"),
                *self.envelope("tls."),
                self.starttls(label="tls.STARTTLS#2"),
                Quit(),
            ],
        )
        if main.code("tls.STARTTLS") != 220:
            return self._advertised_but_refused(plain, main)
        if not main.tls:
            self.notes.append(f"the TLS handshake failed: {main.observed.get('tls_error', 'no reason given')}")
        with_cert = untrusted = None
        if main.cert_requested or main.observed.get("tls_error"):
            if s.client_cert is not None:
                with_cert = await self._tls_envelope("tls-cert", "with the client certificate given", "lab")
            why = "with a client certificate nobody trusts"
            untrusted = await self._tls_envelope("tls-untrusted", why, "untrusted")
        candidates = [a for a in (main, with_cert) if a is not None]
        session = next((a for a in candidates if a.tls and a.ok("tls.EHLO")), None)
        if session is not None:
            self._judge_tls_session(session)
        elif main.tls:
            self.notes.append(
                f"EHLO inside TLS is answered {main.code('tls.EHLO')}, so STARTTLS inside TLS could not be checked"
            )
        usable = next((a for a in candidates if a.ok("tls.MAIL")), None)
        if usable is not None:
            await self._state_checks(plain, usable)
        elif main.tls:
            self.notes.append("MAIL is refused inside TLS, so the state-across-TLS checks were not run")
        await self._injection(with_cert is not None and with_cert.tls)
        await self._argument()
        policy, verify, conclusive, basis = self._classify(plain, main, with_cert, untrusted)
        if policy is TLSMode.REQUIRED:
            await self._helo()
        answers = tuple(a for a in (plain, main, with_cert, untrusted) if a is not None)
        return self._build(policy, verify, True, conclusive, basis, main if main.tls else None, answers)

    def _check_reachable(self, plain: Answer) -> None:
        obs = plain.observed
        if not obs.get("connected"):
            errors = [entry.text for entry in plain.lines if entry.direction is Direction.ERROR]
            why = errors[-1] if errors else "no greeting"
            raise ProbeUnreachable(f"cannot probe {self.settings.address}: {why}")
        if obs.get("banner") != 220:
            greeting = next((e.line for e in plain.lines if e.direction is Direction.RECEIVED and not e.tls), "")
            raise ProbeUnreachable(
                f"cannot probe {self.settings.address}: greeting {obs.get('banner')} ({greeting.strip()})"
            )

    async def _tls_envelope(self, name: str, why: str, client_cert: str) -> Answer:
        steps = [
            *self.greet(),
            self.starttls(client_cert, label="tls.STARTTLS"),
            Ehlo(self.settings.ehlo, label="tls.EHLO"),
        ]
        steps += [*self.envelope("tls."), self.starttls(client_cert, label="tls.STARTTLS#2"), Quit()]
        return await self.ask(name, f"MAIL and RCPT inside TLS {why}, then STARTTLS again", steps)

    async def _not_advertised(self, plain: Answer) -> ProbeReport:
        steps = [*self.greet(), self.starttls(label="STARTTLS"), Quit()]
        answer = await self.ask("no-tls", "STARTTLS although EHLO did not offer it", steps)
        code = answer.code("STARTTLS")
        self.cite(answer, sent("STARTTLS"))
        basis = f"EHLO does not advertise STARTTLS and STARTTLS is answered {code}"
        if answer.tls:
            self.found("starttls-unadvertised", (answer, exchange(answer.lines, sent("STARTTLS"))))
            basis = "EHLO does not advertise STARTTLS (a client never starts TLS; the server would)"
        if not (plain.ok("plain.MAIL") and plain.ok("plain.RCPT")):
            self.notes.append(
                f"plaintext MAIL/RCPT answered {plain.code('plain.MAIL')}/{plain.code('plain.RCPT')}: "
                "the envelope is refused for another reason (try --from / --to)"
            )
        return self._build(TLSMode.NO, False, False, True, basis, answer if answer.tls else None, (plain, answer))

    def _advertised_but_refused(self, plain: Answer, main: Answer) -> ProbeReport:
        code = main.code("tls.STARTTLS")
        self.cite(main, sent("STARTTLS"))
        self.found("starttls-refused", (main, exchange(main.lines, sent("STARTTLS"))))
        basis = f"EHLO advertises STARTTLS but STARTTLS is answered {code}: no TLS is possible"
        return self._build(TLSMode.NO, False, True, True, basis, None, (plain, main))

    def _judge_tls_session(self, session: Answer) -> None:
        """Inside TLS: does EHLO list STARTTLS, and is a second STARTTLS accepted?"""
        start = tls_started_at(session.lines) or 0
        ehlo = exchange(session.lines, sent("EHLO", tls=True), after=start)
        listed = [e for e in ehlo[1:] if e.direction is Direction.RECEIVED and e.tls and "STARTTLS" in e.text.upper()]
        if listed:
            self.found("starttls-in-tls-ehlo", (session, [ehlo[0], *listed]))
        if session.code("tls.STARTTLS#2") == 220:
            self.found("starttls-twice", (session, exchange(session.lines, sent("STARTTLS", tls=True))))

    async def _state_checks(self, plain: Answer, usable: Answer) -> None:
        cert = "lab" if usable.name == "tls-cert" else "none"
        s = self.settings
        state = await self.ask(
            "state",
            "MAIL right after the handshake, without a new EHLO",
            [*self.greet(), *self.mail_after_handshake(cert, "state.MAIL")],
        )
        if state.ok("state.MAIL"):
            await self._no_greeting_control(state, cert)
        if not plain.ok("plain.MAIL"):
            return
        envelope = await self.ask(
            "envelope",
            "MAIL in plaintext, then STARTTLS, EHLO and RCPT inside TLS",
            [
                *self.greet(),
                Send(f"MAIL FROM:<{s.mail_from}>", label="envelope.MAIL"),
                self.starttls(cert, label="STARTTLS"),
                Ehlo(s.ehlo),
                Send(f"RCPT TO:<{s.recipient}>", label="envelope.RCPT"),
                Send("RSET"),
                Quit(),
            ],
        )
        if envelope.ok("envelope.MAIL") and envelope.ok("envelope.RCPT"):
            lines = exchange(envelope.lines, sent("MAIL", tls=False)) + exchange(envelope.lines, sent("RCPT", tls=True))
            self.found("envelope-across-tls", (envelope, lines))

    async def _no_greeting_control(self, state: Answer, cert: str) -> None:
        """MAIL after the handshake without a new EHLO was accepted: kept state, or is EHLO never needed?

        The control connection never greets at all (STARTTLS straight after the banner, then MAIL). A server
        that accepts that does not require EHLO anywhere (Postfix: ``smtpd_helo_required = no``), which is a
        different finding from remembering the greeting across the handshake.
        """
        evidence = (state, exchange(state.lines, sent("MAIL", tls=True)))
        control = await self.ask(
            "no-greeting",
            "control: STARTTLS and MAIL without any EHLO/HELO on the connection",
            self.mail_after_handshake(cert, "nogreeting.MAIL"),
        )
        if control.tls and control.ok("nogreeting.MAIL"):
            self.found("mail-without-ehlo", evidence, (control, exchange(control.lines, sent("MAIL", tls=True))))
            return
        self.found("state-across-tls", evidence)
        if not (control.tls and refused(control.code("nogreeting.MAIL"))):
            self.notes.append(
                "state-across-tls: the control without any EHLO could not run (STARTTLS before EHLO answered "
                f"{control.code('STARTTLS')}), so a server that never requires EHLO looks the same"
            )

    async def _injection(self, use_cert: bool) -> None:
        answer = await self.ask(
            "injection",
            "STARTTLS and NOOP in one write; does a reply arrive inside TLS before we send anything?",
            [
                *self.greet(),
                self.starttls("lab" if use_cert else "none", inject=b"NOOP\r\n", label="STARTTLS"),
                Ehlo(self.settings.ehlo),
                Quit(),
            ],
        )
        if answer.observed.get("injection_executed"):
            lines = span(answer.lines, sent("STARTTLS", tls=False), lambda entry: entry.direction is Direction.ERROR)
            self.found("starttls-injection", (answer, lines))
        if answer.observed.get("response_injection_discarded"):
            lines = span(answer.lines, sent("STARTTLS", tls=False), of_kind(Kind.RESPONSE_INJECTION_DISCARDED))
            self.found("starttls-pipelined-plaintext", (answer, lines))
        if answer.code("STARTTLS") == 220 and not answer.tls:
            self.notes.append("the handshake after STARTTLS+NOOP failed: " + str(answer.observed.get("tls_error")))

    async def _argument(self) -> None:
        answer = await self.ask(
            "argument",
            "STARTTLS with an argument",
            [*self.greet(), self.starttls(argument=STARTTLS_ARGUMENT, label="STARTTLS"), Quit()],
        )
        if answer.code("STARTTLS") == 220:
            self.found("starttls-argument", (answer, exchange(answer.lines, sent("STARTTLS"))))

    async def _helo(self) -> None:
        answer = await self.ask("helo", "HELO before STARTTLS", [Helo(self.settings.ehlo, label="HELO"), Quit()])
        if answer.ok("HELO"):
            self.found("helo-before-starttls", (answer, exchange(answer.lines, sent("HELO"))))

    async def _line_limits(self) -> None:
        answer = await self.ask(
            "limits",
            "a 607-octet command line and a NUL byte in a command, in plaintext",
            [
                *self.greet(),
                Raw((LONG_LINE,), replies=1, label="LONG"),
                Raw((b"NOOP \x00\r\n",), replies=1, label="NUL"),
                Quit(),
            ],
        )
        if answer.ok("LONG"):
            self.found("long-command-line", (answer, exchange(answer.lines, sent("NOOP XXX"))))
        if answer.ok("NUL"):
            self.found("nul-in-command", (answer, exchange(answer.lines, sent("NOOP \\x00"))))

    # -- judging

    def _classify(
        self, plain: Answer, main: Answer, with_cert: Answer | None, untrusted: Answer | None
    ) -> tuple[TLSMode, bool, bool, str]:
        """(policy, verify_client, conclusive, basis) from the answers; STARTTLS was advertised and got 220."""
        plain_codes = f"{plain.code('plain.MAIL')}/{plain.code('plain.RCPT')}"
        requested = any(a is not None and a.cert_requested for a in (main, with_cert, untrusted))
        refused_no_cert = not main.ok("tls.MAIL")
        refused_untrusted = untrusted is not None and not untrusted.ok("tls.MAIL")
        verify = requested and (refused_no_cert or refused_untrusted)
        conclusive = True
        self.cite(plain, sent("MAIL"), sent("RCPT"))
        self.cite(main, sent("STARTTLS", tls=False), sent("EHLO", tls=True), sent("MAIL", tls=True))
        self.cite(with_cert, sent("MAIL", tls=True))
        self.cite(untrusted, sent("MAIL", tls=True))
        if envelope_ok(plain, "plain."):
            policy = TLSMode.PREFERRED
            basis = f"STARTTLS is advertised and plaintext MAIL/RCPT are accepted ({plain_codes})"
        elif envelope_ok(main, "tls.") or envelope_ok(with_cert, "tls."):
            policy = TLSMode.REQUIRED
            how = "inside TLS" if envelope_ok(main, "tls.") else "inside TLS with the client certificate"
            basis = f"plaintext MAIL/RCPT are refused ({plain_codes}) and accepted {how}"
        elif requested and refused_no_cert:
            policy = TLSMode.REQUIRED
            basis = (
                f"plaintext MAIL/RCPT are refused ({plain_codes}) and, without a verifying client certificate, "
                f"inside TLS too ({tls_outcome(main)}); the handshake asks for a client certificate"
            )
            if with_cert is None:
                self.notes.append("give --cert/--key with a certificate the target trusts to confirm MAIL after TLS")
        elif (
            plain.ok("plain.MAIL") and not plain.ok("plain.RCPT") and main.code("tls.RCPT") == plain.code("plain.RCPT")
        ):
            policy, conclusive = TLSMode.PREFERRED, False
            basis = f"plaintext MAIL is accepted; RCPT is refused in plaintext and in TLS alike ({plain_codes})"
            self.notes.append(f"the recipient <{self.settings.recipient}> is refused everywhere: give --to")
        else:
            policy, conclusive = TLSMode.REQUIRED, False
            basis = (
                f"plaintext MAIL/RCPT are refused ({plain_codes}) and it could not be confirmed inside TLS "
                f"({tls_outcome(main)})"
            )
            self.notes.append("try another --from / --to, or --cert/--key")
        if verify and not refused_no_cert:
            basis += "; a client certificate that does not verify is refused"
        return policy, verify, conclusive, basis

    def _build(
        self,
        policy: TLSMode,
        verify: bool,
        advertised: bool,
        conclusive: bool,
        basis: str,
        tls_answer: Answer | None,
        answers: Sequence[Answer],
    ) -> ProbeReport:
        tls = None
        verified = None
        if tls_answer is not None and tls_answer.tls:
            obs = tls_answer.observed
            tls = {"version": str(obs.get("tls_version")), "cipher": str(obs.get("tls_cipher"))}
            verified = obs.get("server_cert_verified") if self.settings.ca_pems else None
        requested = [a for a in answers if a.cert_requested]
        return ProbeReport(
            target=self.settings.address,
            policy=policy,
            verify_client=verify,
            starttls_advertised=advertised,
            conclusive=conclusive,
            basis=basis,
            evidence=tuple(self.policy_evidence),
            tls=tls,
            server_cert_verified=verified,
            client_cert_requested=bool(requested),
            client_ca_names=tuple(requested[0].ca_names) if requested else (),
            findings=tuple(self.findings),
            notes=tuple(self.notes),
            checks={name: dict(a.observed.get("replies", {})) for name, a in self.answers.items()},
            transcript=tuple(self.transcript),
        )


def probe(settings: ProbeSettings, carrier: ICarrier | None = None) -> Deferred[ProbeReport]:
    """Deferred[ProbeReport]; fails with ``ProbeUnreachable`` when no SMTP conversation is possible.

    ``carrier`` reaches the target (default: real TCP on the global reactor); the probe's waits run on its clock,
    so over the memory carrier a whole probe takes no wall-clock time.
    """
    net = carrier if carrier is not None else tcp_carrier(settings)

    async def main() -> ProbeReport:
        with tempfile.TemporaryDirectory(prefix="smtplab-probe-") as workdir:
            return await Prober(settings, net, Path(workdir)).run()

    return Deferred.fromCoroutine(main())


def tcp_carrier(settings: ProbeSettings, reactor: Any = None) -> ICarrier:
    """Real TCP to the target, connects bounded by the settings' timeout."""
    return open_carrier(EXTERNAL_CARRIER, reactor=reactor, connect_timeout=max(1, int(settings.timeout)))


def run_probe(settings: ProbeSettings, carrier: ICarrier | None = None) -> ProbeReport:
    """The probe for a synchronous caller: the carrier drives it to the end (``smtplab probe``)."""
    net = carrier if carrier is not None else tcp_carrier(settings)
    try:
        report: ProbeReport = net.run_until(probe(settings, net), timeout=PROBE_BUDGET * settings.timeout)
    finally:
        net.run_until(net.close(), timeout=10)
    return report
