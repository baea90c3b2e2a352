"""``smtplab list``: a dry run over the catalogue: what would run, and which spec sentences are at stake.

Loading is the whole check: a bad file stops it with one ``FILE:LINE: field: problem`` line (exit 3), so
``smtplab list my-case.yaml`` is also how an author validates a new case without running it.
"""

from __future__ import annotations

import argparse

from lab.commands import add_case_selectors
from lab.errors import EXIT_OK
from lab.scenario.loader import load_cases
from lab.scenario.model import Case
from lab.scenario.runner import relayed

HELP = "list the scenario cases (id, title, spec refs with level, policies) without running them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_case_selectors(parser)
    parser.add_argument("--ids", action="store_true", help="print only the ids, one a line")


def describe(case: Case) -> list[str]:
    """The lines ``smtplab list`` prints for one case."""
    refs = "; ".join(f"{r.ref} ({r.level})" for r in case.refs)
    client = f"{case.client.describe()} from {case.client.host}"
    facts = [f"policies: {', '.join(case.policies)}", f"client: {client}"]
    if case.remote_mta is not None:
        facts.append(f"server: remote MTA ({case.remote_mta.starttls})")
    elif case.target:
        facts.append(f"target: {case.target}")
    if case.verify_client:
        facts.append("verify client certificate")
    if case.middlebox is not None:
        facts.append("middlebox on the link")
    lab_only = relayed(case).requires  # a middlebox runs against an external target too (in a relay)
    if lab_only:
        facts.append(f"lab only: {', '.join(lab_only)}")
    return [f"{case.id}  {case.title}", f"    {refs}", f"    {'   '.join(facts)}"]


def run(args: argparse.Namespace) -> int:
    """``BadInput`` propagates: the dispatcher prints one line and exits 3."""
    cases = load_cases(args.selectors)
    if args.ids:
        for case in cases:
            print(case.id)
        return EXIT_OK
    for case in cases:
        print("\n".join(describe(case)))
    runs = sum(len(c.policies) for c in cases)
    print(f"\n{len(cases)} cases, {runs} runs (case x policy)")
    return EXIT_OK
