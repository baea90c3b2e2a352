"""An aiosmtpd peer in its own process: plain (no STARTTLS), tls (STARTTLS offered) or require (require_starttls).

``AiosmtpdPeer`` launches ``python -m peers.aiosmtpd_peer`` as a subprocess, so the peer is a real separate
SMTP server with its own event loop, stopped by PID like Postfix. The server stores every message in a Maildir
under the work directory and stamps it with an ``X-Smtplab-TLS`` header saying whether (and how) TLS carried it.

Run by hand::

    PYTHONPATH=tests python3 -m peers.aiosmtpd_peer --host 127.25.0.9 --port 2526 --mode require \\
        --cert host.pem --key host.key --maildir /tmp/box
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lab
import peers
from lab.errors import BadInput, HarnessError
from peers import START_TIMEOUT, Peer, check_loopback, write_file

Mode = Literal["plain", "tls", "require"]
MODES: tuple[str, ...] = get_args(Mode)
TLS_HEADER = "X-Smtplab-TLS"


def unavailable_reason() -> str | None:
    """Why an aiosmtpd peer cannot run with this interpreter, or None when it can."""
    if importlib.util.find_spec("aiosmtpd") is None:
        return f"aiosmtpd is not installed for {sys.executable} (pip install aiosmtpd)"
    return None


def available() -> bool:
    return unavailable_reason() is None


class AiosmtpdPeer(Peer):
    """aiosmtpd on ``address:port`` in a child process, in one of the three STARTTLS modes."""

    kind = "aiosmtpd"

    def __init__(
        self,
        workdir: Path,
        address: str = "127.0.0.26",
        port: int | None = None,
        mode: Mode = "plain",
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        *,
        hostname: str = "aiosmtpd.peer.test",
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        super().__init__(workdir, address, port, start_timeout)
        if mode not in MODES:
            raise BadInput(f"{mode!r} is not one of {', '.join(MODES)}", field="mode")
        if (cert_pem is None) != (key_pem is None):
            raise BadInput("give both cert_pem and key_pem, or neither", field="cert_pem")
        if mode != "plain" and cert_pem is None:
            raise BadInput(f"mode {mode} needs a certificate (cert_pem, key_pem)", field="cert_pem")
        self.mode: Mode = mode
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.hostname = hostname

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr: aiosmtpd's own session log plus one ``delivered`` line per message."""
        return self.workdir / "aiosmtpd.log"

    def argv(self) -> list[str]:
        """The command line of the server process (the same one ``docs/peers.md`` shows for running it by hand)."""
        argv = [
            sys.executable, "-m", "peers.aiosmtpd_peer", "--host", self.address, "--port", str(self.port),
            "--mode", self.mode, "--maildir", str(self.maildir), "--hostname", self.hostname,
        ]  # fmt: skip
        if self.cert_pem is not None:
            argv += ["--cert", str(self.workdir / "cert.pem"), "--key", str(self.workdir / "key.pem")]
        return argv

    def start(self) -> None:
        if self.running:
            return
        reason = unavailable_reason()
        if reason:
            raise HarnessError(f"cannot start an aiosmtpd peer: {reason}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.cert_pem is not None and self.key_pem is not None:
            write_file(self.workdir / "cert.pem", self.cert_pem, 0o644)
            write_file(self.workdir / "key.pem", self.key_pem, 0o600)
        self._spawn(self.argv(), self.log_path, _child_env())
        self._await_banner([self.log_path])

    def stop(self) -> None:
        """SIGTERM the server process we started (SIGKILL if it lingers) and reap it."""
        self._reap()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _child_env() -> dict[str, str]:
    """Our environment, with the directories holding the ``peers`` and ``lab`` packages first on PYTHONPATH."""
    env = dict(os.environ)
    roots = dict.fromkeys(str(Path(package.__file__).resolve().parent.parent) for package in (peers, lab))
    env["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- the server process -----------------------------------------------------------------------------------------


def tls_summary(session: Any) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` when the session ran inside TLS, else ``none``."""
    info = getattr(session, "ssl", None) or {}
    obj = info.get("ssl_object")
    if obj is None:
        return "none"
    cipher = obj.cipher()
    return f"{obj.version()} {cipher[0] if cipher else '?'}"


def _handler(maildir: Path) -> Any:
    from aiosmtpd.handlers import Mailbox

    class RecordingMailbox(Mailbox):
        """aiosmtpd's Maildir handler, plus a header and a log line saying whether TLS carried the message."""

        def prepare_message(self, session: Any, envelope: Any) -> Any:
            message = super().prepare_message(session, envelope)
            message[TLS_HEADER] = tls_summary(session)
            logging.getLogger("peers.aiosmtpd").info(
                "delivered from=<%s> to=%s tls=%s",
                envelope.mail_from,
                ",".join(envelope.rcpt_tos),
                tls_summary(session),
            )
            return message

    return RecordingMailbox(maildir)


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m peers.aiosmtpd_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="loopback address to bind (127.0.0.0/8 only)")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--cert", help="PEM certificate (chain) for STARTTLS; needed by tls and require")
    parser.add_argument("--key", help="PEM private key for --cert")
    parser.add_argument("--maildir", required=True, type=Path, help="where accepted messages are stored")
    parser.add_argument("--hostname", default="aiosmtpd.peer.test", help="name in the banner and EHLO reply")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; exit 3 on bad arguments, like the smtplab command."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        host = check_loopback(args.host, field="--host")
        if args.mode != "plain" and not (args.cert and args.key):
            raise BadInput(f"mode {args.mode} needs --cert and --key", field="--cert")
        ctx = _tls_context(args.cert, args.key) if args.mode != "plain" else None
    except (BadInput, OSError, ssl.SSLError) as exc:
        print(f"aiosmtpd_peer: {exc}", file=sys.stderr)
        return 3
    from aiosmtpd.smtp import SMTP

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    handler = _handler(args.maildir)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def factory() -> SMTP:
        return SMTP(
            handler, hostname=args.hostname, ident="smtplab aiosmtpd peer", tls_context=ctx,
            require_starttls=args.mode == "require",
        )  # fmt: skip

    server = loop.run_until_complete(loop.create_server(factory, host=host, port=args.port))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    logging.getLogger("peers.aiosmtpd").info("serving %s:%d mode=%s", host, args.port, args.mode)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
