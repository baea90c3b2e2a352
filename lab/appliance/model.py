"""The appliance configuration as plain, immutable data (docs/rules.md §1).

The loader (``lab.appliance.config``) builds these from YAML; the listener reads them. Resolving a peer to a
policy is pure and lives here, over the policy core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lab.policy.deadlines import Timeouts
from lab.policy.destinations import BounceProfile, DestinationControls
from lab.policy.hat import HatMatch, HostAccessTable, Peer
from lab.policy.modes import Behaviour, ListenerType, TLSMode
from lab.policy.params import EffectiveParams, MailFlowPolicy, PolicyParams


@dataclass(frozen=True)
class Interface:
    name: str
    address: str
    prefix: int = 24

    def label(self) -> str:
        return f"{self.name} ({self.address}/{self.prefix})"


@dataclass(frozen=True)
class Certificate:
    """A certificate the appliance can present.

    ``kind``: ``demo`` (the built-in, insecure demo certificate), ``lab`` (issued by the lab CA for
    ``hostnames``) or ``pem`` (imported from ``cert_file`` / ``key_file``).
    """

    name: str
    kind: str = "demo"
    hostnames: tuple[str, ...] = ()
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class TLSSettings:
    min_version: str = "1.2"  # "1.0" | "1.1" | "1.2" | "1.3"
    max_version: str | None = None  # None: the newest the library has
    ciphers: str | None = None  # OpenSSL cipher list for TLS <= 1.2; None: library default


@dataclass(frozen=True)
class Resolution:
    """What the HAT decided for one peer: the match, the policy and its effective parameters."""

    match: HatMatch
    policy: MailFlowPolicy
    params: EffectiveParams


DEFAULT_REJECT = MailFlowPolicy("(no match)", Behaviour.REJECT)


@dataclass(frozen=True)
class Listener:
    name: str
    type: ListenerType
    interface: str
    port: int = 25
    default_domain: str = ""
    max_concurrency: int = 1000
    tcp_queue: int = 50
    domain_map: bool = False
    certificate: str | None = None  # None: the demo certificate
    rat: tuple[str, ...] = ()  # accepted recipient domains (public listeners); "ALL" accepts any
    hat: HostAccessTable = field(default_factory=lambda: HostAccessTable(()))
    policies: dict[str, MailFlowPolicy] = field(default_factory=dict)
    defaults: PolicyParams = field(default_factory=PolicyParams)
    tls: TLSSettings = field(default_factory=TLSSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)  # every wait of a connection is bounded

    def behaviours(self) -> dict[str, Behaviour]:
        return {name: policy.behaviour for name, policy in self.policies.items()}

    def resolve(self, peer: Peer) -> Resolution:
        """The sender group, policy and parameters for ``peer``; no match at all is treated as REJECT."""
        match = self.hat.resolve(peer, self.behaviours())
        if match is None:
            return Resolution(
                HatMatch("(none)", "", DEFAULT_REJECT.name), DEFAULT_REJECT, DEFAULT_REJECT.effective(self.defaults)
            )
        policy = self.policies[match.policy]
        return Resolution(match, policy, policy.effective(self.defaults))

    def accepts_recipient(self, address: str, behaviour: Behaviour) -> bool:
        """The Recipient Access Table of a public listener; RELAY and private listeners accept any domain."""
        if behaviour is Behaviour.RELAY or self.type is ListenerType.PRIVATE:
            return True
        domain = address.strip("<>").rpartition("@")[2].lower()
        for entry in self.rat:
            entry = entry.lower()
            if entry == "all" or domain == entry or (entry.startswith(".") and domain.endswith(entry)):
                return True
        return False

    def tls_summary(self) -> TLSMode:
        """The TLS setting the summary prints: that of the policy the ALL group maps to."""
        for group in self.hat.groups:
            if any(m.kind == "all" for m in group.members) and group.policy in self.policies:
                return self.policies[group.policy].effective(self.defaults).tls
        return self.defaults.over(DEFAULT_REJECT.effective(PolicyParams())).tls


#: Alert classes and severities (as the appliance names them); ``all`` in a recipient's list means every one.
ALERT_CLASSES = ("system", "hardware", "updater", "antivirus", "antispam")
ALERT_SEVERITIES = ("critical", "warning", "information")


@dataclass(frozen=True)
class AlertRecipient:
    address: str
    classes: tuple[str, ...] = ALERT_CLASSES
    severities: tuple[str, ...] = ALERT_SEVERITIES

    def wants(self, alert_class: str, severity: str) -> bool:
        return alert_class.lower() in self.classes and severity.lower() in self.severities


@dataclass(frozen=True)
class Outbound:
    """How the appliance delivers (docs/outbound.md): from which interface, with which certificate, under which
    destination controls and bounce profiles, and who gets alerts."""

    interface: str | None = None  # None: the first interface
    certificate: str | None = None  # presented when a receiver asks for a client certificate; None: none
    destinations: DestinationControls = field(default_factory=DestinationControls)
    bounce_profiles: dict[str, BounceProfile] = field(default_factory=lambda: {"Default": BounceProfile()})
    alerts_enabled: bool = True
    alert_recipients: tuple[AlertRecipient, ...] = ()

    def bounce_profile(self, name: str) -> BounceProfile:
        return self.bounce_profiles.get(name) or self.bounce_profiles.get("Default") or BounceProfile()

    def alert_recipients_for(self, alert_class: str, severity: str) -> tuple[str, ...]:
        if not self.alerts_enabled:
            return ()
        return tuple(r.address for r in self.alert_recipients if r.wants(alert_class, severity))


@dataclass(frozen=True)
class Appliance:
    hostname: str
    interfaces: dict[str, Interface]
    certificates: dict[str, Certificate]
    listeners: tuple[Listener, ...]
    source: str | None = None  # the file it was loaded from
    outbound: Outbound = field(default_factory=Outbound)

    def local_domains(self) -> tuple[str, ...]:
        """The domains the appliance accepts mail for (its public listeners' RAT entries, without ALL): mail for
        them is delivered into the listener's spool, never relayed out."""
        out: list[str] = []
        for item in self.listeners:
            if item.type is ListenerType.PUBLIC:
                out.extend(entry for entry in item.rat if entry != "ALL" and entry not in out)
        return tuple(out)

    def local_listener(self, domain: str) -> Listener | None:
        """The public listener whose RAT names ``domain`` (exactly or by ``.parent``), if any."""
        name = domain.strip().rstrip(".").lower()
        for item in self.listeners:
            if item.type is not ListenerType.PUBLIC:
                continue
            if any(e != "ALL" and (name == e or (e.startswith(".") and name.endswith(e))) for e in item.rat):
                return item
        return None

    def outbound_interface(self) -> Interface:
        if self.outbound.interface is not None:
            return self.interfaces[self.outbound.interface]
        return next(iter(self.interfaces.values()))

    def listener(self, name: str) -> Listener:
        for item in self.listeners:
            if item.name == name:
                return item
        raise KeyError(name)
