"""``smtplab track``: message tracking over mail logs, by MID, sender or recipient.

Each message is shown with the connection it came in on (ICID, peer, TLS or not) and every delivery connection
that carried it (DCID, domain, MX, the TLS setting applied, what TLS did, the outcome). ``--json`` gives the same
as data. Nothing matching is not an error (exit 0, ``no message matches``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from rich.text import Text

from lab.appliance.logbook import Delivery, Inbound, Logbook, Message, read_logs
from lab.appliance.maillog import format_timestamp
from lab.errors import EXIT_OK, BadInput
from lab.report import visible
from lab.report.terminal import make_console

HELP = "message tracking: each message with its inbound connection and its deliveries, from mail logs"


def add_log_argument(parser: argparse.ArgumentParser) -> None:
    """``--log FILE`` (repeatable, at least one): what ``track`` and ``tls-report`` read."""
    parser.add_argument(
        "--log",
        metavar="FILE",
        action="append",
        required=True,
        help="a mail log written by `smtplab serve --log` or a lab run; repeat for several",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_log_argument(parser)
    parser.add_argument("--mid", type=int, metavar="N", help="the message with this MID")
    parser.add_argument("--from", dest="sender", metavar="ADDR", help="messages whose envelope sender is ADDR")
    parser.add_argument("--to", dest="recipient", metavar="ADDR", help="messages with ADDR among the recipients")
    parser.add_argument("--json", action="store_true", help="print the matches as JSON")


def _same(addr: str | None, wanted: str) -> bool:
    return addr is not None and addr.strip("<>").lower() == wanted.strip().strip("<>").lower()


def select(book: Logbook, mid: int | None, sender: str | None, recipient: str | None) -> list[Message]:
    """The messages every given criterion matches, oldest first."""
    found = []
    for message in book.messages.values():
        if mid is not None and message.mid != mid:
            continue
        if sender is not None and not _same(message.sender, sender):
            continue
        if recipient is not None and not any(_same(r, recipient) for r in message.recipients):
            continue
        found.append(message)
    return sorted(found, key=lambda m: (m.time, m.source, m.mid))


def inbound_tls(conn: Inbound | None) -> str:
    if conn is None:
        return "unknown (the connection is not in the log)"
    if conn.tls_protocol:
        return f"{conn.tls_protocol} {conn.tls_cipher}"
    return f"failed: {conn.tls_failure}" if conn.tls_failure else "none"


def outbound_tls(conn: Delivery) -> str:
    if conn.tls_protocol:
        cert = f", certificate {conn.certificate}" if conn.certificate else ""
        return f"{conn.tls_protocol} {conn.tls_cipher}{cert}"
    if conn.no_starttls:
        return "none (STARTTLS not offered)"
    return f"failed: {conn.tls_failure}" if conn.tls_failure else "none"


def tracked(book: Logbook, message: Message) -> dict[str, Any]:
    """One message and its connections as plain data (the JSON output, and what the terminal lays out)."""
    conn = book.inbound.get((message.source, message.icid)) if message.icid is not None else None
    deliveries = [book.deliveries[(message.source, dcid)] for dcid in message.dcids]
    return {
        "log": message.source,
        "mid": message.mid,
        "time": format_timestamp(message.time),
        "from": message.sender,
        "to": message.recipients,
        "bytes": message.nbytes,
        "spooled": message.spooled,
        "inbound": None if conn is None else {**asdict(conn), "tls": inbound_tls(conn)},
        "deliveries": [
            {
                "dcid": d.dcid,
                "time": format_timestamp(d.time),
                "domain": d.domain,
                "mx": d.mx,
                "ip": d.peer_ip,
                "tls_setting": d.setting,
                "tls": outbound_tls(d),
                "outcome": d.results.get(message.mid, "in progress"),
            }
            for d in deliveries
        ],
    }


def _lines(item: dict[str, Any]) -> list[str]:
    lines = [
        f"MID {item['mid']}  {item['time']}  From: {item['from'] or '?'}  To: {', '.join(item['to']) or '?'}"
        + (f"  {item['bytes']} bytes" if item["bytes"] is not None else "")
    ]
    conn = item["inbound"]
    if conn is None:
        lines.append("  in   (no ICID in the log)")
    else:
        rdns = f"{conn['rdns']}, {'verified' if conn['verified'] else 'not verified'}" if conn["rdns"] else "no rDNS"
        policy = f"  SG {conn['group']}" if conn["group"] else ""
        policy += f" policy {conn['policy']}" if conn["policy"] else ""
        lines.append(f"  in   ICID {conn['icid']} from {conn['peer_ip']} ({rdns}){policy}  TLS {conn['tls']}")
    if item["spooled"]:
        lines.append(f"  spool {item['spooled']}")
    for d in item["deliveries"]:
        lines.append(
            f"  out  DCID {d['dcid']} {d['time']}  {d['domain'] or '?'} mx {d['mx'] or '?'} ({d['ip'] or '?'})"
            f"  TLS {d['tls_setting'] or '?'}: {d['tls']}  -> {d['outcome']}"
        )
    if not item["deliveries"]:
        lines.append("  out  (no delivery in the log)")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.mid is None and args.sender is None and args.recipient is None:
        raise BadInput("say which messages: --mid N, --from ADDR or --to ADDR")
    book = read_logs(args.log)
    items = [tracked(book, m) for m in select(book, args.mid, args.sender, args.recipient)]
    if args.json:
        print(json.dumps(items, indent=2))
        return EXIT_OK
    console = make_console()
    if not items:
        console.print(Text("no message matches"))
    for number, item in enumerate(items):
        if number:
            console.print(Text(""))
        for index, line in enumerate(_lines(item)):
            console.print(Text(visible(line), style="bold" if index == 0 else ""), soft_wrap=True)
    return EXIT_OK
