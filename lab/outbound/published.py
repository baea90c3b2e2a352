"""What a recipient domain publishes about TLS, applied by the delivery engine: MTA-STS (RFC 8461).

Before each delivery round for a domain the engine asks its policy source for the rules to apply. This one
looks up ``_mta-sts.<domain>`` in the virtual DNS, fetches the policy from the HTTPS policy host the topology
names for ``mta-sts.<domain>`` when the TXT id is new (``current_policy``), keeps it on the run's clock
(``PolicyCache``), and answers an ``AppliedPolicy``: under ``enforce`` the destination control is tightened to
Required (Verify), and the delivery client checks each MX with ``lab.outbound.mtasts.decide``. The topology's
policy hosts are started with ``serve_topology_policies``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lab.appliance.maillog import MailLog
from lab.net.carrier import ICarrier
from lab.net.topology import Topology
from lab.outbound.mtasts import Mode, Policy, PolicyCache, PolicyError, parse_txt
from lab.outbound.policyserver import PublishedPolicy, current_policy, policy_host, serve_policy
from lab.policy.destinations import DestinationControl, DestinationTLS
from lab.tls.certs import LabCA


@dataclass(frozen=True)
class AppliedPolicy:
    """The rules for one domain's delivery round: the control to apply and the published policy behind it.

    ``policy_type``/``policy_strings`` are what TLS-RPT reports (RFC 8460 4.2); ``sts`` is the MTA-STS policy in
    force (the delivery client checks every MX against it); ``error`` says why a domain that publishes MTA-STS
    has no usable policy (delivery goes on as if it published none, RFC 8461 5; TLS-RPT counts the failure).
    """

    control: DestinationControl
    policy_type: str = "no-policy-found"
    policy_strings: tuple[str, ...] = ()
    sts: Policy | None = None
    error: PolicyError | None = None


def no_published_policy(_domain: str, control: DestinationControl) -> AppliedPolicy:
    """The destination control alone (RFC 8460: ``no-policy-found``)."""
    return AppliedPolicy(control)


def apply_sts(control: DestinationControl, policy: Policy) -> AppliedPolicy:
    """``enforce`` never sends without TLS and a certificate that verifies for the MX (RFC 8461 5): the control
    becomes Required (Verify), whatever it was; ``testing`` and ``none`` leave it as it is."""
    if policy.mode is Mode.ENFORCE:
        control = replace(control, tls=DestinationTLS.REQUIRED_VERIFY)
    return AppliedPolicy(control, "sts", policy.lines, sts=policy)


class MtaStsSource:
    """The engine's policy source over the virtual DNS: ``txt(name)`` and ``forward(name)`` answer as
    ``Topology.txt``/``Topology.forward``; the policy host is reached through ``carrier`` from ``source_ip``."""

    def __init__(
        self,
        carrier: ICarrier,
        *,
        txt: Callable[[str], Sequence[str]],
        forward: Callable[[str], Sequence[str]],
        source_ip: str | None,
        trust_pems: Sequence[bytes],
        maillog: MailLog,
    ) -> None:
        self.carrier, self.txt, self.forward = carrier, txt, forward
        self.source_ip, self.trust_pems, self.maillog = source_ip, tuple(trust_pems), maillog
        self.cache = PolicyCache(carrier.clock.seconds)

    @classmethod
    def for_topology(
        cls, topology: Topology, carrier: ICarrier, *, trust_pems: Sequence[bytes], maillog: MailLog
    ) -> MtaStsSource:
        source = topology.appliance().outbound_interface().address
        return cls(
            carrier,
            txt=topology.txt,
            forward=topology.forward,
            source_ip=source,
            trust_pems=trust_pems,
            maillog=maillog,
        )

    async def __call__(self, domain: str, control: DestinationControl) -> AppliedPolicy:
        records = self.txt(f"_mta-sts.{domain}")
        if parse_txt(records) is None and self.cache.policy(domain) is None:
            return AppliedPolicy(control)
        addresses = self.forward(policy_host(domain))
        seen: list[Policy | PolicyError] = []
        result = await current_policy(
            self.carrier,
            self.cache,
            domain,
            records,
            self.source_ip,
            addresses[0] if addresses else None,
            self.trust_pems,
            fetched=seen.append,
        )
        for what in seen:
            if isinstance(what, PolicyError):
                self.maillog.mtasts_error(domain, what.result_type, what.reason)
        if isinstance(result, Policy):
            fresh = any(isinstance(what, Policy) for what in seen)
            if seen:
                self.maillog.mtasts_policy(domain, str(result.mode), result.max_age, "fetched" if fresh else "cached")
            return apply_sts(control, result)
        if isinstance(result, PolicyError):
            if not seen:  # a broken TXT record: no fetch was tried, so nothing above said it
                self.maillog.mtasts_error(domain, result.result_type, result.reason)
            return AppliedPolicy(control, "sts", (), error=result)
        return AppliedPolicy(control)


def serve_topology_policies(topology: Topology, carrier: ICarrier, ca: LabCA) -> list[Any]:
    """Start every MTA-STS policy host of the topology (``mta_sts``) on ``carrier``, on each address of its host
    that ``mta-sts.<domain>`` resolves to, with a lab-CA certificate for that name; returns the ports."""
    ports = []
    for published in topology.sts_hosts:
        host = topology.host(published.host)
        certkey = ca.issue(f"mta-sts-{published.domain}", [published.policy_name])
        for address in topology.forward(published.policy_name):
            if address in host.addresses:
                ports.append(serve_policy(carrier, address, PublishedPolicy(published.text), certkey))
    return ports
