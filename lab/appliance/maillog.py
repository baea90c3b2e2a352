"""The appliance's mail log: one line per event, keyed by connection (ICID) and message (MID).

The grammar follows what an ESA operator reads (``New SMTP ICID 5 ...``, ``MID 1 ICID 5 From: <...>``) and is
documented in docs/maillog.md. It is a contract: the runner, the reports and students' grep commands read these
lines, so every event has one regular expression in ``GRAMMAR`` and ``parse_line`` turns a line back into fields.
"""

from __future__ import annotations

import calendar
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from lab.errors import BadInput

PREVIEW_BYTES = 64  # how much of discarded injected bytes the log shows
TAIL_LINES = 1000  # the most recent lines a MailLog keeps in memory (``lines``); everything goes to the sink

_INT_FIELDS = {"icid", "mid", "rid", "dcid", "nbytes", "port", "max_age"}


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern + r"\Z")


# Event name -> the regular expression of its text (after "<timestamp> <Level>: "). Order matters only for
# reading: patterns are tried top to bottom, so more specific ones come first.
GRAMMAR: dict[str, re.Pattern[str]] = {
    "new_connection": _rx(
        r"New SMTP ICID (?P<icid>\d+) interface (?P<interface>\S+) \((?P<interface_addr>[^)]*)\)"
        r" address (?P<peer_ip>\S+) reverse dns host (?P<rdns>\S+) verified (?P<verified>yes|no)"
    ),
    "policy": _rx(
        r"ICID (?P<icid>\d+) (?P<behaviour>[A-Z]+) SG (?P<group>\S+) match (?P<member>\S+)"
        r"(?: policy (?P<policy>\S+))?"
    ),
    "tls_success": _rx(r"ICID (?P<icid>\d+) TLS success protocol (?P<protocol>\S+) cipher (?P<cipher>\S+)"),
    "tls_failed": _rx(r"ICID (?P<icid>\d+) TLS failed: (?P<reason>.*)"),
    "demo_certificate": _rx(r"ICID (?P<icid>\d+) TLS warning: presented the demo certificate \(insecure\)"),
    "client_cert": _rx(
        r"ICID (?P<icid>\d+) TLS client certificate (?P<state>none|verified|unverified)(?: subject (?P<subject>.*))?"
    ),
    "injection_discarded": _rx(
        r"ICID (?P<icid>\d+) STARTTLS command injection: discarded (?P<nbytes>\d+) bytes received after STARTTLS:"
        r" '(?P<preview>.*)'"
    ),
    "refused": _rx(r"ICID (?P<icid>\d+) refused: (?P<reason>.*)"),
    "message_refused": _rx(r"ICID (?P<icid>\d+) message refused: (?P<reason>.*)"),
    "rcpt_rejected": _rx(r"ICID (?P<icid>\d+) RID (?P<rid>\d+) rejected: (?P<addr><[^>]*>) (?P<reason>.*)"),
    "protocol_error": _rx(r"ICID (?P<icid>\d+) protocol error: (?P<what>.*)"),
    "close": _rx(r"ICID (?P<icid>\d+) close(?: by (?P<by>\S+))?"),
    "mid_start": _rx(r"Start MID (?P<mid>\d+) ICID (?P<icid>\d+)"),
    "mid_from": _rx(r"MID (?P<mid>\d+) ICID (?P<icid>\d+) From: (?P<addr><[^>]*>)"),
    "mid_rcpt": _rx(r"MID (?P<mid>\d+) ICID (?P<icid>\d+) RID (?P<rid>\d+) To: (?P<addr><[^>]*>)"),
    "mid_ready": _rx(r"MID (?P<mid>\d+) ready (?P<nbytes>\d+) bytes"),
    "mid_spooled": _rx(r"MID (?P<mid>\d+) spooled (?P<path>.+)"),
    # -- delivery connections (DCID): the appliance as a sender
    "dcid_new": _rx(
        r"New SMTP DCID (?P<dcid>\d+) interface (?P<interface_addr>\S+) address (?P<peer_ip>\S+) port (?P<port>\d+)"
    ),
    "dcid_route": _rx(
        r"DCID (?P<dcid>\d+) domain (?P<domain>\S+) mx (?P<mx>\S+) TLS (?P<setting>[A-Za-z]+(?: \(Verify\))?)"
    ),
    "delivery_start": _rx(r"Delivery start DCID (?P<dcid>\d+) MID (?P<mid>\d+) to RID \[(?P<rids>\d+(?:, \d+)*)\]"),
    "dcid_tls_success": _rx(r"DCID (?P<dcid>\d+) TLS success protocol (?P<protocol>\S+) cipher (?P<cipher>\S+)"),
    "dcid_tls_failed": _rx(r"DCID (?P<dcid>\d+) TLS failed: (?P<reason>.*)"),
    "dcid_certificate": _rx(r"DCID (?P<dcid>\d+) TLS certificate (?P<state>verified|unverified)(?:: (?P<reason>.*))?"),
    "dcid_no_starttls": _rx(r"DCID (?P<dcid>\d+) STARTTLS command not supported"),
    "dcid_mtasts": _rx(
        r"DCID (?P<dcid>\d+) MTA-STS (?P<mode>enforce|testing|none) mx (?P<mx>\S+): (?P<result>[a-z-]+)"
        r"(?: - (?P<action>.*))?"
    ),
    "dcid_tls_required": _rx(
        r"DCID (?P<dcid>\d+) IP (?P<peer_ip>\S+) TLS was required but could not be successfully negotiated"
    ),
    "message_done": _rx(r"Message done DCID (?P<dcid>\d+) MID (?P<mid>\d+) to RID \[(?P<rids>\d+(?:, \d+)*)\]"),
    "delayed": _rx(r"Delayed: DCID (?P<dcid>\d+) MID (?P<mid>\d+) to RID (?P<rid>\d+) - (?P<reason>.*)"),
    "bounced": _rx(r"Bounced: DCID (?P<dcid>\d+) MID (?P<mid>\d+) to RID (?P<rid>\d+) - (?P<reason>.*)"),
    "dcid_close": _rx(r"DCID (?P<dcid>\d+) close"),
    "dcid_error": _rx(r"DCID (?P<dcid>\d+) connection error: (?P<reason>.*)"),
    "mtasts_policy": _rx(
        r"MTA-STS domain (?P<domain>\S+) policy (?P<mode>enforce|testing|none) max_age (?P<max_age>\d+)"
        r" (?P<source>fetched|cached)"
    ),
    "mtasts_error": _rx(r"MTA-STS domain (?P<domain>\S+) (?P<result_type>sts-[a-z-]+): (?P<reason>.*)"),
    "tlsrpt_report": _rx(
        r"TLS-RPT report domain (?P<domain>\S+) day (?P<day>\d{4}-\d\d-\d\d) file (?P<file>\S+)"
        r"(?: MID (?P<mid>\d+))?"
    ),
    "alert": _rx(r"Alert: (?P<severity>Critical|Warning|Information) (?P<alert_class>[A-Z][A-Za-z]*): (?P<text>.*)"),
    "spool_leftover": _rx(
        r"Spool recovery: removed (?P<path>.+) \((?P<nbytes>\d+) bytes, (?P<state>delivered|incomplete)\)"
    ),
}

