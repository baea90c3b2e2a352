"""``smtplab serve``: run appliance listeners on the real reactor.

Quick mode (``--listen HOST:PORT --tls MODE``) serves one public listener; full mode (``--config FILE``)
serves every listener of an appliance file, each mapped onto a loopback address with ``--bind``.
Virtual addresses (192.168.2.1 ...) never reach a socket: a listener whose interface is not a loopback
address must be bound explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
from pathlib import Path

from lab.appliance.certs import default_state_dir, load_pem
from lab.appliance.config import listener_summary, load_appliance, quick_appliance
from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance, Certificate, Listener
from lab.appliance.spool import Spool
from lab.errors import BadInput, HarnessError
from lab.policy.modes import TLS_MODE_SPELLINGS, TLSMode, parse_tls_mode

HELP = "run appliance listeners on real sockets (quick mode or a full appliance file)"


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


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    from lab.smtp.listener import ApplianceRuntime

    appliance, binds = _quick(args) if args.listen else _full(args)
    state_dir = Path(args.state) if args.state else default_state_dir()
    spool_root = Path(args.spool) if args.spool else state_dir / "spool"
    log_sink = Path(args.log) if args.log else sys.stdout
    maillog = MailLog(log_sink, clock=reactor.seconds)
    runtime = ApplianceRuntime(
        appliance, clock=reactor, maillog=maillog, spool=Spool(spool_root), state_dir=state_dir, spool_in_threads=True
    )
    reactor.suggestThreadPoolSize(32)  # spool writes wait on fsync; let concurrent sessions overlap them

    for item in appliance.listeners:
        host, port = binds[item.name]
        print(listener_summary(appliance, item))
        try:
            reactor.listenTCP(port, runtime.factory(item), backlog=item.tcp_queue, interface=host)
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
    reactor.run()  # SIGINT and SIGTERM stop the reactor
    print("smtplab serve: stopped")
    return 0


def _may_start_tls(listener: Listener) -> bool:
    return any(p.effective(listener.defaults).tls is not TLSMode.NO for p in listener.policies.values())


def _tls_mode(text: str) -> TLSMode:
    mode = parse_tls_mode(text)
    if mode is None:
        raise BadInput(f"{text!r} is not one of {TLS_MODE_SPELLINGS}", field="--tls")
    return mode
