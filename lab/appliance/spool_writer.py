"""The spool writer process: stores what ``smtplab serve`` sends it, and answers once each message is durable.

Run as ``python -m lab.appliance.spool_writer FD PID PARENT`` by ``lab.appliance.spool_process.SpoolProcess``, with one
end of a local stream socket as FD. It stores each batch with ``Maildir.deliver_many`` (each file fsynced,
linked into ``new/``, ``new/`` fsynced once for the batch), and only then answers;
the Maildir names carry PID, the server process that accepted the message, not the writer's own.

Frames, both ways: a request is ``REQUEST`` (request id, message length, path length), the Maildir path, the
message; an answer is ``ANSWER`` (request id, 1 stored / 0 failed, text length) and the text: the message's
name in ``new/``, or why it could not be stored.

The writer ignores SIGINT and SIGTERM (the server decides when it stops): it stops when its socket reaches its
end, after storing and answering everything it was sent. A server killed outright (kill -9) takes its writer
with it (``PR_SET_PDEATHSIG``): what the writer held had no 250 yet, and the next start clears ``tmp/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from lab.appliance.spool import Maildir, MaildirNames, Outcome, SpoolError
from lab.lifetime import die_with_parent

REQUEST = struct.Struct("!IIH")
ANSWER = struct.Struct("!IBI")
READ_SIZE = 1 << 18
#: Seconds a batch stays open after its first message arrives. Larger batches share the fsync of ``new/`` and
#: the writer's wake-ups: with 50 STARTTLS clients (about 500 messages/s) a 2 ms window cut the CPU per session
#: by a tenth (docs/benchmarks.md); each 250 waits up to that much longer.
BATCH_WINDOW = 0.002


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
    """Read requests until the socket ends; store each batch; answer its messages once they are durable.

    One thread: a batch is everything that arrived while the previous one was being stored, or within
    ``BATCH_WINDOW`` of its first message (the busier the server, the larger the batch and the fewer fsyncs of
    ``new/`` per message); no hand-over between threads.
    """
    names = MaildirNames(pid=pid)
    maildirs: dict[bytes, Maildir] = {}
    buffer = bytearray()
    chunk = bytearray(READ_SIZE)
    while _read(sock, chunk, buffer, wait=True):
        time.sleep(BATCH_WINDOW)  # let the messages of other sessions join this batch
        _read(sock, chunk, buffer, wait=False)  # and whatever else is already there
        batch, taken = read_requests(buffer)
        del buffer[:taken]
        frames = [answer_frame(request, outcome) for request, outcome in _store(batch, maildirs, names)]
        with contextlib.suppress(OSError):  # the server gone: it acknowledged nothing it did not hear back
            sock.sendall(b"".join(frames))


def read_requests(buffer: bytes | bytearray) -> tuple[list[tuple[int, bytes, bytes]], int]:
    """The whole requests (id, Maildir path, message) at the start of ``buffer``, and how many bytes they took."""
    found: list[tuple[int, bytes, bytes]] = []
    at, size = 0, len(buffer)
    while size - at >= REQUEST.size:
        request, length, path_length = REQUEST.unpack_from(buffer, at)
        start = at + REQUEST.size
        end = start + path_length + length
        if end > size:
            break
        found.append((request, bytes(buffer[start : start + path_length]), bytes(buffer[start + path_length : end])))
        at = end
    return found, at


def _read(sock: socket.socket, chunk: bytearray, buffer: bytearray, *, wait: bool) -> bool:
    """Append what the socket has to ``buffer`` (``wait``: block for the first bytes); False at its end."""
    sock.setblocking(wait)
    try:
        while count := sock.recv_into(chunk):
            buffer += memoryview(chunk)[:count]
            if wait:
                return True
        return False
    except BlockingIOError:
        return True
    except ConnectionResetError:  # the server closed with answers unread: it waits for none of them
        return False


def _store(
    batch: list[tuple[int, bytes, bytes]], maildirs: dict[bytes, Maildir], names: MaildirNames
) -> list[tuple[int, Outcome]]:
    """Store a batch, one ``deliver_many`` per Maildir (an fsync per file, one of ``new/``); each one's outcome."""
    by_dir: dict[bytes, list[tuple[int, bytes]]] = {}
    for request, path, message in batch:
        by_dir.setdefault(path, []).append((request, message))
    done: list[tuple[int, Outcome]] = []
    for path, items in by_dir.items():
        try:
            maildir = maildirs.get(path)
            if maildir is None:
                maildir = maildirs[path] = Maildir(Path(os.fsdecode(path)), name_source=names)
            outcomes = maildir.deliver_many([message for _request, message in items])
        except Exception as exc:  # never lose an answer: every message of this Maildir fails
            outcomes = [SpoolError(f"cannot spool to {os.fsdecode(path)}: {exc}")] * len(items)
        done += [(request, outcome) for (request, _message), outcome in zip(items, outcomes, strict=True)]
    return done


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the writer stops: its socket's end
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) not in (2, 3) or not all(item.isascii() and item.isdecimal() for item in argv):
        print("usage: python -m lab.appliance.spool_writer FD PID [PARENT] (started by smtplab serve)", file=sys.stderr)
        return 2
    if len(argv) == 3:
        die_with_parent(int(argv[2]), signal.SIGKILL)  # a server killed outright takes its writer with it
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