_LINE = re.compile(
    r"(?P<timestamp>[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}) (?P<level>[A-Z][a-z]+): (?P<text>.*)\Z"
)


def format_timestamp(epoch: float) -> str:
    """The appliance's fixed-width stamp, in UTC so that logs are comparable: ``Tue Dec  1 19:40:05 2026``."""
    return time.asctime(time.gmtime(int(epoch)))


def parse_timestamp(stamp: str) -> float:
    return float(calendar.timegm(time.strptime(stamp, "%a %b %d %H:%M:%S %Y")))


def _text(value: object) -> str:
    """Printable ASCII: anything else (CR, LF, NUL, U+2028...) becomes an escape, so one event is one line."""
    raw = str(value.value if isinstance(value, Enum) else value)
    if raw.isascii() and raw.isprintable():  # the common case: nothing to escape (0x20-0x7e)
        return raw
    return "".join(ch if 0x20 <= ord(ch) < 0x7F else ascii(ch)[1:-1] for ch in raw)


def _token(value: object) -> str:
    """A field that must stay one word in the grammar."""
    return _text(value).replace(" ", "_") or "-"  # after _text the only white space left is the space


def _addr(addr: str) -> str:
    inner = _text(addr).strip()
    if inner.startswith("<") and inner.endswith(">"):
        inner = inner[1:-1]
    return "<" + inner.replace(">", "\\x3e") + ">"


