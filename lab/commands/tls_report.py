"""``smtplab tls-report``: the TLS Connections report (incoming and outgoing, per domain) from mail logs.

Incoming connections are grouped by the peer's verified reverse-DNS domain (its address when it has none) and
counted under the TLS setting of the mail flow policy that admitted them (``--config``: the appliance file; by
default the built-in appliance); outgoing ones by recipient domain under the TLS setting of the destination control
in their ``dcid_route`` line. Terminal tables, ``--json``, and ``--html FILE`` (one self-contained page).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from lab.appliance.config import default_appliance_path, load_appliance
from lab.appliance.logbook import Inbound, Logbook, read_logs
from lab.appliance.model import Appliance
from lab.commands.track import add_log_argument
from lab.errors import EXIT_OK
from lab.policy.modes import TLSMode
from lab.report import atomic_write, visible
from lab.report.html import _environment
from lab.report.terminal import make_console

HELP = "the TLS Connections report: incoming and outgoing TLS per domain, from mail logs"
ADMITTED = ("ACCEPT", "RELAY")  # HAT behaviours that let a connection talk SMTP

#: Column titles, as the appliance's TLS Connections report names them.
COLUMNS = {
    "req_failed": "TLS Req. Failed",
    "req_success": "TLS Req. Success",
    "pref_failed": "TLS Pref. Failed",
    "pref_success": "TLS Pref. Success",
    "total_tls": "Total TLS Connections",
    "unencrypted": "Unencrypted Connections",
    "messages_tls": "Messages by TLS",
    "percent_tls": "% TLS attempted",
}


@dataclass
class Row:
    """One domain's connections in one direction."""

    domain: str
    req_failed: int = 0
    req_success: int = 0
    pref_failed: int = 0
    pref_success: int = 0
    unencrypted: int = 0
    messages_tls: int = 0

    @property
    def total_tls(self) -> int:
        return self.req_failed + self.req_success + self.pref_failed + self.pref_success

    @property
    def percent_tls(self) -> float:
        connections = self.total_tls + self.unencrypted
        return round(100.0 * self.total_tls / connections, 1) if connections else 0.0

    def count(self, mode: TLSMode | None, tls_ok: bool, tls_tried: bool) -> None:
        """A required connection without TLS failed; a preferred one failed only if TLS was tried, else it is
        unencrypted; ``None`` (a policy the configuration does not name) counts as preferred."""
        if mode is TLSMode.REQUIRED:
            if tls_ok:
                self.req_success += 1
            else:
                self.req_failed += 1
        elif mode is TLSMode.NO and not tls_ok:
            self.unencrypted += 1
        elif tls_ok:
            self.pref_success += 1
        elif tls_tried:
            self.pref_failed += 1
        else:
            self.unencrypted += 1

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": self.domain}
        out.update({key: getattr(self, key) for key in COLUMNS})
        return out


def total(rows: Iterable[Row]) -> Row:
    summed = Row("Total")
    for row in rows:
        for item in fields(Row):
            if item.name != "domain":
                setattr(summed, item.name, getattr(summed, item.name) + getattr(row, item.name))
    return summed


def policy_modes(appliance: Appliance) -> dict[tuple[str, str], TLSMode]:
    """(interface, policy name) -> the policy's effective TLS setting, and (interface, ``SG GROUP``) -> that of
    the policy the sender group maps to (the log's policy line names the group, the policy only sometimes)."""
    modes: dict[tuple[str, str], TLSMode] = {}
    for listener in appliance.listeners:
        for name, policy in listener.policies.items():
            modes[(listener.interface, name)] = policy.effective(listener.defaults).tls
        for group in listener.hat.groups:
            if group.policy in listener.policies:
                modes[(listener.interface, f"SG {group.name}")] = modes[(listener.interface, group.policy)]
    return modes


def _mode_of(conn: Inbound, modes: dict[tuple[str, str], TLSMode]) -> TLSMode | None:
    wanted = conn.policy or (f"SG {conn.group}" if conn.group else None)
    if wanted is None:
        return None
    found = modes.get((conn.interface, wanted))
    if found is None:  # the log's interface is not in this configuration: any listener's entry of that name
        found = next((mode for (_, name), mode in modes.items() if name == wanted), None)
    return found


def _setting_mode(setting: str | None) -> TLSMode | None:
    if setting is None:
        return None
    word = setting.split()[0].lower()
    return {"required": TLSMode.REQUIRED, "preferred": TLSMode.PREFERRED, "no": TLSMode.NO}.get(word)


