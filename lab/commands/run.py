"""``smtplab run``: the catalogue against the lab's own listeners (default) or another MTA.

With no arguments: every case, under No, Preferred and Required, over the in-memory carrier in the built-in
topology, reports in ./smtplab-report. With ``--target HOST:PORT --policy X`` or ``--profile FILE``: the same
catalogue against an external MTA, judged by the policy its configuration is meant to have.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lab.commands import add_case_selectors
from lab.errors import BadInput
from lab.net.carrier import LAB_CARRIERS
from lab.scenario.model import parse_policies

if TYPE_CHECKING:
    from lab.pipeline import RunRequest

HELP = "run scenarios and write verdict reports (terminal, index.json, junit.xml, index.html, pcaps)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_selectors(parser)
    parser.add_argument(
        "--policy",
        default=None,
        metavar="LIST",
        help="policies to run under, comma-separated from no,preferred,required (Postfix: none,may,encrypt; "
        "default: all); "
        "with --target: the one policy the target is meant to have",
    )
    parser.add_argument(
        "--carrier",
        choices=LAB_CARRIERS,
        default=None,
        help="how bytes travel between lab hosts (default: memory, virtual time; netns: network namespaces, as root); "
        "with an external target only netns: one serving inside the kept set (smtplab netns up, docs/netns.md)",
    )
    parser.add_argument("--topology", metavar="FILE", help="topology file (default: the built-in topology)")
    parser.add_argument("--seed", type=int, default=0, help="seed for everything the lab chooses (default 0)")
    parser.add_argument("--report-dir", default="smtplab-report", metavar="DIR", help="default ./smtplab-report")
    parser.add_argument("--strict", action="store_true", help="NON-STRICT verdicts fail the run too")
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="runs at once, in worker processes (default 1, or a profile's concurrency)",
    )
    parser.add_argument("--no-timestamps", action="store_true", help="leave wall-clock times out of index.json")
    parser.add_argument("--baseline", metavar="INDEX", help="fail only on regressions against this index.json")
    parser.add_argument(
        "--sender",
        metavar="SPEC",
        help="judge a sender instead of a listener: lab[:POLICY,...] (the lab's client engine) or a sender "
        "profile (conformance/senders/*.yaml); selectors then pick receiver cases (SND-...), docs/senders.md",
    )
    external = parser.add_argument_group("external targets")
    external.add_argument("--target", metavar="HOST:PORT", help="run against this MTA instead of the lab")
    external.add_argument("--profile", metavar="FILE", help="a target profile (conformance/targets/*.yaml)")
    external.add_argument("--name", help="the target's name in reports (default HOST:PORT)")
    external.add_argument("--ehlo", help="EHLO name the client uses")
    external.add_argument("--from", dest="mail_from", metavar="ADDR", help="envelope sender")
    external.add_argument("--to", dest="rcpt_to", metavar="ADDR", help="envelope recipient")
    external.add_argument("--ca", metavar="FILE", help="trust anchor (PEM) for verifying the target")
    external.add_argument(
        "--server-name", metavar="NAME", help="name the target's certificate must carry (default: the target's host)"
    )
    external.add_argument("--client-cert", metavar="PEM", help="client certificate to present")
    external.add_argument("--client-key", metavar="PEM", help="its private key")
    external.add_argument(
        "--verify-client", action="store_true", help="the target verifies client certificates (with --client-cert)"
    )
    facts = parser.add_argument_group("declared target facts (docs/conformance.md: a case that needs one runs with it)")
    facts.add_argument("--accepted-domain", metavar="DOMAIN", help="a recipient domain the target accepts")
    facts.add_argument("--refused-domain", metavar="DOMAIN", help="a recipient domain the target must refuse")
    facts.add_argument("--max-message-size", type=int, metavar="BYTES", help="the target's maximum message size")
    facts.add_argument("--max-recipients", type=int, metavar="N", help="the target's maximum recipients per message")
    facts.add_argument(
        "--tls-mandatory-sender", metavar="ADDR", help="a sender for whom the target makes TLS mandatory (Preferred)"
    )
    facts.add_argument(
        "--blocked-client", metavar="ADDR", help="a loopback address the target refuses at connect (POL-HAT-01)"
    )
    facts.add_argument("--maillog", metavar="FILE", help="the target's mail log; cases read the lines a run adds")
    facts.add_argument(
        "--maillog-dialect", choices=["postfix", "exim", "smtplab"], help="how that log writes its lines"
    )


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The typed request below the command line (``lab.pipeline``): the only place that reads ``args``."""
    from lab.conformance.targets import TargetFlags
    from lab.pipeline import RunRequest

    return RunRequest(
        selectors=tuple(args.selectors),
        policies=None if args.policy is None else tuple(parse_policies(args.policy, "--policy")),
        carrier=args.carrier,
        topology=args.topology,
        seed=args.seed,
        report_dir=Path(args.report_dir),
        timestamps=not args.no_timestamps,
        jobs=args.jobs,
        profiles=(args.profile,) if args.profile else (),
        flags=TargetFlags.from_namespace(args),
    )


def run(args: argparse.Namespace) -> int:
    from lab.pipeline import execute, make_plan
    from lab.report import write_reports
    from lab.report.terminal import ProgressReporter, make_console, render
    from lab.scenario.verdict import Verdict

    if args.sender:
        return _run_sender(args)
    plan = make_plan(request_from_args(args))
    baseline = None
    if args.baseline:
        from lab.scenario.result import load_index

        baseline = load_index(args.baseline)
    report_dir = Path(args.report_dir)
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create {report_dir}: {exc.strerror or exc}", field="--report-dir") from None
    with ProgressReporter(plan.size()) as progress:
        result = execute(plan, plan.targets[0], progress=progress.advance)
    write_reports(result, report_dir)
    render(result, make_console())
    print(
        f"reports: {report_dir / 'index.html'}, {report_dir / 'junit.xml'}, {report_dir / 'index.json'}",
        file=sys.stderr,
    )
    if baseline is not None:
        from lab.conformance.baseline import baseline_exit_code

        return baseline_exit_code(baseline, result)
    code = result.exit_code()
    if code == 0 and args.strict and any(run.verdict is Verdict.NON_STRICT for run in result.runs):
        return 1
    return code


def _run_sender(args: argparse.Namespace) -> int:
    """``--sender``: the receiver cases against a sender (lab.sender), the same reports."""
    from lab.report import write_reports
    from lab.report.terminal import make_console, render
    from lab.scenario.verdict import Verdict
    from lab.sender.command import run_senders

    for flag, value in (("--policy", args.policy), ("--target", args.target), ("--profile", args.profile)):
        if value:
            raise BadInput("judges a listener; with --sender the policy is lab:POLICY or the profile's", field=flag)
    report_dir = Path(args.report_dir)
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create {report_dir}: {exc.strerror or exc}", field="--report-dir") from None
    result = run_senders(
        args.sender, list(args.selectors), report_dir=report_dir, seed=args.seed, timestamps=not args.no_timestamps
    )
    write_reports(result, report_dir)
    render(result, make_console())
    print(
        f"reports: {report_dir / 'index.html'}, {report_dir / 'junit.xml'}, {report_dir / 'index.json'}",
        file=sys.stderr,
    )
    code = result.exit_code()
    if code == 0 and args.strict and any(run.verdict is Verdict.NON_STRICT for run in result.runs):
        return 1
    return code