def _preview(data: bytes | bytearray | memoryview | str) -> str:
    """``'MAIL FROM:<x>\\r\\n...'``: like a Python bytes repr without the b, cut at PREVIEW_BYTES."""
    data = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else bytes(data)
    out = []
    for byte in data[:PREVIEW_BYTES]:
        if byte == 0x0D:
            out.append("\\r")
        elif byte == 0x0A:
            out.append("\\n")
        elif byte == 0x09:
            out.append("\\t")
        elif byte in (0x27, 0x5C):
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out) + ("..." if len(data) > PREVIEW_BYTES else "")


class MailLog:
    """Appliance-wide log and ID counters; writes each line through to its sink at once.

    Memory stays bounded however long ``smtplab serve`` runs: only the last ``tail`` lines stay in ``lines``.
    Whoever needs every line of a bounded stretch (the runner, one run) collects them through ``echo``.
    """

    def __init__(
        self,
        sink: TextIO | Path | None = None,
        clock: Callable[[], float] = time.time,
        echo: Callable[[str], None] | None = None,
        tail: int = TAIL_LINES,
        flush_soon: Callable[[Callable[[], None]], object] | None = None,
        ids: tuple[int, int] = (1, 1),
    ) -> None:
        """``flush_soon(f)``: call ``f`` shortly (``smtplab serve``: once the reactor's current turn is over), so
        the lines of one turn reach the sink in one write; without it every line is flushed as it is written.
        ``ids``: the first ICID/MID/DCID and the step between two (``smtplab serve --workers N``: worker K counts
        K, K+N, K+2N ..., so that IDs stay unique across the processes writing one log)."""
        self.lines: deque[str] = deque(maxlen=tail)
        self._clock = clock
        self._echo = echo
        self._owned: TextIO | None = None
        if isinstance(sink, Path):
            sink.parent.mkdir(parents=True, exist_ok=True)
            self._owned = sink.open("a", encoding="utf-8", buffering=-1 if flush_soon else 1)
            self._sink: TextIO | None = self._owned
        else:
            self._sink = sink
        self._counters = {"icid": 0, "mid": 0, "dcid": 0}
        self._first_id, self._id_step = ids
        self._flush_soon = flush_soon
        self._flush_pending = False
        self._stamp: tuple[int, str] = (-1, "")  # the last second formatted, and its text

    # -- counters -----------------------------------------------------------------------------------------------
    def _next(self, kind: str) -> int:
        self._counters[kind] += 1
        return self._first_id + (self._counters[kind] - 1) * self._id_step

    def next_icid(self) -> int:
        return self._next("icid")

    def next_mid(self) -> int:
        return self._next("mid")

    def next_dcid(self) -> int:
        return self._next("dcid")

    # -- output -------------------------------------------------------------------------------------------------
    def write(self, event: str, level: str = "Info") -> str:
        """Stamp and emit one event text; returns the full line (without newline)."""
        second = int(self._clock())
        if second != self._stamp[0]:
            self._stamp = (second, format_timestamp(second))
        line = f"{self._stamp[1]} {level}: {event}"
        self.lines.append(line)
        if self._sink is not None:
            self._sink.write(line + "\n")
            if self._flush_soon is None:
                self._sink.flush()
            elif not self._flush_pending:
                self._flush_pending = True
                self._flush_soon(self.flush)
        if self._echo is not None:
            self._echo(line)
        return line

    def flush(self) -> None:
        """Hand what was written to the sink's file (or stream) now."""
        self._flush_pending = False
        if self._sink is not None:
            self._sink.flush()

    def close_file(self) -> None:
        """Close the log file if this MailLog opened it (a sink passed in stays the caller's)."""
        self.flush()
        if self._owned is not None:
            self._owned.close()
            self._owned = None
            self._sink = None

    def __enter__(self) -> MailLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close_file()

    # -- incoming connections (ICID) ----------------------------------------------------------------------------
    def new_connection(
        self, icid: int, interface: str, interface_addr: str, peer_ip: str, rdns_name: str | None, verified: bool
    ) -> str:
        host = _token(rdns_name) if rdns_name else "unknown"
        return self.write(
            f"New SMTP ICID {icid} interface {_token(interface)} ({_text(interface_addr)}) address {_token(peer_ip)}"
            f" reverse dns host {host} verified {'yes' if verified and rdns_name else 'no'}"
        )

    def policy(self, icid: int, behaviour: object, group: str, member: str | None, policy: str | None = None) -> str:
        text = f"ICID {icid} {_token(behaviour).upper()} SG {_token(group)} match {_token(member or '(none)')}"
        return self.write(text + (f" policy {_token(policy)}" if policy else ""))

    def tls_success(self, icid: int, protocol: str, cipher: str) -> str:
        return self.write(f"ICID {icid} TLS success protocol {_token(protocol)} cipher {_token(cipher)}")

    def tls_failed(self, icid: int, reason: str) -> str:
        return self.write(f"ICID {icid} TLS failed: {_text(reason)}")

    def demo_certificate(self, icid: int) -> str:
        """Flags that this connection was offered the built-in demo certificate (anyone can impersonate it)."""
        return self.write(f"ICID {icid} TLS warning: presented the demo certificate (insecure)", level="Warning")

    def client_cert(self, icid: int, state: object, subject: str | None) -> str:
        text = f"ICID {icid} TLS client certificate {_token(state).lower()}"
        return self.write(text + (f" subject {_text(subject)}" if subject else ""))

    def injection_discarded(self, icid: int, nbytes: int, preview: bytes | bytearray | str) -> str:
        return self.write(
            f"ICID {icid} STARTTLS command injection: discarded {int(nbytes)} bytes received after STARTTLS:"
            f" '{_preview(preview)}'",
            level="Warning",
        )

    def refused(self, icid: int, reason: str) -> str:
        """The connection was turned away (REJECT, TCPREFUSE, too many connections)."""
        return self.write(f"ICID {icid} refused: {_text(reason)}")

    def message_refused(self, icid: int, reason: str) -> str:
        return self.write(f"ICID {icid} message refused: {_text(reason)}")

    def rcpt_rejected(self, icid: int, rid: int, addr: str, reason: str) -> str:
        return self.write(f"ICID {icid} RID {int(rid)} rejected: {_addr(addr)} {_text(reason)}")

    def protocol_error(self, icid: int, what: str) -> str:
        """Overlong line, NUL, bare LF, timeout: what the listener refused and why."""
        return self.write(f"ICID {icid} protocol error: {_text(what)}")

    def close(self, icid: int, by: str | None = None) -> str:
        """The connection ended; ``by`` (``client`` / ``server``) says who closed first, when known."""
        return self.write(f"ICID {icid} close" + (f" by {_token(by)}" if by else ""))

    # -- messages (MID) -----------------------------------------------------------------------------------------
    def mid_start(self, mid: int, icid: int) -> str:
        return self.write(f"Start MID {mid} ICID {icid}")

    def mid_from(self, mid: int, icid: int, addr: str) -> str:
        return self.write(f"MID {mid} ICID {icid} From: {_addr(addr)}")

    def mid_rcpt(self, mid: int, icid: int, rid: int, addr: str) -> str:
        return self.write(f"MID {mid} ICID {icid} RID {int(rid)} To: {_addr(addr)}")

    def mid_ready(self, mid: int, nbytes: int) -> str:
        return self.write(f"MID {mid} ready {int(nbytes)} bytes")

    def mid_spooled(self, mid: int, path: str | Path) -> str:
        return self.write(f"MID {mid} spooled {_text(path)}")

    # -- the spool ----------------------------------------------------------------------------------------------
    def spool_leftover(self, path: str | Path, nbytes: int, delivered: bool) -> str:
        """At start: a file an interrupted delivery left in a Maildir's ``tmp/`` was removed.

        ``delivered``: the crash came after the link into ``new/`` (the message is there); otherwise it never
        reached ``new/`` and was never acknowledged, so its client retries.
        """
        state = "delivered" if delivered else "incomplete"
        return self.write(f"Spool recovery: removed {_text(path)} ({int(nbytes)} bytes, {state})", level="Warning")

    # -- delivery connections (DCID) ----------------------------------------------------------------------------
    def dcid_new(self, dcid: int, interface_addr: str, peer_ip: str, port: int) -> str:
        return self.write(
            f"New SMTP DCID {dcid} interface {_token(interface_addr)} address {_token(peer_ip)} port {int(port)}"
        )

    def dcid_route(self, dcid: int, domain: str, mx: str, setting: str) -> str:
        """The destination control applied to this connection (``setting``: No, Preferred, Required,
        Preferred (Verify), Required (Verify))."""
        return self.write(f"DCID {dcid} domain {_token(domain)} mx {_token(mx)} TLS {_text(setting)}")

    def delivery_start(self, dcid: int, mid: int, rids: Sequence[int]) -> str:
        return self.write(f"Delivery start DCID {dcid} MID {mid} to RID [{', '.join(str(int(r)) for r in rids)}]")

    def dcid_tls_success(self, dcid: int, protocol: str, cipher: str) -> str:
        return self.write(f"DCID {dcid} TLS success protocol {_token(protocol)} cipher {_token(cipher)}")

    def dcid_tls_failed(self, dcid: int, reason: str) -> str:
        return self.write(f"DCID {dcid} TLS failed: {_text(reason)}")

    def dcid_certificate(self, dcid: int, verified: bool, reason: str | None = None) -> str:
        text = f"DCID {dcid} TLS certificate {'verified' if verified else 'unverified'}"
        return self.write(text + (f": {_text(reason)}" if reason else ""), level="Info" if verified else "Warning")

    def dcid_no_starttls(self, dcid: int) -> str:
        return self.write(f"DCID {dcid} STARTTLS command not supported")

    def dcid_tls_required(self, dcid: int, peer_ip: str) -> str:
        return self.write(
            f"DCID {dcid} IP {_token(peer_ip)} TLS was required but could not be successfully negotiated",
            level="Warning",
        )

    def dcid_mtasts(self, dcid: int, mode: str, mx: str, result: str | None, action: str | None = None) -> str:
        """The MTA-STS check of one MX (RFC 8461 4): ``result`` is the RFC 8460 result type, None when it passed;
        ``action`` what became of the messages (not delivered, delivered anyway)."""
        text = f"DCID {dcid} MTA-STS {_token(mode)} mx {_token(mx)}: {_token(result or 'ok')}"
        return self.write(text + (f" - {_text(action)}" if action else ""), level="Warning" if result else "Info")

    def mtasts_policy(self, domain: str, mode: str, max_age: int, source: str) -> str:
        """The MTA-STS policy in force for ``domain``: just ``fetched`` from its policy host, or still the ``cached``
        one after a failed refetch (RFC 8461 5.1)."""
        return self.write(f"MTA-STS domain {_token(domain)} policy {_token(mode)} max_age {int(max_age)} {source}")

    def mtasts_error(self, domain: str, result_type: str, reason: str) -> str:
        """``domain`` publishes MTA-STS (TXT) but its policy could not be had: the RFC 8460 result type and why."""
        return self.write(f"MTA-STS domain {_token(domain)} {_token(result_type)}: {_text(reason)}", level="Warning")

    def message_done(self, dcid: int, mid: int, rids: Sequence[int]) -> str:
        return self.write(f"Message done DCID {dcid} MID {mid} to RID [{', '.join(str(int(r)) for r in rids)}]")

    def delayed(self, dcid: int, mid: int, rid: int, reason: str) -> str:
        return self.write(f"Delayed: DCID {dcid} MID {mid} to RID {rid} - {_text(reason)}")

    def bounced(self, dcid: int, mid: int, rid: int, reason: str) -> str:
        return self.write(f"Bounced: DCID {dcid} MID {mid} to RID {rid} - {_text(reason)}")

    def dcid_close(self, dcid: int) -> str:
        return self.write(f"DCID {dcid} close")

    def dcid_error(self, dcid: int, reason: str) -> str:
        """The connection carried nothing for a reason other than TLS: refused, timed out, greeted with 421..."""
        return self.write(f"DCID {dcid} connection error: {_text(reason)}")

    def tlsrpt_report(self, domain: str, day: str, file: str, mid: int | None) -> str:
        """A TLS-RPT report (RFC 8460) of ``domain`` for the UTC ``day`` written as ``file`` and, with a MID,
        queued to the domain's ``rua`` addresses."""
        text = f"TLS-RPT report domain {_token(domain)} day {_token(day)} file {_token(file)}"
        return self.write(text + (f" MID {int(mid)}" if mid is not None else ""))

    # -- alerts -------------------------------------------------------------------------------------------------
    def alert(self, severity: str, alert_class: str, text: str) -> str:
        """A system alert (also mailed to the alert recipients): ``severity`` Critical, Warning or Information,
        ``alert_class`` System, Hardware, ... The line's level is the severity (Information: Info)."""
        severity, alert_class = _token(severity).capitalize(), _token(alert_class).capitalize()
        level = "Info" if severity == "Information" else severity
        return self.write(f"Alert: {severity} {alert_class}: {_text(text)}", level=level)


