"""Mail log files read back into connections and messages: what ``smtplab track`` and ``smtplab tls-report`` show.

Every line goes through ``maillog.parse_line`` (the one grammar, docs/maillog.md); a line outside it is
``BadInput`` naming FILE:LINE. IDs restart with each ``smtplab serve``, so records are keyed by (file, id): two
logs never merge one connection into another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.appliance.maillog import parse_line
from lab.errors import BadInput


@dataclass
class Inbound:
    """One incoming connection (ICID) and what TLS did on it."""

    source: str
    icid: int
    time: float
    peer_ip: str
    rdns: str | None
    verified: bool
    interface: str = ""
    behaviour: str | None = None
    group: str | None = None
    policy: str | None = None  # when the log line names it; else the configuration's group -> policy says
    tls_protocol: str | None = None
    tls_cipher: str | None = None
    tls_failure: str | None = None

    @property
    def domain(self) -> str:
        """The peer's verified reverse-DNS domain (the host name without its first label), else its address."""
        if not (self.verified and self.rdns):
            return self.peer_ip
        labels = self.rdns.rstrip(".").lower().split(".")
        return ".".join(labels[1:]) if len(labels) > 2 else ".".join(labels)


@dataclass
class Delivery:
    """One delivery connection (DCID): route, TLS, and what became of each message on it."""

    source: str
    dcid: int
    time: float
    peer_ip: str | None = None
    domain: str | None = None
    mx: str | None = None
    setting: str | None = None
    tls_protocol: str | None = None
    tls_cipher: str | None = None
    tls_failure: str | None = None
    no_starttls: bool = False
    certificate: str | None = None  # verified / unverified (a Verify setting)
    tls_required_failed: bool = False
    results: dict[int, str] = field(default_factory=dict)  # MID -> delivered / delayed: TEXT / bounced: TEXT

    @property
    def tls_ok(self) -> bool:
        """TLS negotiated (and, under a Verify setting, the certificate verified)."""
        return self.tls_protocol is not None and self.certificate != "unverified"


@dataclass
class Message:
    source: str
    mid: int
    time: float
    icid: int | None = None
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    nbytes: int | None = None
    spooled: str | None = None
    dcids: list[int] = field(default_factory=list)


@dataclass
class Logbook:
    inbound: dict[tuple[str, int], Inbound] = field(default_factory=dict)
    deliveries: dict[tuple[str, int], Delivery] = field(default_factory=dict)
    messages: dict[tuple[str, int], Message] = field(default_factory=dict)

    def add(self, source: str, fields: dict[str, Any]) -> None:
        event, when = fields["event"], fields["time"]
        if event == "new_connection":
            self.inbound[(source, fields["icid"])] = Inbound(
                source, fields["icid"], when, fields["peer_ip"], fields["rdns"], fields["verified"], fields["interface"]
            )
        elif event in ("policy", "tls_success", "tls_failed"):
            conn = self.inbound.get((source, fields["icid"]))
            if conn is None:
                return  # the log began after this connection opened (a rotated file): nothing to attach to
            if event == "policy":
                conn.behaviour, conn.group, conn.policy = fields["behaviour"], fields["group"], fields["policy"]
            elif event == "tls_success":
                conn.tls_protocol, conn.tls_cipher = fields["protocol"], fields["cipher"]
            else:
                conn.tls_failure = fields["reason"]
        elif event.startswith("mid_"):
            self._message(source, fields)
        elif "dcid" in fields:
            self._delivery(source, fields)

    def _message(self, source: str, fields: dict[str, Any]) -> None:
        event, key = fields["event"], (source, fields["mid"])
        if event == "mid_start":
            self.messages[key] = Message(source, fields["mid"], fields["time"], icid=fields["icid"])
            return
        message = self.messages.setdefault(key, Message(source, fields["mid"], fields["time"]))
        if event == "mid_from":
            message.sender = fields["addr"]
        elif event == "mid_rcpt":
            message.recipients.append(fields["addr"])
        elif event == "mid_ready":
            message.nbytes = fields["nbytes"]
        elif event == "mid_spooled":
            message.spooled = fields["path"]

    def _delivery(self, source: str, fields: dict[str, Any]) -> None:
        event, key = fields["event"], (source, fields["dcid"])
        if event == "dcid_new":
            self.deliveries[key] = Delivery(source, fields["dcid"], fields["time"], peer_ip=fields["peer_ip"])
            return
        conn = self.deliveries.setdefault(key, Delivery(source, fields["dcid"], fields["time"]))
        if event == "dcid_route":
            conn.domain, conn.mx, conn.setting = fields["domain"], fields["mx"], fields["setting"]
        elif event == "dcid_tls_success":
            conn.tls_protocol, conn.tls_cipher = fields["protocol"], fields["cipher"]
        elif event == "dcid_tls_failed":
            conn.tls_failure = fields["reason"]
        elif event == "dcid_certificate":
            conn.certificate = fields["state"]
        elif event == "dcid_no_starttls":
            conn.no_starttls = True
        elif event == "dcid_tls_required":
            conn.tls_required_failed = True
        elif event in ("delivery_start", "message_done", "delayed", "bounced"):
            mid = fields["mid"]
            message = self.messages.get((source, mid))
            if message is not None and conn.dcid not in message.dcids:
                message.dcids.append(conn.dcid)
            if event == "message_done":
                conn.results[mid] = "delivered"
            elif event in ("delayed", "bounced"):
                conn.results[mid] = f"{event}: {fields['reason']}"
            else:
                conn.results.setdefault(mid, "in progress")


def read_logs(paths: Iterable[str | Path]) -> Logbook:
    """Every line of every file, in order; BadInput ``FILE:LINE: ...`` for an unreadable file or a foreign line."""
    book = Logbook()
    for path in paths:
        source, number = str(path), 0
        try:
            with Path(path).open(encoding="utf-8", errors="strict") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        book.add(source, _parsed(line, source, number))
        except OSError as exc:
            raise BadInput(f"cannot read the mail log: {exc.strerror or exc}", file=source) from None
        except UnicodeDecodeError:
            raise BadInput("not UTF-8 text", file=source, line=number + 1) from None
    return book


def _parsed(line: str, source: str, number: int) -> dict[str, Any]:
    try:
        return parse_line(line)
    except BadInput as exc:
        raise BadInput(exc.problem, file=source, line=number) from None
