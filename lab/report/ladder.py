"""Ladder (sequence) diagrams of one run: who sent what to whom, in plaintext or inside TLS, and where it changed.

``build`` turns a run's transcript entries into a ``Ladder`` (pure data): lanes (the client, the firewall when a
middlebox was on the path, the listener or external target) and rows (a message between client and server, the
TLS handshake where the channel changes, a note or an error on one lane). It reads the entries' fields
(``direction``, ``tls``, ``kind``, ``time``, ``step``), never the rendered transcript lines. Two views draw it:
``text_lines`` for the terminal (``smtplab report DIR --ladder``) and ``svg`` for index.html. Both show peer
text through ``visible``; the SVG escapes every string, since a transcript is hostile input.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from markupsafe import Markup

from lab.report import visible
from lab.scenario.result import CaseRun
from lab.smtp.transcript import Direction, Entry, Kind


class Lane(StrEnum):
    CLIENT = "client"
    FIREWALL = "firewall"
    SERVER = "server"


class RowKind(StrEnum):
    MESSAGE = "message"  # bytes between client and server (through the firewall, if any)
    CHANNEL = "channel"  # the TLS handshake: where the channel changes (or fails to)
    NOTE = "note"  # a note from the lab (``===``) on one lane
    ERROR = "error"  # an error (``<**``) on one lane


#: Note kinds that are the channel changing: the handshake completed, or ended without TLS.
_CHANNEL_KINDS = {Kind.TLS_STARTED: True, Kind.HANDSHAKE_FAILED: False, Kind.HANDSHAKE_ABORTED: False}
_LANE_OF_KIND = {Kind.MIDDLEBOX: Lane.FIREWALL, Kind.MAILLOG: Lane.SERVER}


@dataclass(frozen=True)
class Row:
    """One row of the ladder. A message holds consecutive lines of one flight (a multi-line reply, a body)."""

    kind: RowKind
    lines: tuple[str, ...]
    time: float | None = None
    entry: int = 0  # index of the first transcript entry it stands for
    tls: bool = False  # MESSAGE: travelled inside TLS
    sent: bool = False  # MESSAGE: client -> server (else server -> client)
    lane: Lane = Lane.CLIENT  # NOTE / ERROR: where it is drawn
    ok: bool = True  # CHANNEL: the handshake completed
    step: str | None = None


@dataclass(frozen=True)
class Ladder:
    lanes: tuple[Lane, ...]
    labels: tuple[str, ...]  # one per lane: "client prefer", "firewall", "listener lab:Inboundmail"
    rows: tuple[Row, ...]

    @property
    def middlebox(self) -> bool:
        return Lane.FIREWALL in self.lanes


def _joins(previous: Row | None, last: Entry | None, entry: Entry) -> bool:
    """Whether ``entry`` continues the message row before it: same way, layer and step, at the same moment."""
    if previous is None or last is None or previous.kind is not RowKind.MESSAGE:
        return False
    same_way = previous.sent == (entry.direction is Direction.SENT) and previous.tls == entry.tls
    return same_way and entry.step == last.step and entry.time is not None and entry.time == last.time


def build(
    entries: Sequence[Entry], *, client: str = "client", server: str = "listener", middlebox: bool | None = None
) -> Ladder:
    """The ladder of a transcript. ``middlebox`` None: a firewall lane when the entries hold middlebox notes."""
    if middlebox is None:
        middlebox = any(e.kind is Kind.MIDDLEBOX for e in entries)
    rows: list[Row] = []
    last: Entry | None = None
    for index, entry in enumerate(entries):
        text = visible(entry.text)
        if entry.direction in (Direction.SENT, Direction.RECEIVED):
            previous = rows[-1] if rows else None
            if previous is not None and _joins(previous, last, entry):
                rows[-1] = replace(previous, lines=(*previous.lines, text))
            else:
                sent = entry.direction is Direction.SENT
                rows.append(Row(RowKind.MESSAGE, (text,), entry.time, index, entry.tls, sent, step=entry.step))
        elif entry.kind in _CHANNEL_KINDS:
            marker = "<** " if entry.direction is Direction.ERROR else ""
            ok = _CHANNEL_KINDS[entry.kind]
            rows.append(Row(RowKind.CHANNEL, (marker + text,), entry.time, index, tls=ok, ok=ok, step=entry.step))
        else:
            error = entry.direction is Direction.ERROR
            lane = _LANE_OF_KIND.get(entry.kind, Lane.CLIENT) if entry.kind is not None else Lane.CLIENT
            if lane is Lane.FIREWALL and not middlebox:
                lane = Lane.CLIENT
            kind = RowKind.ERROR if error else RowKind.NOTE
            shown = ("<** " if error else "=== ") + text
            rows.append(Row(kind, (shown,), entry.time, index, entry.tls, lane=lane, step=entry.step))
        last = entry
    lanes = (Lane.CLIENT, Lane.FIREWALL, Lane.SERVER) if middlebox else (Lane.CLIENT, Lane.SERVER)
    labels = tuple({Lane.CLIENT: client, Lane.FIREWALL: "firewall", Lane.SERVER: server}[lane] for lane in lanes)
    return Ladder(lanes, tuple(visible(label) for label in labels), tuple(rows))


def of_run(run: CaseRun) -> Ladder:
    """The ladder of one run of the record: the client behaviour, the lab's listener or the external target."""
    server = f"listener {run.target}" if run.target.startswith("lab:") else f"target {run.target}"
    return build(run.transcript, client=f"client {run.client}", server=server)


