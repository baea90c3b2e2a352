"""The spool writer process: stores what ``smtplab serve`` sends it, and answers once each message is durable.

Run as ``python -m lab.appliance.spool_writer FD PID`` by ``lab.appliance.spool_process.SpoolProcess``, with one
end of a local stream socket as FD. It stores batches exactly as the in-process ``GroupCommit`` does
(``Maildir.deliver_many``: each file fsynced, linked into ``new/``, ``new/`` fsynced), and only then answers;
the Maildir names carry PID, the server process that accepted the message, not the writer's own.

Frames, both ways: a request is ``REQUEST`` (request id, message length, path length), the Maildir path, the
message; an answer is ``ANSWER`` (request id, 1 stored / 0 failed, text length) and the text: the message's
name in ``new/``, or why it could not be stored.

The writer ignores SIGINT and SIGTERM (a Ctrl-C in a terminal reaches the whole process group): it stops when
its socket reaches its end, after storing and answering everything it was sent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from lab.appliance.spool import GroupCommit, Maildir, MaildirNames, Outcome, SpoolError

REQUEST = struct.Struct("!IIH")
ANSWER = struct.Struct("!IBI")
READ_SIZE = 1 << 18


def request_frame(request: int, path: bytes, message: bytes) -> bytes:
    return REQUEST.pack(request, len(message), len(path)) + path + message


def answer_frame(request: int, outcome: Outcome) -> bytes:
    text = str(outcome).encode("utf-8", "replace")
    return ANSWER.pack(request, int(not isinstance(outcome, SpoolError)), len(text)) + text


def read_answers(buffer: bytes) -> tuple[list[tuple[int, Outcome]], bytes]:
    """The whole answers at the start of ``buffer``, and what is left of it (part of the next answer)."""
    found: list[tuple[int, Outcome]] = []
    at, size = 0, len(buffer)
    while size - at >= ANSWER.size:
        request, stored, length = ANSWER.unpack_from(buffer, at)
        end = at + ANSWER.size + length
        if end > size:
            break
        text = buffer[at + ANSWER.size : end].decode("utf-8", "replace")
        found.append((request, text if stored else SpoolError(text)))
        at = end
    return found, buffer[at:]


def serve_requests(sock: socket.socket, pid: int) -> None:
    """Read requests until the socket ends; store them in batches; answer each once it is durable."""
    sending = threading.Lock()
    names = MaildirNames(pid=pid)
    maildirs: dict[bytes, Maildir] = {}

    def answer(request: int, outcome: Outcome) -> None:
        with sending, contextlib.suppress(OSError):  # the server gone: it acknowledged nothing it did not hear
            sock.sendall(answer_frame(request, outcome))

    committer = GroupCommit(lambda report: report())  # answers leave from the committer threads
    buffer = bytearray()
    chunk = bytearray(READ_SIZE)
    try:
        while True:
            try:
                count = sock.recv_into(chunk)
            except ConnectionResetError:  # the server closed with answers unread: it waits for none of them
                count = 0
            if not count:
                break
            buffer += memoryview(chunk)[:count]
            at = 0
            while len(buffer) - at >= REQUEST.size:
                request, length, path_length = REQUEST.unpack_from(buffer, at)
                start = at + REQUEST.size
                end = start + path_length + length
                if end > len(buffer):
                    break
                path, message = bytes(buffer[start : start + path_length]), bytes(buffer[start + path_length : end])
                at = end

                def done(outcome: Outcome, request: int = request) -> None:
                    answer(request, outcome)

                _submit(committer, maildirs, names, path, message, done)
            del buffer[:at]
    finally:
        committer.stop()  # everything received is stored and answered before the process ends


def _submit(
    committer: GroupCommit,
    maildirs: dict[bytes, Maildir],
    names: MaildirNames,
    path: bytes,
    message: bytes,
    done: Callable[[Outcome], None],
) -> None:
    try:
        maildir = maildirs.get(path)
        if maildir is None:
            maildir = maildirs[path] = Maildir(Path(os.fsdecode(path)), name_source=names)
        committer.submit(maildir, message, done)
    except SpoolError as exc:
        done(exc)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the writer stops: its socket's end
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) != 2 or not all(item.isascii() and item.isdecimal() for item in argv):
        print("usage: python -m lab.appliance.spool_writer FD PID (started by smtplab serve)", file=sys.stderr)
        return 2
    try:
        sock = socket.socket(fileno=int(argv[0]))
        if sock.type != socket.SOCK_STREAM:
            raise OSError(f"descriptor {argv[0]} is not a stream socket")
    except OSError as exc:
        print(f"lab.appliance.spool_writer: descriptor {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        serve_requests(sock, int(argv[1]))
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
