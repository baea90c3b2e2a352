"""``smtplab serve``: run appliance listeners on the real reactor.

Quick mode (``--listen HOST:PORT --tls MODE``) serves one public listener; full mode (``--config FILE``)
serves every listener of an appliance file, each mapped onto a loopback address with ``--bind``.
Virtual addresses (192.168.2.1 ...) never reach a socket: a listener whose interface is not a loopback
address must be bound explicitly, unless ``--allow-remote`` says this machine really has that address (a
container on an internal network, docs/compose.md).

Start and stop are where mail gets lost, so both are checked: ``--spool``, ``--state`` and ``--log`` are created
and written to before the first connection (exit 3 with one line if not), a crash's leftovers in the spool's
``tmp/`` are logged and removed, and SIGTERM/SIGINT stop cleanly: no new connections, spool writes in flight
get their 250, every other open session ``421 4.3.2``, exit 0.

``--workers N`` forks N processes that each run a reactor on every listening address (``SO_REUSEPORT``); the
parent prepares the spool and the log once, then supervises them (``lab.commands.serve_workers``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import ipaddress
import os
import select
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from lab.appliance.config import listener_summary, load_appliance, quick_appliance
from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance, Certificate, Listener
from lab.appliance.spool import Spool, SpoolError, probe_dir
from lab.appliance.spool_process import SpoolProcess
from lab.errors import BadInput, HarnessError
from lab.policy.modes import TLS_MODE_SPELLINGS, TLSMode, parse_tls_mode
from lab.policy.params import EffectiveParams
from lab.tls.certs import default_state_dir, load_pem

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

HELP = "run appliance listeners on real sockets (quick mode or a full appliance file)"
FILES_BESIDES_CONNECTIONS = 256  # log, spool files being written, listening sockets, the reactor's own
MAX_WORKERS = 64
SHUTDOWN_GRACE = 5.0  # seconds a clean stop waits for spool writes in flight and sessions to close, then aborts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--listen", metavar="HOST:PORT", help="quick mode: one public listener at this address")
    mode.add_argument("--config", metavar="FILE", help="full mode: every listener of an appliance file")
    parser.add_argument(
        "--tls",
        default="preferred",
        metavar="MODE",
        help="quick mode: the Use TLS setting of the policy ALL maps to, no|preferred|required "
        "(Postfix: none|may|encrypt; default: preferred)",
    )
    parser.add_argument("--verify-client", action="store_true", help="quick mode: verify client certificates")
    parser.add_argument("--cert", metavar="PEM", help="quick mode: certificate to present (default: demo)")
    parser.add_argument("--key", metavar="PEM", help="quick mode: private key of --cert")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=1000,
        metavar="N",
        help="quick mode: Max Concurrency of the listener, also per IP (default 1000)",
    )
    parser.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="LISTENER=HOST:PORT",
        help="full mode: serve LISTENER on this loopback address (repeatable)",
    )
    parser.add_argument("--spool", metavar="DIR", help="spool root; one Maildir per listener (default STATE/spool)")
    parser.add_argument("--log", metavar="FILE", help="mail log file (default: standard output)")
    parser.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="worker processes sharing every listening address (SO_REUSEPORT), each with its own reactor; "
        "N or auto (one per core); default 1",
    )
    parser.add_argument(
        "--state", metavar="DIR", help="state directory for the lab CA (default $SMTPLAB_STATE or ./.smtplab)"
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="serve on addresses other than loopback too: for a container on an internal network (docs/compose.md)",
    )


def _host_port(text: str, flag: str, allow_remote: bool = False) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"{text!r} is not HOST:PORT", field=flag)
    host = host.strip("[]") or "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"{host!r} is not an IP address", field=flag) from None
    if not address.is_loopback and not allow_remote:
        raise BadInput(f"{host} is not a loopback address; smtplab serves only on 127.0.0.0/8 or ::1", field=flag)
    return host, int(port)


def _quick(args: argparse.Namespace) -> tuple[Appliance, dict[str, tuple[str, int]]]:
    host, port = _host_port(args.listen, "--listen", args.allow_remote)
    certificate = None
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise BadInput("--cert and --key go together", field="--cert")
        load_pem(args.cert, args.key, "imported")  # checks the files now, with a one-line error
        certificate = Certificate("imported", "pem", cert_file=args.cert, key_file=args.key)
    if args.max_concurrency < 1:
        raise BadInput("must be at least 1", field="--max-concurrency")
    appliance = quick_appliance(host, port, _tls_mode(args.tls), args.verify_client, certificate)
    listeners = tuple(_with_concurrency(item, args.max_concurrency) for item in appliance.listeners)
    appliance = dataclasses.replace(appliance, listeners=listeners)
    return appliance, {item.name: (host, port) for item in appliance.listeners}


def _with_concurrency(listener: Listener, limit: int) -> Listener:
    defaults = dataclasses.replace(listener.defaults, max_concurrency_per_ip=limit)
    policies = {
        name: dataclasses.replace(policy, params=dataclasses.replace(policy.params, max_concurrency_per_ip=None))
        for name, policy in listener.policies.items()
    }
    return dataclasses.replace(listener, max_concurrency=limit, defaults=defaults, policies=policies)


def _full(args: argparse.Namespace) -> tuple[Appliance, dict[str, tuple[str, int]]]:
    appliance = load_appliance(args.config)
    names = {item.name for item in appliance.listeners}
    binds: dict[str, tuple[str, int]] = {}
    for text in args.bind:
        name, sep, address = text.partition("=")
        if not sep:
            raise BadInput(f"{text!r} is not LISTENER=HOST:PORT", field="--bind")
        if name not in names:
            raise BadInput(
                f"no listener {name!r} in {args.config} (listeners: {', '.join(sorted(names))})", field="--bind"
            )
        binds[name] = _host_port(address, "--bind", args.allow_remote)
    for item in appliance.listeners:
        if item.name in binds:
            continue
        address = appliance.interfaces[item.interface].address
        if not ipaddress.ip_address(address).is_loopback and not args.allow_remote:
            raise BadInput(
                f"listener {item.name}: interface address {address} is a lab address, not this machine's; "
                f"map it with --bind {item.name}=127.0.0.1:PORT",
                field="--bind",
            )
        binds[item.name] = (address, item.port)
    return appliance, binds


def _unusable(flag: str, path: Path, problem: str) -> BadInput:
    return BadInput(problem, field=f"{flag} {path}")


def _os_problem(action: str, path: Path, exc: OSError) -> str:
    """``cannot create: Not a directory``, naming the file at fault when it is not ``path`` itself."""
    culprit = f"{exc.filename}: " if exc.filename and str(exc.filename) != str(path) else ""
    reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
    return f"{action}: {culprit}{reason}"


def _open_log(path: Path | None, clock: IReactorTime | None) -> MailLog:
    """Lines are flushed once per reactor turn: the lines of one turn reach the file in one write.

    Without a reactor (``clock`` None: the parent of ``--workers``) every line is written as it comes.
    """
    flush_soon = None
    if clock is not None:
        reactor_clock = clock

        def flush_soon(flush: Callable[[], None]) -> object:
            return reactor_clock.callLater(0, flush)

    now = clock.seconds if clock is not None else time.time
    if path is None:
        return MailLog(sys.stdout, clock=now, flush_soon=flush_soon)
    try:
        return MailLog(path, clock=now, flush_soon=flush_soon)
    except OSError as exc:
        raise _unusable("--log", path, _os_problem("cannot open for appending", path, exc)) from None


class SharedLogFile(io.TextIOBase):
    """The mail log of several worker processes: whole lines only, each flush one ``write(2)`` with O_APPEND.

    A buffered text file may split a line between two writes, and another worker's lines could land between
    them; here a flush writes every pending line at once (into a pipe, in pieces of at most ``PIPE_BUF`` that
    end at a line end: larger pipe writes may interleave).
    """

    def __init__(self, path: Path | None) -> None:
        super().__init__()
        self._owned = path is not None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path is not None else 1
        self._piece = select.PIPE_BUF if stat.S_ISFIFO(os.fstat(self._fd).st_mode) else 0
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending).encode("utf-8")
        self._pending = []
        for piece in _pieces(data, self._piece):
            view = memoryview(piece)
            while view:
                view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if not self.closed:
            self.flush()
            if self._owned:
                os.close(self._fd)
        super().close()


def _pieces(data: bytes, limit: int) -> list[bytes]:
    """``data`` in pieces of at most ``limit`` bytes (0: one piece) that each end at a line end."""
    if not limit or len(data) <= limit:
        return [data]
    pieces, start = [], 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + limit) + 1
        if end <= start:  # one line longer than the limit: alone
            end = data.find(b"\n", start) + 1 or len(data)
        pieces.append(data[start:end])
        start = end
    return pieces


def _open_shared_log(path: Path | None, clock: IReactorTime, worker: Worker) -> tuple[MailLog, SharedLogFile]:
    """A worker's mail log: the shared file (or standard output), IDs ``index+1``, ``index+1+count`` ..."""
    try:
        sink = SharedLogFile(path)
    except OSError as exc:
        where = path or Path("-")
        raise _unusable("--log", where, _os_problem("cannot open for appending", where, exc)) from None
    log = MailLog(
        cast(TextIO, sink),
        clock=clock.seconds,
        flush_soon=lambda flush: clock.callLater(0, flush),
        ids=(worker.index + 1, worker.count),
    )
    return log, sink