# -- text, for the terminal ------------------------------------------------------------------------------------

#: Characters between the client's and the server's lifeline in the text view.
TEXT_SPAN = 26
TEXT_LEGEND = "---> plaintext   ~~~> inside TLS   [=TLS=] handshake   [xTLSx] no TLS   o note   ! error"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


def _positions(ladder: Ladder) -> list[int]:
    count = len(ladder.lanes)
    return [round(i * TEXT_SPAN / (count - 1)) for i in range(count)]


def _picture(ladder: Ladder, row: Row) -> str:
    """The lane part of one text row, ``TEXT_SPAN + 1`` characters wide."""
    at = _positions(ladder)
    cells = [" "] * (TEXT_SPAN + 1)
    for x in at:
        cells[x] = "|"
    if row.kind is RowKind.MESSAGE:
        fill = "~" if row.tls else "-"
        for x in range(1, TEXT_SPAN):
            cells[x] = "+" if x in at else fill
        if row.sent:
            cells[TEXT_SPAN - 1] = ">"
        else:
            cells[1] = "<"
    elif row.kind is RowKind.CHANNEL:
        label = "[=TLS=]" if row.ok else "[xTLSx]"
        fill = "=" if row.ok else "x"
        inner = label.center(TEXT_SPAN - 1, fill)
        cells[1:TEXT_SPAN] = list(inner)
    else:
        cells[at[ladder.lanes.index(row.lane)]] = "!" if row.kind is RowKind.ERROR else "o"
    return "".join(cells)


def _blank(ladder: Ladder) -> str:
    cells = [" "] * (TEXT_SPAN + 1)
    for x in _positions(ladder):
        cells[x] = "|"
    return "".join(cells)


def text_lines(ladder: Ladder, width: int = 100) -> list[tuple[str, str]]:
    """``(line, style)`` pairs: a header, the legend, one line per row line. ``style`` is a transcript line kind
    (``plain-sent``, ``tls-recv``, ``error``, ``note``) or ``header``, so the terminal colours it like the
    transcript. Text longer than ``width`` is cut with ``...`` (the transcript holds it whole)."""
    room = max(10, width - 9 - (TEXT_SPAN + 1) - 3)  # time, lanes, gap
    lanes = "lanes, left to right: " + " | ".join(ladder.labels)
    out = [(_cut(lanes, width), "header"), (_cut(TEXT_LEGEND, width), "note")]
    out.append((f"{'time':>8} {_blank(ladder)}", "header"))
    for row in ladder.rows:
        when = "" if row.time is None else f"{row.time:.3f}"
        style = _style(row)
        for i, line in enumerate(row.lines):
            picture = _picture(ladder, row) if i == 0 else _blank(ladder)
            out.append((f"{when if i == 0 else '':>8} {picture}   {_cut(line, room)}".rstrip(), style))
    return out


def _style(row: Row) -> str:
    if row.kind is RowKind.MESSAGE:
        return ("tls-" if row.tls else "plain-") + ("sent" if row.sent else "recv")
    if row.kind is RowKind.CHANNEL:
        return "tls-recv" if row.ok else "error"
    return "error" if row.kind is RowKind.ERROR else "note"


# -- SVG, for index.html ---------------------------------------------------------------------------------------

WIDTH = 1000
FONT = 14  # px, monospace
CHAR = 8.8  # px per character, a little wider than DejaVu Sans Mono's 0.602 em so cut text never overruns
LINE = 19
LANE_X = {Lane.CLIENT: 170.0, Lane.FIREWALL: 520.0, Lane.SERVER: 870.0}
TOP = 92  # where the first row starts (legend and lane heads above)
MAX_LINES = 8  # lines of one message drawn; the rest is counted, and the whole is in the row's tooltip
PLAIN_COLOUR = "#c2410c"
PLAIN_TEXT = "#7c2d12"
TLS_COLOUR = "#15803d"
TLS_TEXT = "#14532d"
ERROR_COLOUR = "#b00020"
NOTE_TEXT = "#444"


