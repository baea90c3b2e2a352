"""``smtplab serve``: run appliance listeners on the real reactor.

Quick mode (``--listen HOST:PORT --tls MODE``) serves one public listener; full mode (``--config FILE``)
serves every listener of an appliance file, each mapped onto a loopback address with ``--bind``.
Virtual addresses (192.168.2.1 ...) never reach a socket: a listener whose interface is not a loopback
address must be bound explicitly.

Start and stop are where mail gets lost, so both are checked: ``--spool``, ``--state`` and ``--log`` are created
and written to before the first connection (exit 3 with one line if not), a crash's leftovers in the spool's
``tmp/`` are logged and removed, and SIGTERM/SIGINT stop cleanly: no new connections, spool writes in flight
get their 250, every other open session ``421 4.3.2``, exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.appliance.config import listener_summary, load_appliance, quick_appliance
from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance, Certificate, Listener
from lab.appliance.spool import GroupCommit, Spool, SpoolError, probe_dir
from lab.errors import BadInput, HarnessError
from lab.policy.modes import TLS_MODE_SPELLINGS, TLSMode, parse_tls_mode
from lab.tls.certs import default_state_dir, load_pem

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

HELP = "run appliance listeners on real sockets (quick mode or a full appliance file)"
FILES_BESIDES_CONNECTIONS = 256  # log, spool files being written, listening sockets, the reactor's own
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
        "--state", metavar="DIR", help="state directory for the lab CA (default $SMTPLAB_STATE or ./.smtplab)"
    )


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"{text!r} is not HOST:PORT", field=flag)
    host = host.strip("[]") or "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"{host!r} is not an IP address", field=flag) from None
    if not address.is_loopback:
        raise BadInput(f"{host} is not a loopback address; smtplab serves only on 127.0.0.0/8 or ::1", field=flag)
    return host, int(port)


def _quick(args: argparse.Namespace) -> tuple[Appliance, dict[str, tuple[str, int]]]:
    host, port = _host_port(args.listen, "--listen")
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
        binds[name] = _host_port(address, "--bind")
    for item in appliance.listeners:
        if item.name in binds:
            continue
        address = appliance.interfaces[item.interface].address
        if not ipaddress.ip_address(address).is_loopback:
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


def _open_log(path: Path | None, clock: IReactorTime) -> MailLog:
    """Lines are flushed once per reactor turn: the lines of one turn reach the file in one write."""

    def flush_soon(flush: Callable[[], None]) -> object:
        return clock.callLater(0, flush)

    if path is None:
        return MailLog(sys.stdout, clock=clock.seconds, flush_soon=flush_soon)
    try:
        return MailLog(path, clock=clock.seconds, flush_soon=flush_soon)
    except OSError as exc:
        raise _unusable("--log", path, _os_problem("cannot open for appending", path, exc)) from None


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
    from twisted.internet import defer, reactor
    from twisted.internet.error import CannotListenError
    from twisted.internet.interfaces import IReactorFromThreads, IReactorTime

    from lab.smtp.eager_tcp import listen
    from lab.smtp.listener import ApplianceRuntime, ListenerFactory

    appliance, binds = _quick(args) if args.listen else _full(args)
    _raise_open_files(sum(item.max_concurrency for item in appliance.listeners))
    state_dir = Path(args.state) if args.state else default_state_dir()
    spool_root = Path(args.spool) if args.spool else state_dir / "spool"
    if args.state or not args.spool:
        try:
            probe_dir(state_dir)
        except OSError as exc:
            raise _unusable("--state", state_dir, _os_problem("cannot create or write", state_dir, exc)) from None
    maillog = _open_log(Path(args.log) if args.log else None, IReactorTime(reactor))
    spool = Spool(spool_root)
    _prepare_spool(spool, appliance, "--spool" if args.spool else "--state", maillog)
    committer = GroupCommit(IReactorFromThreads(reactor).callFromThread)  # spool writes, fsyncs in batches
    runtime = ApplianceRuntime(
        appliance, clock=reactor, maillog=maillog, spool=spool, state_dir=state_dir, committer=committer
    )

    ports: list[Any] = []
    factories: list[ListenerFactory] = []
    for item in appliance.listeners:
        host, port = binds[item.name]
        print(listener_summary(appliance, item))
        factories.append(runtime.factory(item))
        try:
            ports.append(listen(reactor, port, factories[-1], backlog=item.tcp_queue, interface=host))
        except CannotListenError as exc:
            raise HarnessError(f"cannot listen on {host}:{port} for {item.name}: {exc.socketError}") from None
        if runtime.certificate(item).insecure_demo and _may_start_tls(item):
            print(
                f"WARNING: {item.name} presents the built-in demo certificate, which is INSECURE "
                "(its private key ships with smtplab); assign a certificate for real use"
            )
        print(f"Listening: {item.name} on {host}:{port} (TCP queue {item.tcp_queue}), spool {spool_root / item.name}")
        print()
    sys.stdout.flush()

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
    print("smtplab serve: stopped")
    return 0


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


def _may_start_tls(listener: Listener) -> bool:
    return any(p.effective(listener.defaults).tls is not TLSMode.NO for p in listener.policies.values())


def _tls_mode(text: str) -> TLSMode:
    mode = parse_tls_mode(text)
    if mode is None:
        raise BadInput(f"{text!r} is not one of {TLS_MODE_SPELLINGS}", field="--tls")
    return mode
