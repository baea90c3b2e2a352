"""The ladder model (rows from transcript entries) and its text and SVG views, table-style: a plaintext session, a
STARTTLS session, a session stripped by a middlebox, a failed handshake."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_reports import _result
from test_result import HOSTILE, _run

import lab.cli
from lab.report import write_reports
from lab.report.ladder import Lane, Row, RowKind, build, svg, text_lines
from lab.scenario.verdict import Verdict
from lab.smtp.transcript import Direction, Entry, Kind


def sent(text: str, t: float, tls: bool = False, step: str = "s") -> Entry:
    return Entry(Direction.SENT, text, tls, t, step)


def recv(text: str, t: float, tls: bool = False, step: str = "s") -> Entry:
    return Entry(Direction.RECEIVED, text, tls, t, step)


def note(text: str, kind: Kind, t: float | None = None) -> Entry:
    return Entry(Direction.NOTE, text, False, t, "s", kind)


def error(text: str, kind: Kind, t: float) -> Entry:
    return Entry(Direction.ERROR, text, False, t, "s", kind)


EHLO = [sent("EHLO c.example", 0.1), recv("250-mx.example", 0.2), recv("250 STARTTLS", 0.2)]

PLAINTEXT = [
    note("Connected to 192.0.2.1.", Kind.CONNECTED, 0.0),
    recv("220 mx.example ESMTP", 0.0),
    *EHLO,
    sent("MAIL FROM:<a@example.net>", 0.3),
    recv("250 ok", 0.4),
]
STARTTLS = [
    recv("220 mx.example ESMTP", 0.0),
    *EHLO,
    sent("STARTTLS", 0.3),
    recv("220 2.0.0 Ready to start TLS", 0.4),
    note("TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384:256", Kind.TLS_STARTED, 0.5),
    sent("EHLO c.example", 0.5, tls=True),
    recv("250-mx.example", 0.6, tls=True),
    recv("250 PIPELINING", 0.6, tls=True),
]
STRIPPED = [
    recv("220 mx.example ESMTP", 0.0),
    sent("EHLO c.example", 0.1),
    recv("250-mx.example", 0.2),
    recv("250 XXXXXXXA", 0.2),
    note("prefer: STARTTLS not advertised: going on in plaintext", Kind.DECISION, 0.2),
    sent("MAIL FROM:<a@example.net>", 0.3),
    note("middlebox: middlebox rewrote STARTTLS: 250-STARTTLS -> 250-XXXXXXXA", Kind.MIDDLEBOX),
]
FAILED_HANDSHAKE = [
    recv("220 mx.example ESMTP", 0.0),
    *EHLO,
    sent("STARTTLS", 0.3),
    recv("220 2.0.0 Ready to start TLS", 0.4),
    error("TLS handshake failed: tlsv1 alert protocol version", Kind.HANDSHAKE_FAILED, 0.5),
    note("require: the TLS handshake failed: giving up", Kind.DECISION, 0.5),
    error("connection closed by the server", Kind.CLOSED, 0.6),
]


def shape(rows: tuple[Row, ...]) -> list[str]:
    """Each row as a short word: ``>`` / ``<`` plaintext, ``~>`` / ``<~`` TLS (with the line count), ``TLS`` /
    ``NOTLS`` the channel, ``note@lane`` / ``error@lane``."""
    out = []
    for row in rows:
        if row.kind is RowKind.MESSAGE:
            arrow = ("~" if row.tls else "-") + (">" if row.sent else "<")
            out.append(f"{arrow}{len(row.lines)}")
        elif row.kind is RowKind.CHANNEL:
            out.append("TLS" if row.ok else "NOTLS")
        else:
            out.append(f"{row.kind}@{row.lane}")
    return out


@pytest.mark.parametrize(
    ("entries", "lanes", "rows"),
    [
        (PLAINTEXT, "client server", ["note@client", "-<1", "->1", "-<2", "->1", "-<1"]),
        (STARTTLS, "client server", ["-<1", "->1", "-<2", "->1", "-<1", "TLS", "~>1", "~<2"]),
        (STRIPPED, "client firewall server", ["-<1", "->1", "-<2", "note@client", "->1", "note@firewall"]),
        (
            FAILED_HANDSHAKE,
            "client server",
            ["-<1", "->1", "-<2", "->1", "-<1", "NOTLS", "note@client", "error@client"],
        ),
    ],
    ids=["plaintext", "starttls", "stripped", "failed-handshake"],
)
def test_ladder_rows(entries: list[Entry], lanes: str, rows: list[str]) -> None:
    ladder = build(entries)
    assert " ".join(ladder.lanes) == lanes
    assert shape(ladder.rows) == rows


def test_rows_point_back_at_their_entries() -> None:
    ladder = build(STARTTLS)
    channel = next(row for row in ladder.rows if row.kind is RowKind.CHANNEL)
    assert STARTTLS[channel.entry].kind is Kind.TLS_STARTED and channel.time == 0.5
    reply = ladder.rows[2]
    assert reply.lines == ("250-mx.example", "250 STARTTLS") and reply.entry == 2


def test_a_middlebox_lane_can_be_forced_or_refused() -> None:
    assert build(PLAINTEXT, middlebox=True).lanes == (Lane.CLIENT, Lane.FIREWALL, Lane.SERVER)
    refused = build(STRIPPED, middlebox=False)
    assert refused.lanes == (Lane.CLIENT, Lane.SERVER)
    assert refused.rows[-1].lane is Lane.CLIENT  # the middlebox's note stays visible, on the client's lane


def test_lines_of_one_flight_join_and_different_moments_do_not() -> None:
    entries = [sent("MAIL FROM:<a@x>", 1.0), sent("RCPT TO:<b@x>", 1.0), sent("DATA", 2.0)]
    assert shape(build(entries).rows) == ["->2", "->1"]
    untimed = [Entry(Direction.SENT, "A"), Entry(Direction.SENT, "B")]  # a version 1 record: no times
    assert shape(build(untimed).rows) == ["->1", "->1"]


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            STARTTLS,
            [
                "lanes, left to right: client | listener",
                "    time |                         |",
                "   0.000 |<------------------------|   220 mx.example ESMTP",
                "   0.100 |------------------------>|   EHLO c.example",
                "   0.200 |<------------------------|   250-mx.example",
                "         |                         |   250 STARTTLS",
                "   0.300 |------------------------>|   STARTTLS",
                "   0.400 |<------------------------|   220 2.0.0 Ready to start TLS",
                "   0.500 |=========[=TLS=]=========|   TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384:256",
                "   0.500 |~~~~~~~~~~~~~~~~~~~~~~~~>|   EHLO c.example",
                "   0.600 |<~~~~~~~~~~~~~~~~~~~~~~~~|   250-mx.example",
                "         |                         |   250 PIPELINING",
            ],
        ),
        (
            STRIPPED,
            [
                "lanes, left to right: client | firewall | listener",
                "    time |            |            |",
                "   0.000 |<-----------+------------|   220 mx.example ESMTP",
                "   0.100 |------------+----------->|   EHLO c.example",
                "   0.200 |<-----------+------------|   250-mx.example",
                "         |            |            |   250 XXXXXXXA",
                "   0.200 o            |            |   === prefer: STARTTLS not advertised: going on in plaintext",
                "   0.300 |------------+----------->|   MAIL FROM:<a@example.net>",
                "         |            o            |   === middlebox: middlebox rewrote STARTTLS: "
                "250-STARTTLS -> 250-XXXXXXXA",
            ],
        ),
        (
            FAILED_HANDSHAKE[5:],
            [
                "lanes, left to right: client | listener",
                "    time |                         |",
                "   0.400 |<------------------------|   220 2.0.0 Ready to start TLS",
                "   0.500 |xxxxxxxxx[xTLSx]xxxxxxxxx|   <** TLS handshake failed: tlsv1 alert protocol version",
                "   0.500 o                         |   === require: the TLS handshake failed: giving up",
                "   0.600 !                         |   <** connection closed by the server",
            ],
        ),
    ],
    ids=["starttls", "stripped", "failed-handshake"],
)
def test_text_view(entries: list[Entry], expected: list[str]) -> None:
    lines = text_lines(build(entries), width=120)
    shown = [line for line, _ in lines]
    assert shown[0] == expected[0] and shown[2:] == expected[1:]  # line 1 is the legend
    styles = {line: style for line, style in lines}
    assert styles[expected[2]] == "plain-recv"


def test_text_view_cuts_long_lines_and_styles_tls() -> None:
    lines = text_lines(build([sent("X" * 500, 0.0, tls=True)]), width=80)
    line, style = lines[-1]
    assert len(line) == 80 and line.endswith("...") and style == "tls-sent"


def test_text_view_shows_control_characters_escaped() -> None:
    lines = text_lines(build([recv(HOSTILE, 0.0)]))
    assert "\x1b" not in "".join(line for line, _ in lines) and "\\x1b[2J" in lines[-1][0]


class _SVG(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def test_svg_escapes_hostile_text_and_keeps_it_whole_in_the_tooltip() -> None:
    long = "250 " + "A" * 280 + " <b>end</b>"
    drawing = str(svg(build([recv(HOSTILE, 0.0), recv(long, 1.0), note(HOSTILE, Kind.MIDDLEBOX)]), title=HOSTILE))
    parsed = _SVG()
    parsed.feed(drawing)
    assert set(parsed.tags) <= {"svg", "title", "g", "text", "line", "path", "rect", "circle"}
    assert "\x1b" not in drawing and "\x00" not in drawing and "<script" not in drawing
    text = "".join(parsed.texts)
    assert "<script>alert(1)</script>" in text  # shown as text, never as markup
    assert long in text  # the tooltip (<title>) holds the whole line ...
    assert re.search(r"A{20}\u2026</text>", drawing)  # ... the drawn line is cut to fit between the lanes


def test_svg_draws_tls_differently_from_plaintext() -> None:
    drawing = str(svg(build(STARTTLS)))
    assert drawing.count('class="row r-channel"') == 1
    assert drawing.count('class="row r-tls-sent"') == 1 and drawing.count('class="row r-plain-sent"') == 2
    tls_row = drawing[drawing.index('class="row r-tls-sent"') :]
    tls_row = tls_row[: tls_row.index("</g>")]
    assert tls_row.count("<line") == 2  # a double line, and a lock drawn with shapes
    assert "<rect" in tls_row and "<path" in tls_row


def test_smtplab_report_ladder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``smtplab report DIR --ladder RUN``: the named runs' ladders (no summary); bad names exit 3 in one line."""
    runs = [
        _run("C-1", "no", Verdict.OK, transcript=STARTTLS),
        _run("C-1", "required", Verdict.FAILED),
        _run("C-2", "no", Verdict.OK),
    ]
    write_reports(_result(runs), tmp_path)
    assert lab.cli.main(["report", str(tmp_path), "--ladder", "C-1[no]"]) == 1  # the record's exit code
    out = capsys.readouterr().out
    assert out.startswith("OK C-1[no] title of C-1\nlanes, left to right: client misbehaving-mail-first | listener")
    assert "|=========[=TLS=]=========|   TLS started" in out and "C-1[required]" not in out
    assert lab.cli.main(["report", str(tmp_path), "--ladder"]) == 1  # alone: the FAILED / XPASS / ERROR runs
    out = capsys.readouterr().out
    assert out.startswith("FAILED C-1[required]") and "C-1[no]" not in out and "passed" not in out
    assert lab.cli.main(["report", str(tmp_path), "--ladder", "C-1", "--ladder", "C-1[no]"]) == 1
    assert capsys.readouterr().out.count("lanes, left to right") == 2  # a case id: all its runs, each once
    assert lab.cli.main(["report", str(tmp_path), "--ladder", "C-9[no]"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ladder: no run named 'C-9[no]'" in err
