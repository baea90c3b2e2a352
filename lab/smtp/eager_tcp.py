"""TCP for ``smtplab serve``: replies sent when written, and listening sockets several processes can share.

Twisted's TCP transport buffers every ``write`` until the reactor's next turn: an epoll modify to start
watching for writability, a turn of the loop, the ``send``, and a modify to stop watching. An SMTP reply is a
few dozen bytes that the socket almost always takes at once, so ``EagerServer`` sends it in ``write`` when
nothing is waiting before it, and buffers only what the socket did not take (then Twisted's own path goes on:
writability, backpressure to the producer, errors). The bytes and their order are the same; only when they
leave changes. Inside TLS the same holds for the encrypted records, which Twisted's TLS layer writes through
the class ``startTLS`` is given (Twisted's TLS layer still gathers the small writes of one reactor turn into one
write at the end of it, so a pipelined group's replies leave in few records).

``listen`` opens the port; with ``reuse_port`` the socket gets ``SO_REUSEPORT`` so that the worker processes of
``smtplab serve --workers N`` each listen on the same address and the kernel spreads connections among them.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import _newtls, tcp
from twisted.internet.abstract import FileDescriptor


def _write_now(connection: Any, data: bytes) -> None:
    """``FileDescriptor.write``, but first try to send ``data`` at once when nothing is queued before it."""
    if (
        data
        and connection._eager
        and connection.connected
        and not connection.disconnecting
        and not connection._tempDataBuffer
        and connection.offset >= len(connection.dataBuffer)
    ):
        sent = connection.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
        # an error (an exception returned) falls through: the buffered write's doWrite meets it and closes
    FileDescriptor.write(connection, data)


class _EagerDescriptor(FileDescriptor):
    """The base ``startTLS`` writes TLS records through (``twisted.internet._newtls._BypassTLS``)."""

    def write(self, data: bytes) -> None:
        _write_now(self, data)


class EagerServer(tcp.Server):
    """A server-side TCP connection whose writes leave at once when the socket takes them.

    Not before its first read: the banner written in ``connectionMade`` goes out when the reactor's turn ends,
    as Twisted sends it, after the listening port's accept loop. Sent at once, a client could read it, close and
    connect again while that loop still runs, and its new connection would be counted beside the closed one
    against Max Concurrency (the close is only seen on a later turn).
    """

    _eager = False

    def doRead(self) -> Any:
        self._eager = True
        return super().doRead()

    def write(self, data: bytes) -> None:
        if self.TLS:
            super().write(data)  # type: ignore[no-untyped-call]  # through the TLS layer, which writes its records with _EagerDescriptor
        else:
            _write_now(self, data)

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        _newtls.startTLS(self, ctx, normal, _EagerDescriptor)  # type: ignore[no-untyped-call]


class ServingPort(tcp.Port):
    """A listening port whose connections are ``EagerServer``; ``reuse_port``: set ``SO_REUSEPORT``."""

    transport = EagerServer

    def __init__(self, *args: Any, reuse_port: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reuse_port = reuse_port

    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = super().createInternetSocket()  # type: ignore[no-untyped-call]
        if self._reuse_port:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt


def listen(
    reactor: Any, port: int, factory: Any, *, backlog: int, interface: str, reuse_port: bool = False
) -> ServingPort:
    """Listen on ``interface:port`` (``CannotListenError`` if not), as ``reactor.listenTCP`` does."""
    listening = ServingPort(port, factory, backlog, interface, reactor, reuse_port=reuse_port)
    listening.startListening()
    return listening