def incoming(book: Logbook, modes: dict[tuple[str, str], TLSMode]) -> list[Row]:
    rows: dict[str, Row] = {}
    for conn in book.inbound.values():
        if conn.behaviour not in ADMITTED:
            continue
        row = rows.setdefault(conn.domain, Row(conn.domain))
        row.count(_mode_of(conn, modes), conn.tls_protocol is not None, conn.tls_failure is not None)
    for message in book.messages.values():
        came = book.inbound.get((message.source, message.icid)) if message.icid is not None else None
        if came is not None and came.tls_protocol is not None and came.domain in rows and message.nbytes is not None:
            rows[came.domain].messages_tls += 1
    return sorted(rows.values(), key=lambda r: r.domain)


def outgoing(book: Logbook) -> list[Row]:
    rows: dict[str, Row] = {}
    for conn in book.deliveries.values():
        domain = conn.domain or "(unrouted)"
        row = rows.setdefault(domain, Row(domain))
        tried = conn.tls_protocol is not None or conn.tls_failure is not None
        row.count(_setting_mode(conn.setting), conn.tls_ok, tried)
        if conn.tls_ok:
            row.messages_tls += sum(1 for result in conn.results.values() if result == "delivered")
    return sorted(rows.values(), key=lambda r: r.domain)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_log_argument(parser)
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="the appliance file whose mail flow policies admitted the incoming connections (their TLS setting "
        "decides Required or Preferred); default: the built-in default appliance",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--html", metavar="FILE", type=Path, help="also write the report as one self-contained page")


def report(book: Logbook, appliance: Appliance) -> dict[str, list[dict[str, Any]]]:
    sections = {"incoming": incoming(book, policy_modes(appliance)), "outgoing": outgoing(book)}
    return {name: [row.as_dict() for row in (*rows, total(rows))] for name, rows in sections.items()}


#: The terminal's narrower headings (two lines each), so the table fits 100 columns; the caption names them in full.
SHORT_HEADINGS = {
    "req_failed": "Req.\nfailed",
    "req_success": "Req.\nsuccess",
    "pref_failed": "Pref.\nfailed",
    "pref_success": "Pref.\nsuccess",
    "total_tls": "TLS\ntotal",
    "unencrypted": "Unen-\ncrypted",
    "messages_tls": "Msgs\nby TLS",
    "percent_tls": "% TLS\ntried",
}
CAPTION = "Req./Pref.: TLS Required/Preferred; TLS total: Total TLS Connections; % TLS tried: % TLS attempted"


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("Domain", overflow="fold")
    for key in COLUMNS:
        table.add_column(SHORT_HEADINGS[key], justify="right", no_wrap=True)
    for row in rows:
        values = [str(row[key]) if key != "percent_tls" else f"{row[key]:.1f}" for key in COLUMNS]
        table.add_row(
            visible(row["domain"]),
            *values,
            style="bold" if row is rows[-1] else "",
            end_section=len(rows) > 1 and row is rows[-2],
        )
    return table


BAR_PARTS = (  # (key, label, colour): required apart from preferred, failures beside successes
    ("req_success", "Required, success", "#17692c"),
    ("req_failed", "Required, failed", "#b00020"),
    ("pref_success", "Preferred, success", "#0b5394"),
    ("pref_failed", "Preferred, failed", "#b08900"),
    ("unencrypted", "Unencrypted", "#8c8c8c"),
)


def bars(rows: list[dict[str, Any]], width: int = 480) -> list[dict[str, Any]]:
    """Per domain, the stacked segments of its bar (x and width in SVG units), longest domain = ``width``."""
    widest = max((sum(row[key] for key, _, _ in BAR_PARTS) for row in rows), default=0) or 1
    out = []
    for row in rows:
        x, segments = 0.0, []
        for key, label, colour in BAR_PARTS:
            size = width * row[key] / widest
            if size:
                segments.append(
                    {"x": round(x, 1), "w": round(size, 1), "colour": colour, "label": label, "n": row[key]}
                )
            x += size
        out.append({"domain": row["domain"], "segments": segments})
    return out


def render_html(data: dict[str, list[dict[str, Any]]], sources: list[str]) -> str:
    template = _environment().get_template("tls_connections.html.j2")
    return template.render(
        sections=[(name.capitalize(), rows, bars(rows[:-1])) for name, rows in data.items()],
        columns=COLUMNS,
        legend=BAR_PARTS,
        sources=sources,
    )


def run(args: argparse.Namespace) -> int:
    appliance = load_appliance(args.config or default_appliance_path())
    book = read_logs(args.log)
    data = report(book, appliance)
    if args.html is not None:
        atomic_write(args.html, render_html(data, list(args.log)).encode("utf-8"))
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    console = make_console()
    for name, rows in data.items():
        console.print(_table(f"{name.capitalize()} TLS connections", rows))
    console.print(CAPTION)
    if args.html is not None:
        console.print(f"HTML report: {args.html}")
    return EXIT_OK
