"""``smtplab probe HOST:PORT``: which TLS policy does this target implement, and how does it deviate?

A short battery over real TCP, loopback only (``lab.conformance.probe``). Exit codes: 0 classified and no
deviation found (differences from the lab listener do not count), 1 deviations found (an RFC MUST or
SHOULD broken) or the classification is only a best guess, 2 the target cannot be
reached or does not greet with 220 (one line on stderr), 3 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from twisted.python.failure import Failure

from lab.appliance.certs import load_pem
from lab.conformance.probe import ProbeReport, ProbeSettings, ProbeUnreachable, probe
from lab.conformance.profile import DEFAULT_FROM, parse_address
from lab.errors import EXIT_HARNESS, BadInput
from lab.smtp.steps import DEFAULT_EHLO

HELP = "infer the TLS policy of an SMTP server (No / Preferred / Required) and its deviations from the RFCs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST:PORT", help="the target, a loopback address (127.0.0.0/8, [::1])")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--ehlo", default=DEFAULT_EHLO, metavar="NAME", help=f"EHLO name (default {DEFAULT_EHLO})")
    parser.add_argument("--from", dest="mail_from", default=DEFAULT_FROM, metavar="ADDR", help="envelope sender")
    parser.add_argument("--to", dest="rcpt_to", metavar="ADDR", help="envelope recipient (default postmaster@...)")
    parser.add_argument("--ca", metavar="FILE", help="PEM trust anchor: also check the server certificate")
    parser.add_argument("--server-name", metavar="NAME", help="name expected in the server certificate (and SNI)")
    parser.add_argument("--cert", metavar="PEM", help="client certificate to present where one is asked for")
    parser.add_argument("--key", metavar="PEM", help="private key of --cert")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per reply / handshake (default 10)")


def settings_from(args: argparse.Namespace) -> ProbeSettings:
    """The flags as ``ProbeSettings``; every problem is ``BadInput`` (exit 3)."""
    host, port = parse_address(args.address, field="HOST:PORT")
    if not 0 < args.timeout <= 600:
        raise BadInput("must be more than 0 and at most 600 seconds", field="--timeout")
    for flag, value in (("--from", args.mail_from), ("--to", args.rcpt_to)):
        if value and ("@" not in value or any(c in value for c in "<> \r\n")):
            raise BadInput(f"{value!r} is not a mail address", field=flag)
    ca_pems: tuple[bytes, ...] = ()
    if args.ca:
        try:
            ca_pems = (Path(args.ca).read_bytes(),)
        except OSError as exc:
            raise BadInput(f"cannot read: {exc.strerror}", file=args.ca, field="--ca") from None
        if b"-----BEGIN CERTIFICATE-----" not in ca_pems[0]:
            raise BadInput("not a PEM certificate", file=args.ca, field="--ca")
    cert = None
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise BadInput("--cert and --key go together", field="--cert")
        cert = load_pem(args.cert, args.key, "probe-client")
    return ProbeSettings(
        host=host,
        port=port,
        ehlo=args.ehlo,
        mail_from=args.mail_from,
        rcpt_to=args.rcpt_to,
        ca_pems=ca_pems,
        server_name=args.server_name,
        client_cert=cert,
        timeout=float(args.timeout),
    )


def run_on_reactor(settings: ProbeSettings) -> ProbeReport:
    """Run the probe on the global reactor until it is done; its exception (if any) is raised here."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    outcome: list[ProbeReport | Failure] = []

    def finish(result: ProbeReport | Failure) -> None:
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: probe(settings, reactor).addBoth(finish))
    reactor.run()
    if not outcome:  # the reactor stopped by a signal (Ctrl-C)
        raise KeyboardInterrupt
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, ProbeReport)
    return result


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        report = run_on_reactor(settings)
    except ProbeUnreachable as exc:
        print(f"smtplab probe: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.summary()))
    return report.exit_code