def _prepare_spool(spool: Spool, appliance: Appliance, flag: str, maillog: MailLog) -> None:
    """Each listener's Maildir exists and takes files; what a crash left in its tmp/ is logged and removed."""
    for item in appliance.listeners:
        try:
            maildir = spool.for_listener(item.name)
            maildir.check_writable()
            leftovers = maildir.recover()
        except SpoolError as exc:
            raise _unusable(flag, spool.root, str(exc)) from None
        for leftover in leftovers:
            maillog.spool_leftover(leftover.path, leftover.size, leftover.delivered)


def _report_errors_to_stderr() -> None:
    """Twisted's warnings and errors (an exception in a protocol, an unhandled Deferred failure) go to stderr.

    Without an observer Twisted keeps them to itself, and a bug that a hostile client triggers would pass
    unseen; the soak test reads stderr for tracebacks.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def run(args: argparse.Namespace) -> int:
    appliance, binds = _quick(args) if args.listen else _full(args)
    workers = _workers(args.workers)
    _raise_open_files(sum(item.max_concurrency for item in appliance.listeners))
    state_dir = Path(args.state) if args.state else default_state_dir()
    spool_root = Path(args.spool) if args.spool else state_dir / "spool"
    if args.state or not args.spool:
        try:
            probe_dir(state_dir)
        except OSError as exc:
            raise _unusable("--state", state_dir, _os_problem("cannot create or write", state_dir, exc)) from None
    log_path = Path(args.log) if args.log else None
    place = Place(appliance, binds, state_dir, spool_root, log_path, "--spool" if args.spool else "--state")
    if workers == 1:
        return _serve(place)
    return _serve_workers(place, workers)


@dataclasses.dataclass
class Place:
    """What ``smtplab serve`` serves and where: the appliance, its addresses, its state, spool and log."""

    appliance: Appliance
    binds: dict[str, tuple[str, int]]
    state_dir: Path
    spool_root: Path
    log_path: Path | None
    spool_flag: str  # the flag that named the spool, for its error lines (--spool, or --state by default)


@dataclasses.dataclass(frozen=True)
class Worker:
    """One of ``count`` worker processes (``index`` from 0); ``ready()`` once it listens."""

    index: int
    count: int
    ready: Callable[[], None]


def _serve(place: Place, worker: Worker | None = None) -> int:
    """Serve on this process's reactor until SIGTERM/SIGINT; as one of several workers when ``worker`` is given."""
    from lab.smtp.eager_tcp import install_reactor, listen

    if "twisted.internet.reactor" not in sys.modules:  # a test may run this on a reactor of its own
        install_reactor()
    from twisted.internet import defer, reactor
    from twisted.internet.error import CannotListenError
    from twisted.internet.interfaces import IReactorTime

    from lab.smtp.listener import ApplianceRuntime, ListenerFactory

    appliance = place.appliance if worker is None else _share_limits(place.appliance, worker.index, worker.count)
    clock = IReactorTime(reactor)
    if worker is None:
        maillog = _open_log(place.log_path, clock)
        _prepare_spool(Spool(place.spool_root), appliance, place.spool_flag, maillog)
    else:  # the parent prepared the spool; IDs are strided so that every worker's are unique
        maillog, shared = _open_shared_log(place.log_path, clock, worker)
    spool = Spool(place.spool_root)  # after the fork: its Maildir names carry this process's PID
    try:
        committer = SpoolProcess(reactor)  # a process of its own writes the spool, fsyncs in batches
    except SpoolError as exc:
        raise HarnessError(str(exc)) from None
    runtime = ApplianceRuntime(
        appliance, clock=reactor, maillog=maillog, spool=spool, state_dir=place.state_dir, committer=committer
    )

    ports: list[Any] = []
    factories: list[ListenerFactory] = []
    for item in appliance.listeners:
        host, port = place.binds[item.name]
        factories.append(runtime.factory(item))
        try:
            ports.append(
                listen(
                    reactor,
                    port,
                    factories[-1],
                    backlog=item.tcp_queue,
                    interface=host,
                    reuse_port=worker is not None,
                )
            )
        except CannotListenError as exc:
            raise HarnessError(f"cannot listen on {host}:{port} for {item.name}: {exc.socketError}") from None
        if worker is None:
            _announce(place, item, runtime.certificate(item).insecure_demo)
            _listening(place, item)
    sys.stdout.flush()
    if worker is not None:
        worker.ready()

    def stop_cleanly() -> defer.Deferred[Any]:
        """Before the reactor stops (SIGINT, SIGTERM): stop accepting, then let every open session end."""
        waits = [defer.maybeDeferred(port.stopListening) for port in ports]
        waits += [factory.shutdown(SHUTDOWN_GRACE) for factory in factories]
        return defer.DeferredList(waits)

    reactor.addSystemEventTrigger("before", "shutdown", stop_cleanly)  # the reactor waits for its Deferred
    _report_errors_to_stderr()
    reactor.run()  # SIGINT and SIGTERM stop the reactor once every session has its answer (stop_cleanly)
    committer.stop()
    maillog.close_file()
    if worker is None:
        print("smtplab serve: stopped")
    else:
        shared.close()
    return 0


