"""Which wait of an SMTP connection is bounded by what, and when the next one expires (no I/O).

Every wait of a listener connection is bounded (docs/config-format.md, "Timeouts"), after Postfix's
``smtpd_timeout`` with ``smtpd_per_record_deadline`` and ``smtpd_starttls_timeout``:

- ``idle``: no input at all for this long (any state, the TLS handshake included);
- ``command``: each record (a command line, or one line of message text) must be complete within this long
  from when the server began waiting for it, so a client trickling one byte at a time cannot reset it;
- ``tls_handshake``: from the 220 to STARTTLS until the handshake completes;
- ``data``: the whole DATA phase, from the 354 to the final dot;
- ``session``: the whole connection;
- ``close_grace``: after the listener closed gracefully (421, close_notify), how long the peer has to let the
  close complete before the connection is aborted (a peer that does not read can hold a graceful close open).

``Watch`` is an immutable record of one connection's timestamps; the listener updates it on every event and
asks ``expiry()`` for the earliest deadline that applies in the current ``Phase``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import NamedTuple

from lab.policy.replies import Reply

#: The largest value any timeout may take (one day): a bound that is meant to bind.
MAX_SECONDS = 86400.0


@dataclass(frozen=True)
class Timeouts:
    """Seconds; every field finite, positive and at most ``MAX_SECONDS`` (``problems`` says which is not)."""

    idle: float = 300.0  # RFC 5321 4.5.3.2.7: a server waits at least 5 minutes for the next command
    command: float = 300.0
    tls_handshake: float = 60.0
    data: float = 900.0
    session: float = 3600.0
    close_grace: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        """(field, problem) for every value that is not a usable bound; empty when all are."""
        out: list[tuple[str, str]] = []
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                out.append((item.name, f"{value!r} is not a number of seconds"))
            elif math.isnan(value) or math.isinf(value):
                out.append((item.name, f"{value!r} is not a finite number of seconds"))
            elif not 0 < value <= MAX_SECONDS:
                out.append((item.name, f"{value!r} is out of range: more than 0 and at most {MAX_SECONDS:g} seconds"))
        return out


class Phase(Enum):
    COMMAND = "command"  # waiting for command lines (plaintext or inside TLS)
    DATA = "data"  # between the 354 and the final dot
    HANDSHAKE = "handshake"  # after the 220 to STARTTLS, until the handshake completes
    DELIVERY = "delivery"  # the spool is writing a message; the client waits for us, not we for it
    CLOSING = "closing"  # the listener closed gracefully; waiting for the close to complete


class Expiry(NamedTuple):
    """The next deadline: when, which one (the mail log's words) and how the listener ends the connection."""

    at: float
    what: str
    graceful: bool  # True: 421 and a graceful close; False: abort (mid-handshake, or a graceful close stuck)

    @property
    def reply(self) -> Reply:
        return Reply(421, "4.4.2", f"{self.what[:1].upper()}{self.what[1:]}, closing connection")


IDLE = "idle timeout"
COMMAND = "command deadline"
HANDSHAKE = "TLS handshake deadline"
DATA = "DATA deadline"
SESSION = "session deadline"
CLOSE = "close deadline"


class Watch(NamedTuple):
    """The timestamps of one connection that its deadlines are measured from (a tuple: cheap to make per read)."""

    timeouts: Timeouts
    connected: float
    phase: Phase = Phase.COMMAND
    phase_since: float = 0.0
    last_input: float = 0.0
    record_since: float = 0.0

    @classmethod
    def start(cls, timeouts: Timeouts, now: float) -> Watch:
        return cls(timeouts, now, Phase.COMMAND, now, now, now)

    def received(self, now: float, completes_record: bool) -> Watch:
        """Input arrived; when it ends a record (a line), the wait for the next record starts now."""
        record_since = now if completes_record else self.record_since  # built directly: this runs for every read
        return Watch(self.timeouts, self.connected, self.phase, self.phase_since, now, record_since)

    def enter(self, phase: Phase, now: float) -> Watch:
        """A new phase; leaving the handshake or a delivery also starts the wait for the next record afresh."""
        if phase is self.phase:
            return self
        return Watch(self.timeouts, self.connected, phase, now, max(self.last_input, now), now)

    def expiry(self) -> Expiry:
        """The earliest deadline that applies in the current phase (ties: the first listed below)."""
        t = self.timeouts
        if self.phase is Phase.CLOSING:
            return Expiry(self.phase_since + t.close_grace, CLOSE, graceful=False)
        phase = self.phase
        at, what = self.connected + t.session, SESSION  # checked last below: earlier entries win ties
        if phase is Phase.COMMAND or phase is Phase.DATA:
            at, what = _earlier(self.record_since + t.command, COMMAND, at, what)
        if phase is not Phase.DELIVERY:
            at, what = _earlier(self.last_input + t.idle, IDLE, at, what)
        if phase is Phase.DATA:
            at, what = _earlier(self.phase_since + t.data, DATA, at, what)
        if phase is Phase.HANDSHAKE:
            at, what = _earlier(self.phase_since + t.tls_handshake, HANDSHAKE, at, what)
        return Expiry(at, what, phase is not Phase.HANDSHAKE)

    def due(self, now: float, slack: float = 1e-6) -> Expiry | None:
        """The expiry if it has passed at ``now`` (``slack`` absorbs float rounding of timers), else None."""
        expiry = self.expiry()
        return expiry if expiry.at <= now + slack else None


def _earlier(at: float, what: str, best_at: float, best_what: str) -> tuple[float, str]:
    """``(at, what)`` if it is no later than the best so far (so the deadline listed first wins a tie)."""
    return (at, what) if at <= best_at else (best_at, best_what)