def parse_line(line: str) -> dict[str, Any]:
    """A log line back into its fields: ``timestamp``, ``time`` (epoch), ``level``, ``event`` and the event's own.

    IDs and byte counts are ints, ``verified`` a bool, an unknown reverse-DNS name None.
    A line outside the grammar is BadInput (a log file is user input).
    """
    head = _LINE.match(line.rstrip("\r\n"))
    if head is None:
        raise BadInput(f"not a mail log line: {line[:80]!r}")
    event, fields = parse_event(head["text"])
    stamp = {"timestamp": head["timestamp"], "time": parse_timestamp(head["timestamp"]), "level": head["level"]}
    return {**stamp, "event": event, **fields}


def parse_event(text: str) -> tuple[str, dict[str, Any]]:
    """An event's text (a line after ``<timestamp> <Level>: ``) as its name and typed fields (as ``parse_line``)."""
    for event, pattern in GRAMMAR.items():
        found = pattern.match(text)
        if found is None:
            continue
        fields: dict[str, Any] = {}
        for key, value in found.groupdict().items():
            if value is None:
                fields[key] = None
            elif key in _INT_FIELDS:
                fields[key] = int(value)
            elif key == "rids":
                fields[key] = [int(rid) for rid in value.split(", ")]
            elif key == "verified":
                fields[key] = value == "yes"
            elif key == "rdns":
                fields[key] = None if value == "unknown" else value
            else:
                fields[key] = value
        return event, fields
    raise BadInput(f"unknown mail log event: {text[:80]!r}")


def log_record(line: str) -> dict[str, Any]:
    """One entry of a run's ``server_log`` observation: ``{event, fields, line}`` from a line without its
    timestamp (``Info: ICID 1 close``); ``line`` stays as rendered, for ``has`` conditions and the reports."""
    level, sep, text = line.partition(": ")
    if not sep or not level.isalpha():
        raise BadInput(f"not a mail log line: {line[:80]!r}")
    event, fields = parse_event(text)
    return {"event": event, "fields": fields, "line": line}