def _announce(place: Place, item: Listener, insecure_demo: bool) -> None:
    print(listener_summary(place.appliance, item))
    if insecure_demo and _may_start_tls(item):
        print(
            f"WARNING: {item.name} presents the built-in demo certificate, which is INSECURE "
            "(its private key ships with smtplab); assign a certificate for real use"
        )


def _listening(place: Place, item: Listener, workers: int = 1) -> None:
    host, port = place.binds[item.name]
    spread = f", {workers} worker processes" if workers > 1 else ""
    print(
        f"Listening: {item.name} on {host}:{port} (TCP queue {item.tcp_queue}{spread}), "
        f"spool {place.spool_root / item.name}"
    )
    print()


def _serve_workers(place: Place, count: int) -> int:
    """``--workers N``: prepare once here, then fork N workers that each serve every listener (SO_REUSEPORT)."""
    from twisted.internet.task import Clock

    from lab.commands.serve_workers import supervise
    from lab.smtp.listener import ApplianceRuntime  # no reactor: forking after it is installed would share it

    if "twisted.internet.reactor" in sys.modules:
        raise HarnessError("--workers: the reactor is already installed in this process; cannot fork workers")
    with _open_log(place.log_path, None) as maillog:  # spool recovery is logged once, before any worker writes
        _prepare_spool(Spool(place.spool_root), place.appliance, place.spool_flag, maillog)
    runtime = ApplianceRuntime(
        place.appliance, clock=Clock(), maillog=maillog, spool=Spool(place.spool_root), state_dir=place.state_dir
    )
    for item in place.appliance.listeners:
        _check_bind(*place.binds[item.name], item.name)
        _announce(place, item, runtime.certificate(item).insecure_demo)  # a lab certificate is issued here, once

    def listening() -> None:
        for item in place.appliance.listeners:
            _listening(place, item, count)
        sys.stdout.flush()

    def say(line: str) -> None:
        print(f"smtplab serve: {line}", file=sys.stderr, flush=True)

    code = supervise(count, lambda index, ready: _serve(place, Worker(index, count, ready)), listening, say)
    print("smtplab serve: stopped" if code == 0 else "smtplab serve: stopped (a worker failed)")
    return code


