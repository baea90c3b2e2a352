"""The one runner: every case x policy x target through the same client engine and the same listener.

A lab target is the topology's appliance with the policy under test applied to the sender group the client's
host falls into, served over the memory carrier (virtual clock, real TLS) or the loopback carrier. An
external target is any host:port on loopback, reached over real TCP, or an MTA serving inside the kept
namespace set (``--carrier netns``, docs/netns.md), reached from the case's client host through the firewall.
Either way the scripted client, the capture, the evaluation and the record are the same; only the carrier differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.protocol import ClientFactory

from lab import __version__
from lab.appliance.maillog import MailLog, log_record
from lab.appliance.model import Appliance, Listener
from lab.appliance.spool import MaildirNames, Spool
from lab.errors import HarnessError
from lab.names import is_loopback
from lab.net.capture import Capture, Direction
from lab.net.carrier import EXTERNAL_CARRIER, ICarrier, open_carrier
from lab.net.middlebox import StartTLSStripper
from lab.net.pcap import write_pcap
from lab.net.topology import Topology, default_topology
from lab.policy.modes import Behaviour, ListenerType, TLSMode
from lab.policy.params import MailFlowPolicy
from lab.scenario.evaluate import Evaluation, evaluate
from lab.scenario.loader import with_facts
from lab.scenario.logevents import MailLogFile, observe, unlogged
from lab.scenario.model import Case, ClientSpec
from lab.scenario.observations import Observations
from lab.scenario.result import CaseRun, Expected, RunResult, Target, Timings, TLSInfo
from lab.scenario.verdict import Verdict
from lab.smtp.behaviours import behaviour_steps
from lab.smtp.client import ClientRecord, ScriptedClient
from lab.smtp.faults import NO_FAULTS, FaultPolicy
from lab.smtp.listener import ApplianceRuntime
from lab.smtp.remote_mta import RemoteMTAFactory
from lab.smtp.transcript import Entry, Kind, error, note
from lab.tls.certs import CertKey, LabCA, default_state_dir
from lab.tls.keylog import KeyLog
from lab.tls.tlsctx import ClientCerts, ClientTLSFactory, lab_client_tls

VIRTUAL_TIMEOUT = 600.0  # virtual seconds a memory run may take before it is a harness error
WALL_TIMEOUT = 120.0  # wall seconds a loopback or external run may take
_LOG_PREFIX = re.compile(r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} ")


@dataclass(frozen=True)
class ExternalTarget:
    """Another MTA at host:port with the policy its configuration is meant to have."""

    name: str
    host: str
    port: int
    policy: TLSMode
    ehlo: str | None = None
    mail_from: str | None = None
    rcpt_to: str | None = None
    trust_pems: tuple[bytes, ...] = ()
    client_cert: CertKey | None = None
    server_name: str | None = None
    timeout: float = 30.0
    concurrency: int = 1  # runs at once when ``-j`` is not given (a profile's ``concurrency``)
    deviations: tuple[Any, ...] = ()  # lab.conformance.profile deviations, applied by lab.pipeline after the run
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # declared facts (lab.scenario.facts)
    maillog: MailLogFile | None = None  # the target's mail log (the ``maillog`` fact)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RunOptions:
    """How the runner runs (lab.pipeline builds these from a ``RunRequest``; tests build them directly)."""

    carrier: str = "memory"  # lab.net.carrier.LAB_CARRIERS; an external target: "tcp", or "netns" (the kept set)
    topology: Topology | None = None
    seed: int = 0
    report_dir: Path | None = None  # captures are written under report_dir/captures/
    state_dir: Path | None = None  # the lab CA; default $SMTPLAB_STATE or ./.smtplab
    timestamps: bool = True
    target: ExternalTarget | None = None
    jobs: int = 1
    progress: Callable[[str], None] | None = None
    faults: FaultPolicy = NO_FAULTS  # the lab listener's sessions (tests break them on purpose)


class Runner:
    """Runs cases; ``run`` returns the one result record every report is drawn from."""

    def __init__(self, options: RunOptions, work_dir: Path | None = None) -> None:
        self.options = options
        self.topology = options.topology or default_topology()
        self.state_dir = options.state_dir or default_state_dir()
        # Scratch (the per-run spools) goes to tmpfs where there is one: mkdir and fsync on a disk cost more than
        # the SMTP dialogue, and nothing in it outlives the run.
        scratch = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="smtplab-run-", dir=scratch)
        self.work_dir = work_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self._ca = LabCA(self.state_dir)
        # TLS contexts are built once per runner, not per run; their key-log lines go to the current run's log.
        self._keylog = _KeylogRelay()
        self._server_tls: dict[Any, Any] = {}
        self._client_tls: dict[tuple[str, str], ClientTLSFactory] = {}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
        if self._carrier_name() == "netns":  # this process's namespaces, and any a -j worker or a killed run left
            from lab.net.netns import release

            release()

    # -- the whole run

    def run(self, cases: Sequence[Case], policies: Sequence[str]) -> RunResult:
        return self.run_selected(run_pairs(cases, policies, self.options.target))

    def run_selected(self, pairs: Sequence[tuple[Case, str]]) -> RunResult:
        """Run these (case, policy) pairs, in this order in the record; the target's deviations are the caller's
        to apply (``lab.pipeline.execute``)."""
        target = self.options.target
        netns_target = None
        if self._carrier_name() == "netns":
            from lab.net.netns import attach_kept, require_netns

            require_netns()
            if target is not None:  # served inside the kept set: the run neither makes nor removes it
                netns_target = attach_kept(self.topology).namespace_of(target.host)
        if target is not None and any(_connects(case, policy, target) for case, policy in pairs):
            _check_reachable(target, netns_target)
        # A target's mail log is one file for every connection: the cases that read it run one at a time,
        # after the others, so that each sees only its own lines. In the kept set every run shares the firewall:
        # a stripping relay diverts all its client's connections to the target, so those runs go alone too.
        one_at_a_time = [_alone(case, target, netns_target is not None) for case, _ in pairs]
        alone = [pair for pair, log in zip(pairs, one_at_a_time, strict=True) if log]
        together = [pair for pair, log in zip(pairs, one_at_a_time, strict=True) if not log]
        try:
            first = self._run_parallel(together) if self.options.jobs > 1 and len(together) > 1 else None
            done = iter([*(first if first is not None else self._run_serial(together)), *self._run_serial(alone)])
            by_pair = {(run.case, str(run.policy)): run for run in done}
            runs = [by_pair[(case.id, policy)] for case, policy in pairs]
        finally:
            self.close()
        return RunResult(
            tool=f"smtplab {__version__}",
            seed=self.options.seed,
            carrier=self._carrier_name(),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if self.options.timestamps else None,
            targets=[self._target_record()],
            address_map=self.topology.loopback_map() if self._carrier_name() == "loopback" else {},
            runs=runs,
        )

    def _run_serial(self, pairs: Sequence[tuple[Case, str]]) -> list[CaseRun]:
        runs = []
        for case, policy in pairs:
            runs.append(self.run_one(case, policy))
            if self.options.progress:
                self.options.progress(f"{case.id}[{policy}]")
        return runs

    def _run_parallel(self, pairs: Sequence[tuple[Case, str]]) -> list[CaseRun]:
        """``-j N``: worker processes, each with its own reactor or clock; the record keeps the serial order.

        Every run is independent (its own clock, listener, capture), so the records are the same as serially.
        """
        worker_options = dataclasses.replace(self.options, progress=None, jobs=1)
        context = _worker_context()
        runs: list[CaseRun | None] = [None] * len(pairs)
        with ProcessPoolExecutor(max_workers=self.options.jobs, mp_context=context) as pool:
            futures = {
                pool.submit(_run_in_worker, worker_options, self.work_dir, case, policy): i
                for i, (case, policy) in enumerate(pairs)
            }
            try:
                for future in as_completed(futures):
                    index = futures[future]
                    try:
                        runs[index] = future.result()
                    except Exception as exc:  # a worker that died is the harness's fault, never the target's
                        raise HarnessError(f"worker for {pairs[index][0].id}[{pairs[index][1]}] failed: {exc}") from exc
                    if self.options.progress:
                        self.options.progress(f"{pairs[index][0].id}[{pairs[index][1]}]")
            except BaseException:  # Ctrl-C or a failed worker: the runs not started yet never start
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return [run for run in runs if run is not None]

    def _carrier_name(self) -> str:
        external = self.options.target is not None and self.options.carrier != "netns"
        return EXTERNAL_CARRIER if external else self.options.carrier

    def _open_carrier(self, capture: Capture) -> ICarrier:
        """This run's carrier: the one place the runner turns the carrier's name into a carrier."""
        name = self._carrier_name()
        mapping = self.topology.loopback_map() if name == "loopback" else None
        timeout = self.options.target.timeout if self.options.target is not None else 30.0
        kept = self.options.target is not None  # an external target over netns: the MTA serves in the kept set
        return open_carrier(
            name, capture=capture, mapping=mapping, topology=self.topology, connect_timeout=timeout, kept=kept
        )

    def _target_record(self) -> Target:
        target = self.options.target
        if target is not None:
            return Target(target.name, target.address, target.policy)
        listener = self._listener(None)
        address = self.topology.appliance().interfaces[listener.interface].address
        mapping = self.topology.loopback_map() if self.options.carrier == "loopback" else None
        return Target(lab_target_name(self.topology), f"{address}:{listener.port}", None, mapping)

    # -- one case under one policy

    def run_one(self, case: Case, policy: str) -> CaseRun:
        started = time.perf_counter()
        external = self.options.target is not None
        observed = Observations()
        transcript: list[Entry] = []
        capture, keylog = Capture(), KeyLog()
        self._keylog.target = keylog
        virtual = 0.0
        target = self.options.target
        missing = case.missing_facts(target.facts) if target is not None else []
        maillog = target.maillog if target is not None else None
        unshown = unlogged(maillog.dialect, case.log_events(policy)) if maillog is not None else None
        try:
            if external and (case.requires or missing or unshown):
                evaluation = evaluate(case, policy, observed, external=True, missing_facts=missing, unshown=unshown)
            else:
                if external and case.facts:
                    case = with_facts(case, self.options.target.facts)  # type: ignore[union-attr]
                outcome = (self._external if external else self._lab)(case, policy, capture)
                virtual = outcome.seconds
                transcript = [*outcome.record.entries, *outcome.notes]
                observed = outcome.record.observed
                observed.spooled, observed.server_log, observed.log = outcome.spooled, outcome.server_log, outcome.log
                observed.plaintext_exposure = self._exposure(case, capture)
                evaluation = evaluate(case, policy, observed, external=external)
        except HarnessError as exc:
            evaluation = Evaluation(Verdict.ERROR, None, f"harness error: {exc}")
            transcript.append(error(f"harness error: {exc}", Kind.HARNESS))
        capture_path, keylog_path = self._write_capture(case, policy, capture, keylog)
        tls = None
        if observed.get("tls") and observed.get("tls_version"):
            tls = TLSInfo(observed["tls_version"], observed.get("tls_cipher", ""))
        wall = (time.perf_counter() - started) * 1000 if self.options.timestamps else None
        return CaseRun(
            case=case.id,
            title=case.title,
            section=case.section,
            spec_refs=list(case.refs),
            description=case.description,
            expectation=case.expectation,
            client=case.client.behaviour or "scripted",
            target=self._target_record().name,
            policy=TLSMode(policy),
            carrier=self._carrier_name(),
            verdict=evaluation.verdict,
            reason=evaluation.reason,
            expected=_expected(evaluation),
            observed=observed,
            transcript=transcript,
            tls=tls,
            timings=Timings(virtual_s=round(virtual, 6), wall_ms=None if wall is None else round(wall, 3)),
            capture=capture_path,
            keylog=keylog_path,
        )

    # -- lab targets

    def _listener(self, name: str | None) -> Listener:
        appliance = self.topology.appliance()
        if name is not None:
            try:
                return appliance.listener(name)
            except KeyError:
                raise HarnessError(f"the appliance has no listener {name!r}") from None
        return public_listener(appliance)

    def _appliance_for(self, case: Case, policy: str, client_ip: str) -> tuple[Appliance, Listener]:
        """The topology's appliance with the policy under test set on the client's sender-group policy."""
        appliance = self.topology.appliance()
        listener = self._listener(case.target)
        resolution = listener.resolve(self.topology.peer(client_ip))
        name = resolution.policy.name
        base = listener.policies.get(name, resolution.policy)
        params = dataclasses.replace(base.params, tls=TLSMode(policy), verify_client=case.verify_client)
        if case.policy_params:
            params = dataclasses.replace(params, **dict(case.policy_params))
        behaviour = Behaviour(case.policy_behaviour) if case.policy_behaviour else base.behaviour
        policies = {**listener.policies, name: MailFlowPolicy(name, behaviour, params)}
        changes: dict[str, Any] = {"policies": policies}
        if case.server_cert == "demo":
            changes["certificate"] = None
        listener = dataclasses.replace(listener, **changes)
        listeners = tuple(listener if item.name == listener.name else item for item in appliance.listeners)
        return dataclasses.replace(appliance, listeners=listeners), listener

    def _client_host(self, case: Case) -> tuple[str, str]:
        try:
            host = self.topology.host(case.client.host)
        except KeyError:
            raise HarnessError(f"{case.where()}: the topology has no host {case.client.host!r}") from None
        return host.address, (host.dns_names[0] if host.dns_names else host.name)

    def _lab(self, case: Case, policy: str, capture: Capture) -> _Outcome:
        client_ip, client_name = self._client_host(case)
        appliance, listener = self._appliance_for(case, policy, client_ip)
        server_ip = appliance.interfaces[listener.interface].address
        net = self._open_carrier(capture)
        clock = net.clock
        run_log: list[str] = []  # this run's lines, every one (the MailLog itself keeps only a bounded tail)
        maillog = MailLog(None, clock=clock.seconds, echo=run_log.append)
        run_dir = self.work_dir / f"{case.id}-{policy}"
        runtime = ApplianceRuntime(
            appliance,
            clock=clock,
            maillog=maillog,
            spool=Spool(run_dir / "spool", name_source=MaildirNames(clock.seconds, host=appliance.hostname, pid=1)),
            state_dir=self.state_dir,
            reverse_dns=self.topology.reverse_name,
            keylog=self._keylog.callback,
            faults=self.options.faults,
            tls_cache=self._server_tls,
        )
        if case.remote_mta is not None:
            factory: Any = RemoteMTAFactory(case.remote_mta.hostname, starttls=case.remote_mta.starttls, clock=clock)
        else:
            factory = runtime.factory(listener)
        net.listen(server_ip, listener.port, factory, backlog=listener.tcp_queue)
        boxes = self._middleboxes(case, client_ip)
        steps = self._steps(case, client_name)
        key = (appliance.hostname, client_name)
        if key not in self._client_tls:  # contexts outlive the run; their key-log lines go to the current run
            self._client_tls[key] = lab_client_tls(
                server_name=appliance.hostname,
                trust_pems=(self._ca.ca_pem,),
                state_dir=self.state_dir,
                client_name=client_name,
                keylog=self._keylog.callback,
                cache=True,
            )

        def connect(f: ClientFactory) -> Any:
            return net.connect(client_ip, server_ip, listener.port, f, middleboxes=boxes)

        client = ScriptedClient(
            steps,
            clock=clock,
            connect=connect,
            tls_factory=self._client_tls[key],
            target=f"{server_ip}:{listener.port}",
        )
        begin = clock.seconds()
        try:
            record = net.run_until(client.run(), timeout=VIRTUAL_TIMEOUT if net.name == "memory" else WALL_TIMEOUT)
            net.drain()  # let the listener finish closing (its log lines)
        finally:
            net.run_until(net.close(abort=False), timeout=10)
        new = run_dir / "spool" / listener.name / "new"  # counted without creating a Maildir that got nothing
        spooled = len(list(new.iterdir())) if new.is_dir() else 0
        lines = [_LOG_PREFIX.sub("", line) for line in run_log]
        server_log = [log_record(line) for line in lines]  # typed once here: nothing reads the text back later
        log = observe(lines, "smtplab") if case.log_events() else None  # lab.scenario.logevents
        notes = [note(f"middlebox: {text}", Kind.MIDDLEBOX) for box in boxes for text in box.notes]
        return _Outcome(record, notes, clock.seconds() - begin, spooled, server_log, log)

    def _middleboxes(self, case: Case, client_ip: str) -> list[StartTLSStripper]:
        boxes = case_middleboxes(case)
        host = self.topology.host_by_address(client_ip)
        if host is not None:
            for box in self.topology.middleboxes_between(host.name, self.topology.appliance_host().name):
                if box.enabled:
                    boxes.append(
                        StartTLSStripper(rewrite=box.options.rewrite, answer_starttls=box.options.answer_starttls)
                    )
        return boxes

    def _envelope(self, case: Case) -> tuple[str, tuple[str, ...]]:
        """The envelope a behaviour client sends: a target's replaces the catalogue's defaults, never an
        address a case chose on purpose."""
        target, defaults = self.options.target, ClientSpec(host="")
        mail_from, rcpt_to = case.client.mail_from, case.client.rcpt_to
        if target and target.mail_from and mail_from == defaults.mail_from:
            mail_from = target.mail_from
        if target and target.rcpt_to and rcpt_to == defaults.rcpt_to:
            rcpt_to = (target.rcpt_to,)
        return mail_from, rcpt_to

    def _steps(self, case: Case, ehlo: str) -> list[Any]:
        if case.client.steps is not None:
            return list(case.client.steps)
        target = self.options.target
        mail_from, rcpt_to = self._envelope(case)
        return behaviour_steps(
            case.client.behaviour or "prefer",
            ehlo=(target.ehlo if target and target.ehlo else None) or case.client.ehlo or ehlo,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            body_marker=case.marker,
        )

    def _exposure(self, case: Case, capture: Capture) -> dict[str, bool]:
        """Did an envelope address or the body marker cross the wire unencrypted? (docs/rules.md §5)"""
        wire = b"".join(flow.payload(Direction.C2S) for flow in capture.flows)
        if case.client.steps is None:
            mail_from, rcpt_to = self._envelope(case)
            addresses: tuple[str, ...] = (mail_from, *rcpt_to)
        else:
            addresses = case.envelope_addresses()
        envelope = any(f"<{a}>".encode() in wire for a in addresses if a)
        return {"envelope": envelope, "body": any(marker.encode() in wire for marker in case.markers())}

    # -- external targets

    def _external(self, case: Case, policy: str, capture: Capture) -> _Outcome:
        target = self.options.target
        assert target is not None
        # A loopback target gets a loopback client address other than its own; a remote one (a profile's
        # allow_remote, e.g. a container on an internal network) is reached from the address the kernel picks.
        source: str | None = None
        if self._carrier_name() == "netns":  # from the case's client host, in its namespace, through the firewall
            source = self._client_host(case)[0]
        elif is_loopback(target.host):
            source = "127.0.0.1" if target.host != "127.0.0.1" else "127.0.0.2"
        if "blocked_client" in case.facts:  # the case is about that address: the client connects from it
            source = str(target.facts["blocked_client"])
        notes: list[Entry] = []
        trust = target.trust_pems
        if case.server_cert == "demo":
            # The demo certificate is one the client does not trust: against another MTA the client trusts only
            # a CA that issued none of the target's certificates, so whatever the target presents does not verify.
            trust = (LabCA.untrusted(self.state_dir).ca_pem,)
            notes.append(
                note(
                    "the client trusts only the lab's untrusted CA: the target's certificate stands in for "
                    "the demo certificate (one the client does not trust)",
                    Kind.DEMO_CERTIFICATE,
                )
            )
        boxes = case_middleboxes(case)  # the carrier runs them in a relay on the client's path to the target
        net = self._open_carrier(capture)
        certs = ClientCerts(self.state_dir, "client.example", lab=target.client_cert, issue_lab=False)
        tls_factory = ClientTLSFactory(
            server_name=target.server_name or target.host,
            trust_pems=trust,
            certs=certs,
            keylog=self._keylog.callback,
        )

        def connect(f: ClientFactory) -> Any:
            return net.connect(source, target.host, target.port, f, middleboxes=boxes)

        steps = self._steps(case, target.ehlo or "smtplab.invalid")
        client = ScriptedClient(
            steps,
            clock=net.clock,
            connect=connect,
            tls_factory=tls_factory,
            reply_timeout=target.timeout,
            target=target.address,
            settle=0.5,
        )
        maillog = target.maillog if case.log_events(policy) else None
        offset = maillog.settle() if maillog is not None else 0  # earlier runs' lines are all in before it
        begin = time.monotonic()
        try:
            record = net.run_until(client.run(), timeout=WALL_TIMEOUT)
        finally:
            net.run_until(net.close(abort=False), timeout=10)
        texts = [*(n for box in boxes for n in box.notes), *net.notes()]
        notes += [note(f"middlebox: {text}", Kind.MIDDLEBOX) for text in texts]
        log = None
        if maillog is not None:
            lines = maillog.lines_since(offset)
            log = observe(lines, maillog.dialect)
            notes += [note(f"maillog: {line}", Kind.MAILLOG) for line in lines]
        return _Outcome(record, notes, time.monotonic() - begin, log=log)

    # -- captures

    def _write_capture(
        self, case: Case, policy: str, capture: Capture, keylog: KeyLog
    ) -> tuple[str | None, str | None]:
        if self.options.report_dir is None or not capture.flows:
            return None, None
        captures = self.options.report_dir / "captures"
        stem = f"{case.id}-{policy}"
        write_pcap(capture, captures / f"{stem}.pcap", seed=self.options.seed)
        keylog_path = None
        if keylog:
            keylog.write(captures / f"{stem}.keys.log")
            keylog_path = f"captures/{stem}.keys.log"
        return f"captures/{stem}.pcap", keylog_path


def _check_reachable(target: ExternalTarget, namespace: str | None = None) -> None:
    """A target nobody answers for is the harness's problem to report (exit 2), not a FAILED per case.
    ``namespace``: the target serves inside it (the netns carrier's kept set); asked from there."""
    try:
        with contextlib.ExitStack() as stack:
            if namespace is not None:
                from lab.net.netns import inside

                stack.enter_context(inside(namespace))
            sock = socket.create_connection((target.host, target.port), timeout=min(target.timeout, 10.0))
        sock.close()
    except OSError as exc:
        where = target.address if target.name == target.address else f"{target.name} at {target.address}"
        raise HarnessError(f"cannot reach {where}: {exc.strerror or exc}") from None


def _alone(case: Case, target: ExternalTarget | None, in_kept_set: bool) -> bool:
    """Must this case's run be the only one at the time (it reads the target's log, or strips in the kept set)?"""
    if target is None:
        return False
    return (target.maillog is not None and bool(case.log_events())) or (in_kept_set and case.middlebox is not None)


def _connects(case: Case, policy: str, target: ExternalTarget) -> bool:
    """Does this run talk to the target at all (no lab-only need, every fact declared, its log can show it)?"""
    if case.requires or case.missing_facts(target.facts):
        return False
    return target.maillog is None or unlogged(target.maillog.dialect, case.log_events(policy)) is None


def run_pairs(cases: Sequence[Case], policies: Sequence[str], target: ExternalTarget | None) -> list[tuple[Case, str]]:
    """The runs a selection makes: each case under each policy it lists, or under the target's declared one."""
    if target is not None:
        return [(relayed(case), str(target.policy)) for case in cases]
    return [(case, policy) for case in cases for policy in policies if policy in case.policies]


#: Lab-only needs that an external run meets all the same: a relay (lab/net/relay.py) on the client's path to
#: the target runs the case's middlebox; the demo certificate is one the client does not trust (``_external``).
RELAYED = frozenset({"middlebox"})


def relayed(case: Case) -> Case:
    """``case`` as run against an external target: what the relay (or the client's trust) provides is no longer
    a lab-only need."""
    met = RELAYED | ({"server-cert"} if case.server_cert == "demo" else set())
    left = tuple(need for need in case.requires if need not in met)
    return case if left == case.requires else dataclasses.replace(case, requires=left)


def case_middleboxes(case: Case) -> list[StartTLSStripper]:
    """The middlebox a case puts on the link (none, or one stripper)."""
    if case.middlebox is None:
        return []
    return [StartTLSStripper(rewrite=case.middlebox.rewrite, answer_starttls=case.middlebox.answer_starttls)]


class _Outcome(NamedTuple):
    """What one carried-out run gives the record: the client's view, the lab's own facts, notes, duration."""

    record: ClientRecord
    notes: list[Entry]  # transcript entries from the link (middlebox notes)
    seconds: float  # virtual seconds on the memory carrier, wall seconds otherwise
    spooled: int | None = None  # facts only the lab knows, added to the client's observations
    server_log: list[dict[str, Any]] | None = None
    log: dict[str, Any] | None = None  # the mail-log events the case reads (lab.scenario.logevents)


class _KeylogRelay:
    """A key-log callback for contexts that outlive one run: lines go to the run under way."""

    def __init__(self) -> None:
        self.target: KeyLog | None = None

    def callback(self, line: bytes) -> None:
        if self.target is not None:
            self.target.callback(line)


def _expected(evaluation: Evaluation) -> Expected | None:
    alt = evaluation.alternative
    if alt is None:
        return None
    return Expected(alt.verdict, alt.label, alt.to_dict()["conditions"])


def public_listener(appliance: Appliance) -> Listener:
    """The listener cases run against unless they name one: the first public listener."""
    return next((item for item in appliance.listeners if item.type is ListenerType.PUBLIC), appliance.listeners[0])


def lab_target_name(topology: Topology | None = None) -> str:
    """``lab:Inboundmail``: how records name the lab's own target in a topology (default: the built-in one)."""
    return f"lab:{public_listener((topology or default_topology()).appliance()).name}"


_worker_runner: Runner | None = None


def _worker_context() -> multiprocessing.context.BaseContext:
    """``-j`` workers start from a clean interpreter (forkserver, else spawn), never as a fork of a process
    that has loaded a reactor (the pytest plugin's, a loopback run's): a forked reactor shares its parent's
    waker and selector and is not safe to use. Each worker loads what its own runs need."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _run_in_worker(options: RunOptions, work_dir: Path, case: Case, policy: str) -> CaseRun:
    """One run inside a ``-j`` worker process; the worker keeps one Runner (and its CA) for all its runs, and
    works in the parent's directory, which the parent removes."""
    global _worker_runner
    if _worker_runner is None:
        _worker_runner = Runner(options, work_dir)
    return _worker_runner.run_one(case, policy)


def run_cases(cases: Sequence[Case], policies: Sequence[str], options: RunOptions) -> RunResult:
    """Run every case under every policy it lists (or the external target's declared policy)."""
    return Runner(options).run(cases, policies)


def run_selected(pairs: Sequence[tuple[Case, str]], options: RunOptions) -> RunResult:
    """Run exactly these (case, policy) pairs (from ``run_pairs``, perhaps filtered), in this order."""
    return Runner(options).run_selected(pairs)
