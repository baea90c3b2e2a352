"""The sans-IO SMTP core: readers by table, the server state table move by move, and split-independence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.smtp.core import errors
from lab.smtp.core.commands import parse_command, parse_path
from lab.smtp.core.events import Command, EndOfData, MalformedEndOfData, Path, ReceivedReply, Reply, TextProblem
from lab.smtp.core.readers import DataReader, LineReader, ReplyReader, command_text, next_command_line
from lab.smtp.core.state import TRANSITIONS, Move, ServerState, ServerStateMachine

# -- command lines


@pytest.mark.parametrize(
    ("line", "overlong", "expected"),
    [
        (b"EHLO a\r\n", False, "EHLO a"),
        (b"NOOP\r\n", True, errors.CommandLineTooLong),
        (b"X" * 511 + b"\r\n", False, errors.CommandLineTooLong),
        (b"X" * 510 + b"\r\n", False, "X" * 510),
        (b"EHLO a\n", False, errors.BareLFInCommand),
        (b"EHLO\ra\r\n", False, errors.BareCRInCommand),
        (b"EHLO \x00\r\n", False, errors.NulInCommand),
    ],
)
def test_command_text(line: bytes, overlong: bool, expected: str | type[Exception]) -> None:
    if isinstance(expected, str):
        assert command_text(line, overlong) == expected
    else:
        with pytest.raises(expected) as caught:
            command_text(line, overlong)
        assert caught.value.data == line  # the error carries the offending input


def test_an_overlong_partial_line_is_dropped_and_its_tail_marked() -> None:
    lines = LineReader()
    lines.feed(b"X" * 600)
    assert next_command_line(lines) is None and len(lines) == 0
    lines.feed(b"tail\r\nNOOP\r\n")
    assert next_command_line(lines) == (b"tail\r\n", True)
    assert next_command_line(lines) == (b"NOOP\r\n", False)


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("ehlo  client.example ", Command("EHLO", "client.example")),
        ("QUIT", Command("QUIT", "")),
        ("mail FROM:<a@b> SIZE=5", Command("MAIL", "FROM:<a@b> SIZE=5")),
    ],
)
def test_parse_command(text: str, command: Command) -> None:
    assert parse_command(text) == command


@pytest.mark.parametrize(
    ("argument", "keyword", "path"),
    [
        ("FROM:<a@b.example>", "FROM:", Path("a@b.example")),
        ("from: <a@b> SIZE=10", "FROM:", Path("a@b", "SIZE=10")),
        ("FROM:<>", "FROM:", Path("")),
        ("FROM:a@b", "FROM:", None),
        ("TO:<a@b>", "FROM:", None),
        ("TO:<a b>", "TO:", None),
    ],
)
def test_parse_path(argument: str, keyword: str, path: Path | None) -> None:
    assert parse_path(argument, keyword) == path


def test_size_parameter() -> None:
    assert Path("a", "BODY=8BITMIME size=42").size() == 42 and Path("a", "SIZE=x").size() is None


# -- message text


def _data(wire: bytes, max_size: int = 10_000, **kw: bool) -> list[object]:
    lines = LineReader()
    reader = DataReader(lines, max_size, **kw)
    lines.feed(wire)
    out: list[object] = []
    while (event := reader.next_event()) is not None:
        out.append(event)
    return out


@pytest.mark.parametrize(
    ("wire", "events"),
    [
        (b"hi\r\n.\r\n", [EndOfData(b"hi\r\n")]),
        (b"..dot\r\n.\r\n", [EndOfData(b".dot\r\n")]),
        (b"a\r\n.\r\nMAIL", [EndOfData(b"a\r\n")]),
        (b"a\n.\r\nb\r\n.\r\n", [MalformedEndOfData(b".\r\n"), EndOfData(b"", TextProblem.BARE_LF)]),
        (b"a\r\n.\nb\r\n.\r\n", [MalformedEndOfData(b".\n"), EndOfData(b"", TextProblem.BARE_LF)]),
        (b"a\rb\r\n.\r\n", [EndOfData(b"", TextProblem.BARE_CR)]),
        (b"a\x00\r\n.\r\n", [EndOfData(b"", TextProblem.NUL)]),
        (b"x" * 30 + b"\r\n.\r\n", [EndOfData(b"", TextProblem.OVERSIZE)]),
        (b"a\r\n.", []),
    ],
)
def test_data_reader(wire: bytes, events: list[object]) -> None:
    assert _data(wire, max_size=20) == events


def test_an_overlong_text_line_is_refused_at_the_end() -> None:
    assert _data(b"x" * 1001 + b"\r\n.\r\n") == [EndOfData(b"", TextProblem.LINE_TOO_LONG)]


def test_bare_lf_ends_data_is_a_fault() -> None:
    assert _data(b"a\n.\r\nMAIL", bare_lf_ends_data=True) == [EndOfData(b"", TextProblem.BARE_LF)]


# -- replies


def _replies(wire: bytes) -> list[tuple[bytes, ReceivedReply | None]]:
    reader = ReplyReader()
    reader.feed(wire)
    out = []
    while (event := reader.next_line()) is not None:
        out.append((event.line, event.reply))
    return out


def test_reply_reader_table() -> None:
    assert _replies(b"250-a\r\n250 b\r\n220\r\n") == [
        (b"250-a", None),
        (b"250 b", ReceivedReply(250, (b"a", b"b"), b"250-a\r\n250 b\r\n")),
        (b"220", ReceivedReply(220, (b"",), b"220\r\n")),
    ]
    assert _replies(b"421 bye\n")[0][1] == ReceivedReply(421, (b"bye",), b"421 bye\n")


@pytest.mark.parametrize(
    ("wire", "error", "line"),
    [
        (b"hello\r\n", errors.MalformedReplyLine, b"hello"),
        (b"600 no\r\n", errors.MalformedReplyLine, b"600 no"),
        (b"250 " + b"x" * 2048 + b"\r\n", errors.ReplyLineTooLong, b"250 " + b"x" * 2048),
        (b"250-" + b"x" * 2100, errors.ReplyLineTooLong, None),
        (b"250-x\r\n" * 101, errors.TooManyReplyLines, b"250-x"),
    ],
)
def test_reply_reader_errors_carry_the_input(wire: bytes, error: type[errors.ReplyError], line: bytes | None) -> None:
    with pytest.raises(error) as caught:
        _replies(wire)
    assert caught.value.line == line and caught.value.data


def test_reply_rendering() -> None:
    assert (
        Reply(250, "", "HELP", ("esa Hello", "PIPELINING")).wire == b"250-esa Hello\r\n250-PIPELINING\r\n250 HELP\r\n"
    )
    assert Reply(530, "5.7.0", "Must issue a STARTTLS command first").wire == (
        b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    )
    rendered = Reply(250, "", "c", ("a", "b")).wire
    assert [r.text for r in [read_one_reply(rendered)]] == ["250-a\r\n250-b\r\n250 c"]


def read_one_reply(data: bytes) -> ReceivedReply:
    reader = ReplyReader()
    reader.feed(data)
    reply = reader.next_reply()
    assert reply is not None
    return reply


# -- the state table


ALL = [(state, move) for state in ServerState for move in Move]


@pytest.mark.parametrize(("state", "move"), ALL, ids=[f"{s.name}-{m.name}" for s, m in ALL])
def test_every_move_of_the_state_table(state: ServerState, move: Move) -> None:
    machine = ServerStateMachine(state)
    target = TRANSITIONS[state].get(move)
    if target is None:
        with pytest.raises(errors.LocalProtocolError):
            machine.move(move)
        assert machine.state is state
    else:
        assert machine.move(move) is target


def test_the_table_reaches_every_state_and_closes_from_every_open_one() -> None:
    reached = {target for moves in TRANSITIONS.values() for target in moves.values()}
    assert reached | {ServerState.GREETING} == set(ServerState)
    assert all(TRANSITIONS[s].get(Move.CLOSE) is ServerState.CLOSED for s in ServerState if s is not ServerState.CLOSED)


# -- any split of the input gives the same events


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


WIRE = st.lists(
    st.sampled_from([b"EHLO a\r\n", b"250-x\r\n", b"250 y\r\n", b"\n", b"\r", b".", b"\x00", b"a", b"X" * 700]),
    max_size=12,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(WIRE, st.lists(st.integers(0, 8000), max_size=8))
def test_command_lines_do_not_depend_on_the_split(wire: bytes, cuts: list[int]) -> None:
    def read(pieces: list[bytes]) -> list[object]:
        """What the session sees: each line's text, or the kind of error (an overlong line's head may be gone)."""
        lines, out = LineReader(), []
        for piece in pieces:
            lines.feed(piece)
            while (taken := next_command_line(lines)) is not None:
                try:
                    out.append(command_text(*taken))
                except errors.CommandLineError as error:
                    out.append(type(error))
            lines.compact()
        return out

    assert read(_splits(wire, cuts)) == read([wire]) == read([wire[i : i + 1] for i in range(len(wire))])


@settings(max_examples=200, deadline=None)
@given(WIRE, st.lists(st.integers(0, 8000), max_size=8))
def test_message_text_does_not_depend_on_the_split(wire: bytes, cuts: list[int]) -> None:
    wire += b"\r\n.\r\n"

    def read(pieces: list[bytes]) -> list[object]:
        lines = LineReader()
        reader, out = DataReader(lines, 2000), []
        for piece in pieces:
            lines.feed(piece)
            while (event := reader.next_event()) is not None:
                if isinstance(event, EndOfData):  # accepted text, or refused (why may depend on a dropped head)
                    out.append((event.text, event.problem is None))
            lines.compact()
        return out

    assert read(_splits(wire, cuts)) == read([wire]) == read([wire[i : i + 1] for i in range(len(wire))])


@settings(max_examples=200, deadline=None)
@given(WIRE, st.lists(st.integers(0, 8000), max_size=8))
def test_replies_do_not_depend_on_the_split(wire: bytes, cuts: list[int]) -> None:
    def read(pieces: list[bytes]) -> list[object]:
        reader, out = ReplyReader(), []
        try:
            for piece in pieces:
                reader.feed(piece)
                while (event := reader.next_line()) is not None:
                    out.append(event)
        except errors.ReplyError as exc:
            out.append(type(exc))  # (an overlong line may be refused before it ends)
        return out

    assert read(_splits(wire, cuts)) == read([wire]) == read([wire[i : i + 1] for i in range(len(wire))])


def _events_line_by_line(wire: bytes, max_size: int) -> list[object]:
    """The reference: every line through the per-line reading (the block fast path turned off)."""
    lines = LineReader()
    reader = DataReader(lines, max_size)
    reader._take_plain_lines = lambda: None  # type: ignore[method-assign]
    lines.feed(wire)
    out: list[object] = []
    while (event := reader.next_event()) is not None:
        out.append(event)
    return out


PLAIN_LINES = st.lists(st.sampled_from([b"Subject: x", b"", b"body text", b".", b"..", b"x" * 998, b"a\rb", b"c\x00"]))


@settings(max_examples=300, deadline=None)
@given(PLAIN_LINES, st.sampled_from([b"\r\n", b"\n"]), st.integers(0, 3000))
def test_message_text_taken_as_a_block_is_what_line_by_line_reading_takes(
    body: list[bytes], end: bytes, max_size: int
) -> None:
    wire = b"".join(line + end for line in body) + b"\r\n.\r\n"
    assert _data(wire, max_size=max_size) == _events_line_by_line(wire, max_size)


@pytest.mark.parametrize(
    ("wire", "text"),
    [
        (b"Subject: a\r\n\r\nline\r\n.\r\n", b"Subject: a\r\n\r\nline\r\n"),
        (b"one\r\n..stuffed\r\ntwo\r\n.\r\n", b"one\r\n.stuffed\r\ntwo\r\n"),
        (b"x" * 18 + b"\r\n.\r\n", b"x" * 18 + b"\r\n"),  # exactly the size limit (20)
    ],
)
def test_plain_message_text_is_taken_whole(wire: bytes, text: bytes) -> None:
    assert _data(wire, max_size=20) == [EndOfData(text)]
