"""One pipeline for ``smtplab run`` and the pytest plugin: plan, execute, post-process.

Both front ends turn their options into one ``RunRequest`` (typed; no argparse below the command line) and hand
it here. ``make_plan`` picks the cases, the targets and the policies each case runs under (the lab's listeners,
or external MTAs with their declared facts and relay needs); ``execute`` runs one target's selected runs through
``lab.scenario.runner`` and applies the target's declared deviations (the runner judges, the caller forgives);
``combine`` joins several targets' records into one. What a front end does with the record (the terminal and
the reports, a baseline, pytest items) is its own business.

Errors name the ``smtplab run`` flag at fault (``--policy``, ``--target``, ``selectors`` ...); the plugin renames
them to its ``--smtplab-*`` options.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from lab.conformance.deviations import apply_deviations
from lab.conformance.targets import NO_FLAGS, TargetFlags, target_from_flags, target_from_profile
from lab.errors import BadInput
from lab.net.carrier import LAB_CARRIERS
from lab.net.topology import Topology, default_topology, load_topology
from lab.scenario.loader import check_client_hosts, load_cases
from lab.scenario.model import POLICIES, Case
from lab.scenario.result import CaseRun, RunResult
from lab.scenario.runner import ExternalTarget, RunOptions, lab_target_name, run_pairs, run_selected

#: Runs at once when ``-j`` is not given, by carrier: a netns run mostly waits on real time (a smuggling case
#: listens a second for a reply that must not come), so four workers, each with its own namespaces (docs/netns.md).
CARRIER_JOBS = {"netns": 4}


@dataclass(frozen=True)
class RunRequest:
    """What to run and how, as ``smtplab run`` and the pytest plugin both say it.

    ``policies`` None: every policy (the lab), or the one a profile declares. ``carrier`` None: memory (an
    external target: TCP; ``netns``: one serving inside the kept namespace set, docs/netns.md). ``jobs`` None: 1, or a
    profile's ``concurrency``.
    """

    selectors: tuple[str, ...] = ()
    policies: tuple[str, ...] | None = None
    carrier: str | None = None
    topology: str | None = None
    seed: int = 0
    report_dir: Path | None = None
    timestamps: bool = True
    jobs: int | None = None
    profiles: tuple[str, ...] = ()
    flags: TargetFlags = NO_FLAGS


@dataclass(frozen=True)
class TargetPlan:
    """One system under test: the lab's listeners (``external`` None) or another MTA, and its policies."""

    name: str
    external: ExternalTarget | None
    policies: tuple[str, ...]

    def runs(self, case: Case) -> list[str]:
        """The policies ``case`` runs under against this target (as ``run_pairs`` picks them)."""
        if self.external is not None:
            return list(self.policies)
        return [p for p in self.policies if p in case.policies]


@dataclass(frozen=True)
class Plan:
    """The cases, the targets and how to reach them: everything decided before the first byte."""

    request: RunRequest
    cases: tuple[Case, ...]
    targets: tuple[TargetPlan, ...]
    topology: Topology = field(repr=False)

    @property
    def carrier(self) -> str:
        if self.targets[0].external is not None:
            return "netns" if self.request.carrier == "netns" else "tcp"
        return self.request.carrier or "memory"

    def size(self) -> int:
        """Runs the whole plan makes."""
        return sum(len(target.runs(case)) for target in self.targets for case in self.cases)


