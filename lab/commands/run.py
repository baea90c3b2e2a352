"""``smtplab run``: the catalogue against the lab's own listeners (default) or another MTA.

With no arguments: every case, under No, Preferred and Required, over the in-memory carrier in the built-in
topology, reports in ./smtplab-report. With ``--target HOST:PORT --policy X`` or ``--profile FILE``: the same
catalogue against an external MTA, judged by the policy its configuration is meant to have.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lab.errors import BadInput
from lab.scenario.model import POLICIES, parse_policies

HELP = "run scenarios and write verdict reports (terminal, index.json, junit.xml, index.html, pcaps)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "selectors",
        nargs="*",
        metavar="PATH-or-ID-PREFIX",
        help="scenario files or directories, or case id prefixes (default: the whole catalogue)",
    )
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
        choices=["memory", "loopback"],
        default="memory",
        help="how bytes travel between lab hosts (default: memory, virtual time)",
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


def _policies(text: str | None) -> list[str]:
    return list(POLICIES) if text is None else parse_policies(text, "--policy")


def _external_target(args: argparse.Namespace, policies: list[str]):  # type: ignore[no-untyped-def]
    from lab.conformance.targets import target_from_args, target_from_profile

    if args.profile:
        return target_from_profile(args.profile, args)
    if args.target:
        if len(policies) != 1 or args.policy is None:
            raise BadInput("an external target needs the one policy it is meant to have", field="--policy")
        return target_from_args(args, policies[0])
    return None


def run(args: argparse.Namespace) -> int:
    from lab.net.topology import default_topology, load_topology
    from lab.report import write_reports
    from lab.report.terminal import ProgressReporter, make_console, render
    from lab.scenario.loader import check_client_hosts, load_cases
    from lab.scenario.runner import RunOptions, run_cases, run_pairs
    from lab.scenario.verdict import Verdict

    policies = _policies(args.policy)
    if args.jobs is not None and args.jobs < 1:
        raise BadInput("must be at least 1", field="--jobs")
    target = _external_target(args, policies)
    topology = load_topology(args.topology) if args.topology else default_topology()
    cases = load_cases(args.selectors or None)
    if not cases:
        raise BadInput("no case matches " + " ".join(args.selectors), field="selectors")
    if target is None:
        check_client_hosts(cases, {host.name for host in topology.hosts})
    baseline = None
    if args.baseline:
        from lab.scenario.result import load_index

        baseline = load_index(args.baseline)
    report_dir = Path(args.report_dir)
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create {report_dir}: {exc.strerror or exc}", field="--report-dir") from None
    with ProgressReporter(len(run_pairs(cases, policies, target))) as progress:
        options = RunOptions(
            carrier=args.carrier,
            topology=topology,
            seed=args.seed,
            report_dir=report_dir,
            timestamps=not args.no_timestamps,
            target=target,
            jobs=args.jobs or (target.concurrency if target is not None else 1),
            progress=progress.advance,
        )
        result = run_cases(cases, policies, options)
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
