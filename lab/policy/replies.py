"""The replies the policy core gives (docs/rules.md §2-3), as ``Reply`` values (rendered by ``lab.smtp.core``).

Reply text is ours; the codes and enhanced codes are what the lab's own listener sends.
"""

from __future__ import annotations

from lab.smtp.core.events import Reply

__all__ = ["Reply"]


MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
LACK_OF_SECURITY = Reply(554, "5.7.0", "Command refused due to lack of security")
STARTTLS_NOT_IMPLEMENTED = Reply(502, "5.5.1", "STARTTLS not implemented")
STARTTLS_NO_PARAMETERS = Reply(501, "5.5.4", "Syntax error (no parameters allowed)")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
READY_TO_START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
SEND_EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LF = Reply(500, "5.5.2", "Bare LF not allowed")
BARE_CR = Reply(500, "5.5.2", "Bare CR not allowed")
NUL_BYTE = Reply(500, "5.5.2", "NUL byte not allowed")
UNRECOGNIZED = Reply(500, "5.5.1", "Command unrecognized")
OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many concurrent connections, try again later")
TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")  # RFC 5321 3.8; the session puts its host name first
