"""The server session's states and the moves between them, as a table (after h11's ``_state.py``).

``TRANSITIONS[state][move]`` is the next state; a move the table does not list raises ``LocalProtocolError``
(a bug in the session, never the client's fault: a command the state does not allow gets a reply, not a move).
"""

from __future__ import annotations

import enum

from lab.smtp.core.errors import LocalProtocolError


class ServerState(enum.Enum):
    GREETING = "greeting"  # connected: no EHLO/HELO yet (again after TLS, RFC 3207 4.2)
    READY = "ready"  # greeted, no transaction
    TRANSACTION = "transaction"  # MAIL accepted, recipients being collected
    DATA = "data"  # after the 354, reading message text up to <CRLF>.<CRLF>
    DELIVERING = "delivering"  # the message is being spooled: input waits (paused) until the spool answers
    TLS_PENDING = "tls pending"  # the 220 to STARTTLS is out: the handshake runs, no plaintext is read
    CLOSED = "closed"


class Move(enum.Enum):
    GREETED = "EHLO/HELO accepted"
    RESET = "RSET"
    MAIL_ACCEPTED = "MAIL accepted"
    DATA_ACCEPTED = "354 sent"
    TEXT_ACCEPTED = "end of data, message handed to the spool"
    TEXT_REFUSED = "end of data, message refused"
    DELIVERED = "the spool answered"
    STARTTLS_ACCEPTED = "220 to STARTTLS sent"
    TLS_ESTABLISHED = "handshake completed"
    CLOSE = "close"


S, M = ServerState, Move

TRANSITIONS: dict[ServerState, dict[Move, ServerState]] = {
    S.GREETING: {
        M.GREETED: S.READY,
        M.RESET: S.GREETING,
        M.STARTTLS_ACCEPTED: S.TLS_PENDING,
        M.CLOSE: S.CLOSED,
    },
    S.READY: {
        M.GREETED: S.READY,
        M.RESET: S.READY,
        M.MAIL_ACCEPTED: S.TRANSACTION,
        M.STARTTLS_ACCEPTED: S.TLS_PENDING,
        M.CLOSE: S.CLOSED,
    },
    S.TRANSACTION: {
        M.GREETED: S.READY,
        M.RESET: S.READY,
        M.DATA_ACCEPTED: S.DATA,
        M.STARTTLS_ACCEPTED: S.TLS_PENDING,
        M.CLOSE: S.CLOSED,
    },
    S.DATA: {
        M.TEXT_ACCEPTED: S.DELIVERING,
        M.TEXT_REFUSED: S.READY,
        M.CLOSE: S.CLOSED,
    },
    S.DELIVERING: {
        M.DELIVERED: S.READY,
        M.CLOSE: S.CLOSED,
    },
    S.TLS_PENDING: {
        M.TLS_ESTABLISHED: S.GREETING,
        M.CLOSE: S.CLOSED,
    },
    S.CLOSED: {},
}

#: The states in which command lines are read.
COMMAND_STATES = frozenset({S.GREETING, S.READY, S.TRANSACTION})


class ServerStateMachine:
    """The one piece of state a server session's phase is: moved only through ``TRANSITIONS``."""

    def __init__(self, state: ServerState = ServerState.GREETING) -> None:
        self.state = state

    def move(self, move: Move) -> ServerState:
        try:
            self.state = TRANSITIONS[self.state][move]
        except KeyError:
            raise LocalProtocolError(self.state, move) from None
        return self.state

    def __repr__(self) -> str:
        return f"ServerStateMachine({self.state})"