def _raise_open_files(connections: int) -> None:
    """Let the process hold the connections its listeners admit (each is a file descriptor), up to the hard limit.

    Beyond the hard limit the kernel refuses the accept and the listener retries later; raising that is the
    operator's business (``ulimit -Hn``).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FILES_BESIDES_CONNECTIONS
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _workers(text: str) -> int:
    if text == "auto":
        from lab.commands.serve_workers import cores

        return cores()
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise BadInput(f"{text!r} is not a number of workers (1 to {MAX_WORKERS}) or auto", field="--workers")
    return int(text)


def _share(limit: int, index: int, count: int) -> int:
    """Worker ``index``'s part of ``limit``: the parts add up to ``limit``, but each is at least 1 (a limit below
    the number of workers admits one connection per worker)."""
    return max(1, limit // count + (1 if index < limit % count else 0))


def _share_limits(appliance: Appliance, index: int, count: int) -> Appliance:
    """Max Concurrency and every per-IP limit divided among the workers: together they admit no more than one
    process would (a worker counts only its own connections)."""

    def listener(item: Listener) -> Listener:
        per_ip = item.defaults.max_concurrency_per_ip
        if per_ip is None:
            per_ip = EffectiveParams().max_concurrency_per_ip
        policies = {
            name: dataclasses.replace(
                policy,
                params=dataclasses.replace(
                    policy.params, max_concurrency_per_ip=_share(policy.params.max_concurrency_per_ip, index, count)
                ),
            )
            if policy.params.max_concurrency_per_ip is not None
            else policy
            for name, policy in item.policies.items()
        }
        return dataclasses.replace(
            item,
            max_concurrency=_share(item.max_concurrency, index, count),
            defaults=dataclasses.replace(item.defaults, max_concurrency_per_ip=_share(per_ip, index, count)),
            policies=policies,
        )

    return dataclasses.replace(appliance, listeners=tuple(listener(item) for item in appliance.listeners))


def _check_bind(host: str, port: int, name: str) -> None:
    """The address can be listened on (nothing else holds it): one line now rather than N failing workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise HarnessError(f"cannot listen on {host}:{port} for {name}: {exc.strerror or exc}") from None


def _may_start_tls(listener: Listener) -> bool:
    return any(p.effective(listener.defaults).tls is not TLSMode.NO for p in listener.policies.values())


def _tls_mode(text: str) -> TLSMode:
    mode = parse_tls_mode(text)
    if mode is None:
        raise BadInput(f"{text!r} is not one of {TLS_MODE_SPELLINGS}", field="--tls")
    return mode
