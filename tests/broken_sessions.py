"""Deliberately broken server sessions: each reintroduces one STARTTLS bug real MTAs have shipped.

The acceptance tests run the catalogue against listeners built on these (``RunOptions(session_class=...)``) to
prove that the verdicts can fail, and fail on the right cases. Each class breaks exactly one rule of SPEC.md 3
and keeps every other behaviour of ``ServerSession``.
"""

from __future__ import annotations

from lab.policy.modes import ClientCert, TLSMode
from lab.smtp.session import Action, Send, ServerSession, TLSInfo


class InjectionExecutingSession(ServerSession):
    """CVE-2011-0411: plaintext pipelined behind STARTTLS survives the handshake and is executed inside TLS.

    Breaks SPEC.md 3 rule 3: the buffer behind the STARTTLS line is kept, and read as soon as TLS is up, as
    the vulnerable Postfix, Exim and qmail versions did.
    """

    def _cmd_starttls(self, _argument: str) -> list[Action]:
        kept = self._reader.take()
        self._reader.feed(kept)
        actions = super()._cmd_starttls(_argument)  # logs and discards ...
        self._reader.feed(kept)  # ... but keeps them after all
        return actions

    def tls_started(self, info: TLSInfo, client_cert: ClientCert = ClientCert.NONE) -> list[Action]:
        kept = self._reader.take()
        actions = super().tls_started(info, client_cert)
        self._reader.feed(kept)
        return [*actions, *self.receive(b"")]


class GateBypassSession(ServerSession):
    """Serves MAIL before TLS under Required (the command gate is skipped for MAIL only).

    Breaks SPEC.md 2 (Required: only EHLO, NOOP, QUIT and STARTTLS before TLS).
    """

    def _command(self, line: str) -> list[Action]:
        verb, _, argument = line.strip().partition(" ")
        if verb.upper() == "MAIL" and self.mode is TLSMode.REQUIRED and self.tls is None:
            return self._cmd_mail(argument.strip())
        return super()._command(line)


class StateKeepingSession(ServerSession):
    """Keeps the EHLO name and the envelope across the handshake (no reset in ``tls_started``).

    Breaks SPEC.md 3 rule 4, as twisted.mail's ESMTP does: what the client said in plaintext still counts
    inside TLS.
    """

    def tls_started(self, info: TLSInfo, client_cert: ClientCert = ClientCert.NONE) -> list[Action]:
        greeting, transaction = self.greeting, self._transaction
        actions = super().tls_started(info, client_cert)
        self.greeting, self._transaction = greeting, transaction
        return actions


class StartTLSAdvertisedInsideTLS(ServerSession):
    """Lists STARTTLS in its EHLO reply inside TLS too.

    Breaks SPEC.md 3 rule 2 (RFC 3207 4.2: EHLO inside TLS never lists STARTTLS).
    """

    def _cmd_ehlo(self, argument: str) -> list[Action]:
        actions = super()._cmd_ehlo(argument)
        if self.tls is None or not actions:
            return actions
        first = actions[0]
        assert isinstance(first, Send)
        return [Send(first.data.replace(b"250 HELP", b"250-STARTTLS\r\n250 HELP")), *actions[1:]]


class BareLFEndOfDataSession(ServerSession):
    """Takes ``<LF>.<CR><LF>`` for the end of data: in the message text, any LF ends a line.

    Breaks SPEC.md 3 rule 9 as Postfix before smtpd_forbid_bare_newline, Sendmail before 8.18 and Exim before
    4.97.1 did (SMTP smuggling, CVE-2023-51764, -51765, -51766): the forged transaction behind the false end is
    executed.
    """

    def _take_data_line(self, actions: list[Action]) -> bool:
        if self._data is not None:
            self._data.after_crlf = True
        return super()._take_data_line(actions)
