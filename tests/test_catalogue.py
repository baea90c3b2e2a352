"""The built-in catalogue: it loads, covers the rules of docs/rules.md, its verdicts on the lab are the declared ones.

The last tests run the whole catalogue through the runner on the memory carrier (virtual time, real TLS), and
then again against listeners broken on purpose, to show the expectations can fail.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lab.appliance.config import load_appliance
from lab.net.topology import default_topology
from lab.report.jsonreport import dumps
from lab.scenario.loader import SENDER_CASES, catalogue_dir, load_cases
from lab.scenario.model import POLICIES, Case
from lab.scenario.result import check_record
from lab.scenario.runner import RunOptions, run_cases
from lab.scenario.verdict import Verdict
from lab.smtp.behaviours import BEHAVIOURS
from lab.smtp.steps import Raw

FOLDERS = {"starttls", "policy", "clients", "attacks", "limits"}

#: docs/rules.md §3: each STARTTLS rule and the cases that test it (all run under no, preferred and required).
RULES = {
    1: ["3207-4-04"],  # STARTTLS with a parameter: 501
    2: ["3207-4.2-01", "3207-4.2-02"],  # STARTTLS inside TLS refused; EHLO inside TLS without STARTTLS
    3: ["3207-4.2-03", "ATK-INJECT-01"],  # plaintext behind STARTTLS discarded and logged
    # the handshake resets the EHLO name and the envelope
    4: ["3207-4.2-04", "3207-4.2-05", "3207-4.2-06", "3207-4.2-07", "3207-4-06"],
    5: ["3207-4.1-01"],  # a failed handshake is logged, delivers nothing
    6: ["5321-4.5.3.1.4-01", "5321-4.5.3.1.6-01", "5321-2.3.8-01", "5321-2.4-01"],  # lines, bare LF, NUL
    7: ["2920-3.1-01", "2920-3.1-02"],  # STARTTLS last in a pipelined group
    8: ["3207-4-01"],  # Required on a public MX: INFORMATIONAL
    9: [f"ATK-SMUGGLE-{n:02d}" for n in range(1, 13)],  # only <CRLF>.<CRLF> ends the data (SMTP smuggling)
}

#: docs/rules.md §5: each attack and its cases.
ATTACKS = {
    "stripping by rewrite": ["ATK-STRIP-01", "ATK-STRIP-02", "ATK-STRIP-05"],
    "stripping by answering 454": ["ATK-STRIP-03", "ATK-STRIP-04"],
    "command injection": ["ATK-INJECT-01", "3207-4.2-03"],
    "response injection": ["ATK-RESP-01"],
    "plaintext exposure": ["ATK-EXPOSE-01", "ATK-EXPOSE-02"],
    "SMTP smuggling": RULES[9],
}

#: The runs whose declared verdict on the lab is INFORMATIONAL (local policy, or exposure by design).
INFORMATIONAL = {
    ("3207-4-01", "required"),  # rule 8: Required on a public MX
    ("3207-4-07", "required"),  # HELO-only client under Required: rule 8 again
    ("ATK-EXPOSE-01", "no"),
    ("ATK-EXPOSE-01", "preferred"),
    ("ATK-EXPOSE-02", "no"),
    ("ATK-STRIP-01", "no"),
    ("ATK-STRIP-01", "preferred"),
    ("ATK-STRIP-03", "no"),
    ("ATK-STRIP-03", "preferred"),
    ("ATK-STRIP-04", "no"),
    ("ATK-STRIP-05", "no"),
    ("ATK-STRIP-05", "preferred"),
}


@pytest.fixture(scope="module")
def catalogue() -> list[Case]:
    return load_cases()


def by_id(cases: list[Case]) -> dict[str, Case]:
    return {c.id: c for c in cases}


def test_the_catalogue_loads_with_unique_ids(catalogue: list[Case]) -> None:
    assert len(catalogue) >= 40
    ids = [c.id for c in catalogue]
    assert len(set(ids)) == len(ids)
    root = catalogue_dir()
    files = sorted(p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] != SENDER_CASES)
    assert len(files) == len(catalogue)  # every YAML file in the catalogue is a case (receiver cases: test_sender)


def test_cases_are_filed_by_what_they_test(catalogue: list[Case]) -> None:
    root = catalogue_dir()
    for case in catalogue:
        folder = Path(str(case.file)).resolve().relative_to(root).parts[0]
        assert folder in FOLDERS, f"{case.file}: not in one of {sorted(FOLDERS)}"
        if case.id.startswith("ATK-"):
            assert folder == "attacks", case.file


def test_every_behaviour_is_used(catalogue: list[Case]) -> None:
    used = Counter(c.client.behaviour for c in catalogue if c.client.behaviour)
    assert set(BEHAVIOURS) - set(used) == set()


def test_clients_and_targets_exist_in_the_default_lab(catalogue: list[Case]) -> None:
    topology = default_topology()
    appliance = load_appliance(Path(__file__).resolve().parents[1] / "lab" / "defaults" / "appliance.yaml")
    listeners = {item.name for item in appliance.listeners}
    for case in catalogue:
        topology.host(case.client.host)  # raises KeyError for an unknown host
        assert case.target is None or case.target in listeners, case.id


def test_the_rules_and_attacks_of_the_spec_are_covered(catalogue: list[Case]) -> None:
    cases = by_id(catalogue)
    for rule, ids in RULES.items():
        for case_id in ids:
            assert case_id in cases, f"rule {rule}: {case_id} missing"
            assert cases[case_id].policies == POLICIES, f"rule {rule}: {case_id} must run under every policy"
    for attack, ids in ATTACKS.items():
        assert all(i in cases for i in ids), attack
    assert any(c.verify_client for c in catalogue)
    assert {c.middlebox.answer_starttls for c in catalogue if c.middlebox} == {None, 454}


def test_smuggling_cases_are_judged_from_replies_alone(catalogue: list[Case]) -> None:
    """Each SMTP smuggling variant runs against any target: no lab-only need, a MUST behind its FAILED."""
    cases = by_id(catalogue)
    sequences = set()
    for case_id in RULES[9]:
        case = cases[case_id]
        assert case.requires == (), (case_id, case.requires)
        assert case.strongest_level.verdict is Verdict.FAILED
        assert case.client.steps is not None
        raws = [step for step in case.client.steps if isinstance(step, Raw)]
        assert len(raws) == 1 and raws[0].settle and raws[0].replies == 1
        sequences.add(raws[0].chunks[1])
    assert len(sequences) == len(RULES[9])


def test_every_run_has_a_passing_alternative(catalogue: list[Case]) -> None:
    """A case states, for each policy it runs under, the outcome that passes (OK, or INFORMATIONAL by design)."""
    for case in catalogue:
        for policy in case.policies:
            verdicts = {a.verdict for a in case.expect.for_policy(policy)}
            assert verdicts & {Verdict.OK, Verdict.INFORMATIONAL}, f"{case.id}[{policy}]"


def _run(cases: list[Case], state: Path) -> dict[tuple[str, str], object]:
    options = RunOptions(carrier="memory", state_dir=state, timestamps=False)
    result = run_cases(cases, POLICIES, options)
    check_record(json.loads(dumps(result)))  # the record as written matches index.schema.json (not checked on write)
    return {(r.case, str(r.policy)): r for r in result.runs}


def test_the_lab_gives_the_declared_verdicts(catalogue: list[Case], tmp_path_factory: pytest.TempPathFactory) -> None:
    runs = _run(catalogue, tmp_path_factory.mktemp("state"))
    assert len(runs) == sum(len(c.policies) for c in catalogue)
    wrong = {k: (r.verdict, r.reason) for k, r in runs.items() if r.verdict not in (Verdict.OK, Verdict.INFORMATIONAL)}
    assert wrong == {}
    informational = {k for k, r in runs.items() if r.verdict is Verdict.INFORMATIONAL}
    assert informational == INFORMATIONAL
