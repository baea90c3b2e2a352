"""The listener side by side with its peers, in one run, on loopback. Prints figures; asserts nothing.

    python3 benchmarks/bench_listener.py [--seconds 6] [--rounds 2] [--keys rsa,ec] [--modes starttls,plain]
                                         [--concurrency 50,500] [--drivers 2] [--idle 10000]

Servers, each in its own process on its own 127.x address, all with the same certificate (RSA-2048 or EC P-256,
generated for the run): ``smtplab serve`` (durable spool; with ``--workers N`` also ``smtplab serve --workers N``
beside it, the CPU of its parent and workers summed), aiosmtpd 1.4.6 with a handler that
stores nothing and with its Maildir handler, stock ``twisted.mail.smtp.ESMTP`` with a delivery that stores
nothing, and Postfix when it can run (``tests/peers``). Each measurement is ``--seconds`` of closed-loop load by
``--drivers`` load-generator processes (asyncio and Python's ``ssl``) sharing the concurrent clients; a session is
connect, EHLO, [STARTTLS, EHLO,] MAIL, RCPT, DATA of 1 KiB, QUIT. The servers are measured one after the other,
``--rounds`` times alternated, and the script prints for each: sessions/s, server CPU per session (``/proc/PID/stat``
utime+stime deltas of the server and its children), its RSS, the load generators' own CPU (so one can see they
are not the bottleneck), and smtplab's ratio to each peer. Then ``--idle`` sessions are held after EHLO against
smtplab and its RSS is read. Every phase is bounded in time; servers are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))  # the peers test-helper package
from peers import free_port, wait_for_banner  # noqa: E402

APPLIANCE = Path(__file__).resolve().parent / "appliance-bench.yaml"  # the limits raised for 10k sessions
BODY = ("Subject: bench\r\n\r\n" + ("x" * 78 + "\r\n") * 13).encode()[:1024]
PHASE_LIMIT = 120.0  # no single measurement or idle phase runs longer than this (seconds of wall time)
CONNECT_TIMEOUT = 20.0
PEER_KEYS = {  # server name -> its --peers key
    "aiosmtpd (stores nothing)": "aiosmtpd",
    "aiosmtpd (Maildir)": "aiosmtpd-maildir",
    "twisted.mail ESMTP": "twisted",
    "Postfix 3.7": "postfix",
}


# -- certificates -------------------------------------------------------------------------------------------------


def make_certificate(kind: str, workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the run (RSA-2048 or EC P-256), written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.smtplab.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench.smtplab.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / f"{kind}.pem", workdir / f"{kind}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# -- the peer servers this script runs itself (``--serve KIND``) --------------------------------------------------


def serve_aiosmtpd(host: str, port: int, cert: str, key: str, maildir: str | None) -> None:
    from aiosmtpd.handlers import Mailbox
    from aiosmtpd.smtp import SMTP

    class Discard:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    handler = Mailbox(maildir) if maildir else Discard()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="aiosmtpd.bench", tls_context=context), host, port, backlog=1024
        )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())


def serve_twisted_mail(host: str, port: int, cert: str, key: str) -> None:
    from twisted.internet import defer, protocol, reactor
    from twisted.internet import ssl as tssl
    from twisted.mail import smtp
    from zope.interface import implementer

    @implementer(smtp.IMessage)
    class Discard:
        def lineReceived(self, line: bytes) -> None:
            pass

        def eomReceived(self) -> defer.Deferred[None]:
            return defer.succeed(None)

        def connectionLost(self) -> None:
            pass

    @implementer(smtp.IMessageDelivery)
    class Delivery:
        def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
            return None

        def validateFrom(self, helo: object, origin: object) -> object:
            return origin

        def validateTo(self, user: object) -> Callable[[], Discard]:
            return Discard

    context = tssl.DefaultOpenSSLContextFactory(key, cert)

    class Factory(protocol.ServerFactory):
        def buildProtocol(self, addr: object) -> smtp.ESMTP:
            server = smtp.ESMTP(contextFactory=context)
            server.host = b"twisted.bench"
            server.delivery = Delivery()
            server.factory = self
            return server

    reactor.listenTCP(port, Factory(), backlog=1024, interface=host)
    reactor.run()


# -- the load generator (``--drive``): one process, N closed-loop clients, for a fixed time -----------------------


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def one_session(host: str, port: int, tls: ssl.SSLContext | None) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    try:
        await read_reply(reader)
        writer.write(b"EHLO bench.example\r\n")
        await read_reply(reader)
        if tls is not None:
            writer.write(b"STARTTLS\r\n")
            if not (await read_reply(reader)).startswith(b"220"):
                raise RuntimeError("STARTTLS refused")
            await writer.start_tls(tls)
            writer.write(b"EHLO bench.example\r\n")
            await read_reply(reader)
        for line in (b"MAIL FROM:<a@bench.example>\r\n", b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n"):
            writer.write(line)
            reply = await read_reply(reader)
            if reply[:1] not in (b"2", b"3"):
                raise RuntimeError(reply.decode(errors="replace"))
        writer.write(BODY + b"\r\n.\r\n")
        if not (await read_reply(reader)).startswith(b"250"):
            raise RuntimeError("not queued")
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def drive(host: str, port: int, clients: int, seconds: float, use_tls: bool) -> dict[str, float]:
    """Closed loop: each client starts a new session when its last one ends, until ``seconds`` are over."""
    context = None
    if use_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    done, errors = [0], [0]
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop_at:
            try:
                await one_session(host, port, context)
                done[0] += 1
            except Exception:
                errors[0] += 1

    cpu = time.process_time()
    start = time.monotonic()
    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    await asyncio.wait(tasks, timeout=seconds + PHASE_LIMIT / 4)
    for task in tasks:
        task.cancel()
    return {
        "sessions": done[0],
        "errors": errors[0],
        "wall": time.monotonic() - start,
        "cpu": time.process_time() - cpu,
    }


# -- measuring ----------------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Postfix's master forks smtpd, cleanup, qmgr ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process tree so far, reaped children included: steadier than wall time."""
    ticks = 0
    for member in tree(pid):
        fields = _stat(member)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    total = 0.0
    for member in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