def _e(text: str) -> str:
    """Escaped for SVG text and attribute values (quotes included); control characters already visible."""
    return html.escape(visible(text), quote=True)


def _fit(text: str, pixels: float) -> str:
    chars = max(4, int(pixels // CHAR))
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def _text(
    x: float, y: float, text: str, room: float, *, anchor: str = "start", fill: str = "#111", bold: bool = False
) -> str:
    weight = ' font-weight="bold"' if bold else ""
    halo = ' stroke="#fff" stroke-width="4" paint-order="stroke"'  # legible where it crosses a lifeline
    attributes = f'x="{x:.0f}" y="{y:.0f}" text-anchor="{anchor}" fill="{fill}"{weight}{halo}'
    return f"<text {attributes}>{_e(_fit(text, room))}</text>"


def _lock(x: float, y: float, colour: str) -> str:
    """A padlock drawn with shapes (no font needed): body ``x, y`` (top left), 10 x 8, shackle above."""
    return (
        f'<path d="M{x + 2:.0f} {y:.0f} v-3 a3 3 0 0 1 6 0 v3" fill="none" stroke="{colour}" stroke-width="1.6"/>'
        f'<rect x="{x:.0f}" y="{y:.0f}" width="10" height="8" rx="1.5" fill="{colour}"/>'
    )


def _arrow(ladder: Ladder, y: float, row: Row) -> str:
    left, right = LANE_X[Lane.CLIENT], LANE_X[Lane.SERVER]
    start, end = (left, right - 2) if row.sent else (right, left + 2)
    colour = TLS_COLOUR if row.tls else PLAIN_COLOUR
    tip = -10 if row.sent else 10
    head = f'<path d="M{end:.0f} {y:.0f} l{tip} -6 v12 z" fill="{colour}"/>'
    if row.tls:  # a double line: the channel is wrapped
        shaft = "".join(
            f'<line x1="{start:.0f}" y1="{y + dy:.1f}" x2="{end + tip:.0f}" y2="{y + dy:.1f}" stroke="{colour}" '
            f'stroke-width="1.6"/>'
            for dy in (-2.5, 2.5)
        )
    else:
        shaft = (
            f'<line x1="{start:.0f}" y1="{y:.0f}" x2="{end + tip:.0f}" y2="{y:.0f}" stroke="{colour}" '
            'stroke-width="2"/>'
        )
    crossing = ""
    if ladder.middlebox:
        fx = LANE_X[Lane.FIREWALL]
        crossing = f'<rect x="{fx - 4:.0f}" y="{y - 4:.0f}" width="8" height="8" fill="#fff" stroke="#333"/>'
    return shaft + head + crossing


def _row_svg(ladder: Ladder, y: float, row: Row) -> tuple[str, float]:
    """The SVG of one row starting at ``y``, and its height."""
    left, right = LANE_X[Lane.CLIENT], LANE_X[Lane.SERVER]
    full = "\n".join(row.lines)
    parts = [f"<title>{_e(full)}</title>"]
    when = "" if row.time is None else f"{row.time:.3f}s"
    if row.kind is RowKind.MESSAGE:
        shown = list(row.lines[:MAX_LINES])
        if len(row.lines) > MAX_LINES:
            shown.append(f"[... {len(row.lines) - MAX_LINES} more lines: hover for all]")
        colour = TLS_TEXT if row.tls else PLAIN_TEXT
        indent = 16 if row.tls else 0
        x = left + 12
        for i, line in enumerate(shown):
            ly = y + LINE * (i + 1) - 5
            parts.append(_text(x + indent, ly, line, right - x - indent - 12, fill=colour, bold=row.sent))
        if row.tls:
            parts.append(_lock(x, y + LINE - 14, TLS_COLOUR))
        arrow_y = y + LINE * len(shown) + 6
        parts.append(_arrow(ladder, arrow_y, row))
        height = LINE * len(shown) + 16
        kind = ("tls" if row.tls else "plain") + ("-sent" if row.sent else "-recv")
    elif row.kind is RowKind.CHANNEL:
        fill, stroke = ("#dcfce7", TLS_COLOUR) if row.ok else ("#ffe4e6", ERROR_COLOUR)
        parts.append(
            f'<rect x="{left - 8:.0f}" y="{y + 4:.0f}" width="{right - left + 16:.0f}" height="26" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="2" stroke-dasharray="{"" if row.ok else "6 3"}"/>'
        )
        parts.append(_lock(left + 4, y + 16, stroke))
        label = ("TLS handshake: " if row.ok else "no TLS: ") + row.lines[0]
        parts.append(
            _text(left + 22, y + 22, label, right - left - 34, fill=TLS_TEXT if row.ok else ERROR_COLOUR, bold=True)
        )
        height = 36
        kind = "channel" if row.ok else "channel-failed"
    else:
        error = row.kind is RowKind.ERROR
        x = LANE_X[row.lane]
        colour = ERROR_COLOUR if error else NOTE_TEXT
        dot_fill = ERROR_COLOUR if error else "#fff"
        dot = f'<circle cx="{x:.0f}" cy="{y + 9:.0f}" r="5" fill="{dot_fill}" stroke="{colour}" stroke-width="1.5"/>'
        parts.append(dot)
        if row.lane is Lane.SERVER:
            parts.append(_text(x - 12, y + 14, row.lines[0], x - 12 - left - 12, anchor="end", fill=colour, bold=error))
        else:
            parts.append(_text(x + 12, y + 14, row.lines[0], right - x - 12, fill=colour, bold=error))
        height = LINE + 4
        kind = "error" if error else "note"
    if when:
        parts.append(f'<text x="62" y="{y + 14:.0f}" text-anchor="end" fill="#555" font-size="12">{_e(when)}</text>')
    return f'<g class="row r-{kind}">{"".join(parts)}</g>', height


def _legend(middlebox: bool) -> str:
    y = 18
    return (
        f'<g class="legend" font-size="12">'
        f'<line x1="10" y1="{y - 4}" x2="40" y2="{y - 4}" stroke="{PLAIN_COLOUR}" stroke-width="2"/>'
        f'<text x="46" y="{y}" fill="{PLAIN_TEXT}">plaintext</text>'
        f'<line x1="140" y1="{y - 6.5}" x2="170" y2="{y - 6.5}" stroke="{TLS_COLOUR}" stroke-width="1.6"/>'
        f'<line x1="140" y1="{y - 1.5}" x2="170" y2="{y - 1.5}" stroke="{TLS_COLOUR}" stroke-width="1.6"/>'
        f"{_lock(176, y - 8, TLS_COLOUR)}"
        f'<text x="192" y="{y}" fill="{TLS_TEXT}">inside TLS</text>'
        f'<rect x="290" y="{y - 11}" width="24" height="13" fill="#dcfce7" stroke="{TLS_COLOUR}"/>'
        f'<text x="320" y="{y}" fill="{TLS_TEXT}">TLS handshake</text>'
        f'<circle cx="450" cy="{y - 4}" r="5" fill="#fff" stroke="{NOTE_TEXT}"/>'
        f'<text x="460" y="{y}" fill="{NOTE_TEXT}">=== note</text>'
        f'<circle cx="550" cy="{y - 4}" r="5" fill="{ERROR_COLOUR}"/>'
        f'<text x="560" y="{y}" fill="{ERROR_COLOUR}">&lt;** error</text>'
        + (
            f'<rect x="650" y="{y - 8}" width="8" height="8" fill="#fff" stroke="#333"/>'
            f'<text x="664" y="{y}" fill="#333">passes the firewall</text>'
            if middlebox
            else ""
        )
        + "</g>"
    )


def svg(ladder: Ladder, title: str = "ladder diagram") -> Markup:
    """The ladder as an inline SVG element; every string in it is escaped."""
    body: list[str] = []
    y = float(TOP)
    for row in ladder.rows:
        part, height = _row_svg(ladder, y, row)
        body.append(part)
        y += height
    bottom = y + 10
    heads = []
    for lane, label in zip(ladder.lanes, ladder.labels, strict=True):
        x = LANE_X[lane]
        dash = ' stroke-dasharray="5 4"' if lane is Lane.FIREWALL else ""
        heads.append(
            f'<line x1="{x:.0f}" y1="68" x2="{x:.0f}" y2="{bottom:.0f}" stroke="#888" stroke-width="1.5"{dash}/>'
        )
        heads.append(f'<rect x="{x - 118:.0f}" y="36" width="236" height="30" rx="4" fill="#f1f5f9" stroke="#334155"/>')
        heads.append(f"<g><title>{_e(label)}</title>{_text(x, 56, label, 224, anchor='middle', bold=True)}</g>")
    height = bottom + 6
    return Markup(
        f'<svg class="ladder" role="img" aria-label="{_e(title)}" '
        f'viewBox="0 0 {WIDTH} {height:.0f}" width="{WIDTH}" height="{height:.0f}" '
        f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{FONT}">'
        f"<title>{_e(title)}</title>{_legend(ladder.middlebox)}{''.join(heads)}{''.join(body)}</svg>"
    )