def make_plan(request: RunRequest, *, check_hosts: bool = True) -> Plan:
    """Check the request and load what it names; any problem is a ``BadInput`` naming the flag or file.

    ``check_hosts``: a case whose client host the topology lacks is bad input now (``smtplab run``: exit 3);
    without it, that case's runs are harness ERRORs (the plugin fails those items, not the session).
    """
    if request.jobs is not None and request.jobs < 1:
        raise BadInput("must be at least 1", field="--jobs")
    if request.carrier is not None and request.carrier not in LAB_CARRIERS:
        raise BadInput(f"{request.carrier!r} is not one of {', '.join(LAB_CARRIERS)}", field="--carrier")
    externals = _externals(request)
    if externals and request.carrier not in (None, "netns"):
        raise BadInput(
            "an external target is reached over TCP, or with netns inside the kept namespace set", field="--carrier"
        )
    names = [t.name for t in externals]
    if len(set(names)) != len(names):
        raise BadInput(f"two targets share a name: {', '.join(names)}", field="--profile")
    topology = load_topology(request.topology) if request.topology else default_topology()
    if request.carrier == "netns":  # the target, and a client it refuses, are hosts of the topology
        for target in externals:
            for address, flag in ((target.host, "--target"), (target.facts.get("blocked_client"), "--blocked-client")):
                if address is not None and topology.host_by_address(str(address)) is None:
                    raise BadInput(f"{address} is no host's address in the topology (netns carrier)", field=flag)
    cases = tuple(load_cases(list(request.selectors) or None))
    if not cases:
        raise BadInput("no case matches " + " ".join(request.selectors), field="selectors")
    if externals:
        targets = tuple(TargetPlan(t.name, t, (str(t.policy),)) for t in externals)
    else:
        if check_hosts:
            check_client_hosts(cases, {host.name for host in topology.hosts})
        targets = (TargetPlan(lab_target_name(topology), None, request.policies or POLICIES),)
    return Plan(request, cases, targets, topology)


def _externals(request: RunRequest) -> list[ExternalTarget]:
    """The external targets: one per profile (``--target`` moves a single one), or ``--target`` with its policy."""
    flags, policies = request.flags, request.policies
    in_namespace = request.carrier == "netns"  # make_plan checks the address is a topology host's
    if request.profiles:
        if flags.target and len(request.profiles) > 1:
            raise BadInput("moves one profile; it cannot place several", field="--target")
        externals = [target_from_profile(path, flags, in_namespace=in_namespace) for path in request.profiles]
        for target in externals:
            if policies is not None and list(policies) != [str(target.policy)]:
                raise BadInput(
                    f"the profile {target.name!r} declares policy {target.policy}; its cases are judged under that",
                    field="--policy",
                )
        return externals
    if flags.target:
        if policies is None or len(policies) != 1:
            raise BadInput("an external target needs the one policy it is meant to have", field="--policy")
        return [target_from_flags(flags, policies[0], in_namespace=in_namespace)]
    return []


def execute(
    plan: Plan,
    target: TargetPlan,
    selected: Sequence[tuple[str, str]] | None = None,
    *,
    report_dir: Path | None = None,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Run ``target``'s part of the plan (only the ``(case id, policy)`` pairs in ``selected``, if given), then
    apply the target's declared deviations: FAILED as declared is XFAIL, a declared failure gone is XPASS."""
    external = target.external
    pairs = run_pairs(plan.cases, target.policies, external)
    if selected is not None:
        wanted = set(selected)
        pairs = [(case, policy) for case, policy in pairs if (case.id, policy) in wanted]
    request = plan.request
    options = RunOptions(
        carrier=request.carrier or "memory",
        topology=plan.topology,
        seed=request.seed,
        report_dir=report_dir if report_dir is not None else request.report_dir,
        timestamps=request.timestamps,
        target=external,
        jobs=jobs or request.jobs or (external.concurrency if external else CARRIER_JOBS.get(plan.carrier, 1)),
        progress=progress,
    )
    result = run_selected(pairs, options)
    if external is not None and external.deviations:
        result = replace(result, runs=apply_deviations(result.runs, external.deviations))
    return result


def combine(results: Sequence[RunResult], runs: Sequence[CaseRun]) -> RunResult:
    """One record of several targets' results, holding ``runs`` (in the order the caller wants them)."""
    first = results[0]
    return RunResult(
        seed=first.seed,
        carrier=first.carrier,
        started=first.started,
        targets=list({t.name: t for r in results for t in r.targets}.values()),
        address_map=first.address_map,
        runs=list(runs),
    )