@dataclass
class Server:
    name: str
    start: Callable[[str, int], Callable[[], None]]  # (host, port) -> stop; sets pid
    pid: int = 0
    host: str = ""
    port: int = 0
    stop: Callable[[], None] | None = None
    rates: dict[tuple[str, int], list[tuple[float, float, float]]] = field(default_factory=dict)


def popen_server(command: list[str], host: str, port: int, server: Server) -> Callable[[], None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server.pid = process.pid
    try:
        wait_for_banner(host, port, timeout=CONNECT_TIMEOUT, alive=lambda: process.poll() is None)
    except BaseException:
        process.kill()
        process.wait()
        raise

    def stop() -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    return stop


def servers_for(cert: Path, key: Path, work: Path, workers: int, with_postfix: bool) -> list[Server]:
    me = [sys.executable, str(Path(__file__).resolve())]
    found: list[Server] = []

    def smtplab(name: str, extra: list[str]) -> Server:
        def start(host: str, port: int) -> Callable[[], None]:
            home = work / f"{name.replace(' ', '')}-{cert.stem}"
            home.mkdir(parents=True, exist_ok=True)
            shutil.copy(cert, home / "bench.pem")
            shutil.copy(key, home / "bench.key")
            shutil.copy(APPLIANCE, home / "appliance.yaml")
            command = [sys.executable, "-m", "lab", "serve", "--config", str(home / "appliance.yaml")]
            command += ["--bind", f"Bench={host}:{port}", *extra]
            command += ["--spool", str(home / "spool"), "--log", str(home / "mail.log"), "--state", str(home)]
            return popen_server(command, host, port, found_server(name))

        return Server(name, start)

    def found_server(name: str) -> Server:
        return next(item for item in found if item.name == name)

    def own(name: str, kind: str, *extra: str) -> Server:
        def start(host: str, port: int) -> Callable[[], None]:
            command = [*me, "--serve", kind, "--host", host, "--port", str(port), "--cert", str(cert)]
            return popen_server([*command, "--key", str(key), *extra], host, port, found_server(name))

        return Server(name, start)

    found.append(smtplab("smtplab", []))
    if workers > 1:
        found.append(smtplab(f"smtplab -w{workers}", ["--workers", str(workers)]))
    found.append(own("aiosmtpd (stores nothing)", "aiosmtpd"))
    found.append(own("aiosmtpd (Maildir)", "aiosmtpd", "--maildir", str(work / "aiosmtpd-maildir")))
    found.append(own("twisted.mail ESMTP", "twisted"))
    if with_postfix:
        from peers import postfix

        if postfix.available():

            def start_postfix(host: str, port: int) -> Callable[[], None]:
                peer = postfix.PostfixPeer(
                    work / f"postfix-{cert.stem}", host, port, "may", cert.read_bytes(), key.read_bytes()
                )
                peer.start()
                found_server("Postfix 3.7").pid = peer.pid or 0
                return peer.stop

            found.append(Server("Postfix 3.7", start_postfix))
        else:
            print(f"Postfix skipped: {postfix.unavailable_reason()}")
    return found


def measure(server: Server, mode: str, clients: int, seconds: float, drivers: int) -> tuple[float, float, float]:
    """One measurement: sessions/s, server CPU ms per session, load generators' CPU share of their wall time."""
    per = [clients // drivers + (1 if i < clients % drivers else 0) for i in range(drivers)]
    command = [sys.executable, str(Path(__file__).resolve()), "--drive", server.host, str(server.port)]
    cpu_before = cpu_seconds(server.pid)
    procs = [
        subprocess.Popen([*command, str(n), str(seconds), mode], stdout=subprocess.PIPE, text=True) for n in per if n
    ]
    results = []
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=seconds + PHASE_LIMIT)
                results.append(json.loads(out))
            except (subprocess.TimeoutExpired, ValueError):
                pass
    finally:
        for proc in procs:  # an interrupted or stuck generator is stopped by PID
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    cpu = cpu_seconds(server.pid) - cpu_before
    sessions = sum(r["sessions"] for r in results)
    errors = sum(r["errors"] for r in results)
    wall = max((r["wall"] for r in results), default=seconds)
    driver_cpu = sum(r["cpu"] for r in results) / wall / max(len(results), 1)
    if errors:
        print(f"    ({server.name}: {errors} failed sessions)")
    return sessions / wall, cpu * 1000 / max(sessions, 1), driver_cpu


def report(servers: list[Server], key: tuple[str, int]) -> None:
    rows = {s.name: s.rates[key] for s in servers if key in s.rates}
    mode, clients = key
    print(f"\n{mode}, {clients} concurrent clients (median of {len(next(iter(rows.values())))} alternated runs)")
    print(f"  {'server':28s} {'sessions/s':>10s} {'CPU ms/session':>15s} {'load gen CPU':>13s}")
    medians = {}
    for name, runs in rows.items():
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        gen = max(r[2] for r in runs)
        medians[name] = (rate, cpu)
        print(f"  {name:28s} {rate:10.0f} {cpu:15.2f} {gen * 100:12.0f}%")
    ours = medians.get("smtplab")
    if ours is None:
        return
    for name, (rate, cpu) in medians.items():
        if name != "smtplab":
            print(f"  smtplab / {name:22s} {ours[0] / rate:6.2f}x by sessions/s, {cpu / ours[1]:6.2f}x by CPU")


# -- idle sessions: memory per session ----------------------------------------------------------------------------


async def hold_idle(host: str, port: int, count: int, rss: Callable[[], float]) -> tuple[int, int, float]:
    writers: list[asyncio.StreamWriter] = []
    failed = 0
    stop_at = time.monotonic() + PHASE_LIMIT

    async def one() -> None:
        nonlocal failed
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
            await asyncio.wait_for(read_reply(reader), CONNECT_TIMEOUT)
            writer.write(b"EHLO idle.example\r\n")
            await asyncio.wait_for(read_reply(reader), CONNECT_TIMEOUT)
            writers.append(writer)
        except Exception:
            failed += 1

    for start in range(0, count, 500):
        if time.monotonic() > stop_at:
            break
        await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    await asyncio.sleep(1.0)
    measured = rss()
    for writer in writers:
        writer.close()
    return len(writers), failed, measured


def idle_phase(cert: Path, key: Path, work: Path, count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, count * 2 + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the child inherits it
    server = servers_for(cert, key, work / "idle", 0, with_postfix=False)[0]
    host, port = "127.0.77.99", free_port("127.0.77.99")
    stop = server.start(host, port)
    try:
        base = rss_mb(server.pid)
        held, failed, rss = asyncio.run(hold_idle(host, port, count, lambda: rss_mb(server.pid)))
    finally:
        stop()
    print(f"\nidle sessions held after EHLO: {held} ({failed} failed; RLIMIT_NOFILE {want})")
    per = (rss - base) * 1024 / max(held, 1)
    print(f"  smtplab RSS {rss:.1f} MB with them (at start {base:.1f} MB, {per:.1f} KiB per session)")


# -- main -----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one measurement (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="how often the servers are alternated (default 2)")
    parser.add_argument("--keys", default="rsa,ec", help="certificate keys: rsa (2048), ec (P-256)")
    parser.add_argument("--modes", default="starttls,plain")
    parser.add_argument("--concurrency", default="50,500", help="concurrent clients, comma-separated")
    parser.add_argument("--drivers", type=int, default=2, help="load-generator processes (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="also measure smtplab serve --workers N")
    parser.add_argument("--no-postfix", action="store_true")
    parser.add_argument(
        "--peers",
        default="aiosmtpd,aiosmtpd-maildir,twisted",
        help="peers beside smtplab (default all): aiosmtpd, aiosmtpd-maildir, twisted; Postfix unless --no-postfix",
    )
    parser.add_argument("--idle", type=int, default=10000, help="idle sessions held against smtplab (0: skip)")
    # internal entry points: the peer servers and the load generator run as child processes of this script
    parser.add_argument("--serve", choices=["aiosmtpd", "twisted"], help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--maildir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "aiosmtpd":
        return serve_aiosmtpd(args.host, args.port, args.cert, args.key, args.maildir)
    if args.serve == "twisted":
        return serve_twisted_mail(args.host, args.port, args.cert, args.key)
    if args.drive:
        host, port, clients, seconds, mode = args.drive
        seconds = min(float(seconds), PHASE_LIMIT)
        print(json.dumps(asyncio.run(drive(host, int(port), int(clients), seconds, mode == "starttls"))))
        return None

    os.environ.setdefault("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests")]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stopped run still stops its servers (finally)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, Python {sys.version.split()[0]}")
    print(f"load: {args.drivers} generator processes, closed loop, {args.seconds:g} s per measurement, ")
    print(f"      servers alternated {args.rounds} times; session = EHLO [STARTTLS EHLO] MAIL RCPT DATA(1 KiB) QUIT")
    modes = args.modes.split(",")
    peers = {name.strip() for name in args.peers.split(",") if name.strip()}
    if peers - set(PEER_KEYS.values()):
        parser.error(f"--peers: unknown {', '.join(sorted(peers - set(PEER_KEYS.values())))}")
    if not args.no_postfix:
        peers.add("postfix")
    concurrencies = [int(n) for n in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-listener-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # Postfix's delivery user writes below it
        for index, kind in enumerate(args.keys.split(",")):
            cert, key = make_certificate(kind, work)
            servers = servers_for(cert, key, work, args.workers, not args.no_postfix)
            servers = [s for s in servers if PEER_KEYS.get(s.name, "smtplab") in {"smtplab", *peers}]
            print(f"\n== certificate {'RSA-2048' if kind == 'rsa' else 'EC P-256'}")
            try:
                for number, server in enumerate(servers):
                    server.host = f"127.0.{78 + index}.{number + 1}"
                    server.port = free_port(server.host)
                    server.stop = server.start(server.host, server.port)
                for clients in concurrencies:
                    for mode in modes:
                        for _ in range(args.rounds):
                            for server in servers:
                                figures = measure(server, mode, clients, args.seconds, args.drivers)
                                server.rates.setdefault((mode, clients), []).append(figures)
                        report(servers, (mode, clients))
                print("\n  RSS after the load: " + ", ".join(f"{s.name} {rss_mb(s.pid):.0f} MB" for s in servers))
            finally:
                for server in servers:
                    if server.stop is not None:
                        with contextlib.suppress(Exception):
                            server.stop()
        if args.idle:
            idle_phase(cert, key, work, args.idle)
    return None


if __name__ == "__main__":
    main()
