"""TLS secrets of one run, in the NSS key-log format Wireshark reads (SSLKEYLOGFILE).

A capture of the lab's TLS is only useful for teaching if you can see inside it, and we hold both ends of every
handshake, so we keep their secrets. Both ends log the same TLS 1.3 secrets; ``KeyLog`` keeps each line once, in
the order it was first seen.
"""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL

from lab.errors import HarnessError

_HEX = frozenset(b"0123456789abcdefABCDEF")


def _well_formed(line: bytes) -> bool:
    """``LABEL <client_random hex> <secret hex>``, as OpenSSL writes every key-log line."""
    fields = line.split(b" ")
    return len(fields) == 3 and fields[0].isupper() and all(f and set(f) <= _HEX for f in fields[1:])


class KeyLog:
    """Collects key-log lines from any number of TLS connections and writes them as one file.

    ``callback(line)`` is the ``keylog=`` argument of the lab's TLS connection creators;
    ``ssl_callback(conn, line)`` has the signature of ``OpenSSL.SSL.Context.set_keylog_callback``.
    """

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._seen: set[bytes] = set()

    def callback(self, line: bytes) -> None:
        """Record one line (without its newline); repeats are ignored."""
        line = bytes(line).rstrip(b"\r\n")
        if not line:
            return
        if not _well_formed(line):
            raise HarnessError(f"not an NSS key-log line: {line[:40]!r}")
        if line not in self._seen:
            self._seen.add(line)
            self._lines.append(line)

    def ssl_callback(self, conn: SSL.Connection, line: bytes) -> None:
        """Adapter for ``SSL.Context.set_keylog_callback``, which also passes the connection."""
        self.callback(line)

    def install(self, context: SSL.Context) -> None:
        """Log the secrets of every connection made from ``context``."""
        context.set_keylog_callback(self.ssl_callback)

    @property
    def lines(self) -> list[bytes]:
        return list(self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    def __bool__(self) -> bool:
        return bool(self._lines)

    def dumps(self) -> bytes:
        """The file's bytes: one line per secret, each ending in LF."""
        return b"".join(line + b"\n" for line in self._lines)

    def write(self, path: Path) -> None:
        """Write the SSLKEYLOGFILE (an empty file when nothing was logged, so a report can always link it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.dumps())
