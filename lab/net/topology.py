"""The lab's network: networks, hosts, DNS, links and middleboxes (docs/topology-format.md).

Addresses here are virtual labels (198.51.100.7, 192.168.2.1); they never reach a real socket.
``Topology.loopback_map`` gives each one a distinct 127.x.y.z for carriers that do use real sockets.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

from lab.appliance.model import Appliance
from lab.errors import BadInput, excerpt
from lab.names import hostname_problem
from lab.policy.hat import Peer
from lab.yamlsource import DocumentBuilder, FieldPath, read_yaml

SCHEMA = "topology.schema.json"
BUILTIN = "builtin"
_FIRST_LOOPBACK_NET = 10  # 127.10.x.y for the first network: far from 127.0.0.1


@dataclass(frozen=True)
class Network:
    name: str
    subnet: str  # e.g. "192.168.2.0/24"
    index: int  # position in the file; decides the loopback block

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        net = ipaddress.ip_network(self.subnet)
        return ip.version == net.version and ip in net


@dataclass(frozen=True)
class Host:
    name: str
    role: str  # appliance | mta | client | internal | firewall
    addresses: tuple[str, ...]
    dns_names: tuple[str, ...] = ()
    behaviour: str | None = None  # the client behaviour this host is meant to show (a hint for scenarios)
    description: str = ""
    appliance_config: str | None = None  # role appliance: "builtin" or an absolute path
    appliance: Appliance | None = field(default=None, compare=False, repr=False)

    @property
    def address(self) -> str:
        """The first address: the one a host uses when it does not say otherwise."""
        return self.addresses[0]


@dataclass(frozen=True)
class DnsRecord:
    """``A``/``AAAA``: name -> address; ``PTR``: address -> name; ``MX``: domain -> exchange with preference;
    ``TXT``: name -> text (``_mta-sts.<domain>``, ``_smtp._tls.<domain>``)."""

    type: str
    name: str  # A/AAAA/TXT: the owner name; PTR: the address; MX: the mail domain
    value: str  # A/AAAA: the address; PTR: the host name; MX: the exchange's host name; TXT: the text
    preference: int | None = None  # MX only


@dataclass(frozen=True)
class MXHost:
    """One host to try for a mail domain: its exchange name, MX preference and addresses (A, then AAAA)."""

    exchange: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Link:
    between: tuple[str, str]
    description: str = ""


@dataclass(frozen=True)
class StripOptions:
    """A STARTTLS-stripping middlebox (docs/rules.md §5)."""

    rewrite: bool = True  # rewrite "250-STARTTLS" to the same-length "250-XXXXXXXA"
    answer_starttls: int | None = None  # answer STARTTLS itself with this code (e.g. 454) instead of passing it


@dataclass(frozen=True)
class Middlebox:
    name: str
    kind: str  # starttls-strip
    between: tuple[str, str]  # the two hosts whose link it sits on
    options: StripOptions = field(default_factory=StripOptions)
    enabled: bool = True
    description: str = ""


@dataclass(frozen=True)
class StsPolicyHost:
    """An MTA-STS policy host (RFC 8461 3.3): ``host`` serves ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
    with this policy. Whether senders look for it is the ``_mta-sts.<domain>`` TXT record's business."""

    domain: str
    host: str  # the topology host that answers for mta-sts.<domain>
    mode: str  # enforce | testing | none
    mx: tuple[str, ...] = ()  # patterns: mx1.example.org, *.example.org
    max_age: int = 86400

    @property
    def policy_name(self) -> str:
        return f"mta-sts.{self.domain}"

    @property
    def text(self) -> str:
        """The policy file as the host serves it (RFC 8461 3.2, CRLF line ends)."""
        lines = ["version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx), f"max_age: {self.max_age}"]
        return "".join(line + "\r\n" for line in lines)


@dataclass(frozen=True)
class Topology:
    networks: tuple[Network, ...]
    hosts: tuple[Host, ...]
    records: tuple[DnsRecord, ...] = ()
    links: tuple[Link, ...] = ()
    middleboxes: tuple[Middlebox, ...] = ()
    name: str = ""
    source: str | None = None
    sts_hosts: tuple[StsPolicyHost, ...] = ()

    def host(self, name: str) -> Host:
        """The host called ``name``; ``KeyError`` if there is none."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def host_by_address(self, ip: str) -> Host | None:
        canonical = _canonical_ip(ip)
        return next((h for h in self.hosts if canonical in h.addresses), None)

    def forward(self, name: str) -> tuple[str, ...]:
        """The A and AAAA records of ``name``, in file order."""
        key = _canonical_name(name)
        return tuple(r.value for r in self.records if r.type in ("A", "AAAA") and r.name == key)

    def mx(self, domain: str) -> tuple[MXHost, ...]:
        """The virtual DNS answer for delivering to ``domain``, in the order to try: MX records by preference
        (lowest first; equal preferences in file order), each with its addresses. Without an MX record the domain
        itself is the one host, preference 0, if it has an address (RFC 5321 5.1, the implicit MX)."""
        key = _canonical_name(domain)
        records = sorted((r for r in self.records if r.type == "MX" and r.name == key), key=lambda r: r.preference or 0)
        if not records:
            addresses = self.forward(key)
            return (MXHost(key, 0, addresses),) if addresses else ()
        return tuple(MXHost(r.value, r.preference or 0, self.forward(r.value)) for r in records)

    def txt(self, name: str) -> tuple[str, ...]:
        """The TXT records of ``name`` (e.g. ``_mta-sts.example.com``), in file order."""
        key = _canonical_name(name)
        return tuple(r.value for r in self.records if r.type == "TXT" and r.name == key)

    def sts_host(self, domain: str) -> StsPolicyHost | None:
        """The MTA-STS policy host of ``domain`` (``mta_sts`` in the file), or None."""
        key = _canonical_name(domain)
        return next((p for p in self.sts_hosts if p.domain == key), None)

    def reverse_name(self, ip: str) -> tuple[str | None, bool]:
        """The PTR name of ``ip`` and whether it is verified (the name's A/AAAA records include ``ip``)."""
        canonical = _canonical_ip(ip)
        name = next((r.value for r in self.records if r.type == "PTR" and r.name == canonical), None)
        return name, name is not None and canonical in self.forward(name)

    def peer(self, ip: str) -> Peer:
        """``ip`` as the HAT sees it: with its reverse-DNS name only when that name verifies."""
        name, verified = self.reverse_name(ip)
        return Peer.of(ip, name if verified else None)

    def appliance_host(self) -> Host:
        """The host with role ``appliance``."""
        for host in self.hosts:
            if host.role == "appliance":
                return host
        raise BadInput("the topology has no host with role appliance", file=self.source)

    def appliance(self) -> Appliance:
        """The configuration the appliance host runs."""
        found = self.appliance_host().appliance
        assert found is not None  # the loader sets it for every appliance host
        return found

    def path(self, a: str, b: str) -> list[str] | None:
        """The hosts from ``a`` to ``b`` over the fewest links (ties: file order of links); None if unconnected."""
        for name in (a, b):
            self.host(name)  # KeyError for an unknown host, rather than "no path"
        previous: dict[str, str | None] = {a: None}
        queue = deque([a])
        while queue:  # bounded: each host enters the queue at most once
            here = queue.popleft()
            if here == b:
                hops = [b]
                while (back := previous[hops[-1]]) is not None:
                    hops.append(back)
                return hops[::-1]
            for neighbour in self._neighbours(here):
                if neighbour not in previous:
                    previous[neighbour] = here
                    queue.append(neighbour)
        return None

    def middleboxes_between(self, a: str, b: str) -> tuple[Middlebox, ...]:
        """The enabled middleboxes on the links of the path from ``a`` to ``b``, in order from ``a``."""
        hops = self.path(a, b) or []
        out: list[Middlebox] = []
        for x, y in pairwise(hops):
            out.extend(m for m in self.middleboxes if m.enabled and set(m.between) == {x, y})
        return tuple(out)

    def middlebox(self, name: str) -> Middlebox:
        for item in self.middleboxes:
            if item.name == name:
                return item
        raise KeyError(name)

    def with_middlebox(self, middlebox: Middlebox) -> Topology:
        """A copy with ``middlebox`` added, or replacing the one of the same name (e.g. to enable the slot)."""
        a, b = middlebox.between
        if not any(set(link.between) == {a, b} for link in self.links):
            raise BadInput(f"no link between {a!r} and {b!r} for middlebox {middlebox.name!r}", file=self.source)
        kept = tuple(m for m in self.middleboxes if m.name != middlebox.name)
        if len(kept) == len(self.middleboxes):
            return replace(self, middleboxes=(*kept, middlebox))
        return replace(self, middleboxes=tuple(middlebox if m.name == middlebox.name else m for m in self.middleboxes))

    def loopback_map(self) -> dict[str, str]:
        """Each host address -> a distinct ``127.<10+network index>.x.y``, the same on every run.

        ``x.y`` is the address's offset inside its network when every offset there fits in 16 bits (so
        198.51.100.10 in the first network is 127.10.0.10), otherwise its rank among that network's addresses.
        """
        out: dict[str, str] = {}
        for network in self.networks:
            net = ipaddress.ip_network(network.subnet)
            mine = sorted(
                (ipaddress.ip_address(a) for h in self.hosts for a in h.addresses if network.contains(a)), key=int
            )
            offsets = [int(a) - int(net.network_address) for a in mine]
            if any(o > 0xFFFF for o in offsets):
                offsets = list(range(1, len(mine) + 1))
            for ip, offset in zip(mine, offsets, strict=True):
                out[str(ip)] = f"127.{_FIRST_LOOPBACK_NET + network.index}.{offset >> 8}.{offset & 0xFF}"
        return out

    def _neighbours(self, name: str) -> Iterable[str]:
        for link in self.links:
            a, b = link.between
            if a == name:
                yield b
            elif b == name:
                yield a


def _canonical_ip(text: str) -> str:
    return str(ipaddress.ip_address(text.strip()))


def _canonical_name(text: str) -> str:
    return text.strip().rstrip(".").lower()


def _name_problem(raw: str) -> str | None:
    """Why ``raw`` is not a fully-qualified RFC 1123 host name (after a trailing dot and case are dropped)."""
    return hostname_problem(_canonical_name(raw), fqdn=True)


# --- loading ----------------------------------------------------------------------------------------------------


def default_topology_path() -> Path:
    return Path(str(resources.files("lab").joinpath("defaults", "topology.yaml")))


def default_topology() -> Topology:
    """The built-in lab network (lab/defaults/topology.yaml) running the built-in default appliance."""
    return load_topology(default_topology_path())


def load_topology(path: str | Path) -> Topology:
    """Read, check and build a topology; ``builtin`` names the built-in default."""
    path = default_topology_path() if str(path) == BUILTIN else Path(path)
    return topology_from_dict(read_yaml(path), str(path))


def topology_from_dict(doc: Any, file: str) -> Topology:
    """Build a topology from a document of ``lab.yamlsource.parse_yaml``; ``file`` names it in errors."""
    return _Builder(doc, file).build()


class _Builder(DocumentBuilder):
    SCHEMA = SCHEMA

    def __init__(self, doc: Any, file: str) -> None:
        super().__init__(doc, file)
        self.networks: list[Network] = []
        self.hosts: list[Host] = []

    def normalise(self) -> None:
        """Forgive the case of roles and record types (keeping line numbers)."""
        doc = self.doc
        if not isinstance(doc, dict):
            return
        for host in doc.get("hosts") or []:
            if isinstance(host, dict) and isinstance(host.get("role"), str):
                host["role"] = host["role"].strip().lower()
        for record in doc.get("dns") or []:
            if isinstance(record, dict) and isinstance(record.get("type"), str):
                record["type"] = record["type"].strip().upper()

    def build(self) -> Topology:
        self.normalise()
        self.validate()
        doc = self.doc
        self.build_networks(doc["networks"])
        self.build_hosts(doc["hosts"])
        records = self.build_records(doc.get("dns") or [])
        links = self.build_links(doc.get("links") or [])
        topology = Topology(
            tuple(self.networks), tuple(self.hosts), records, links, name=doc.get("name", ""), source=self.file
        )
        self.check_mx(topology)
        middleboxes = self.build_middleboxes(doc.get("middleboxes") or [], links)
        sts_hosts = self.build_sts_hosts(doc.get("mta_sts") or [], topology)
        return replace(topology, middleboxes=middleboxes, sts_hosts=sts_hosts)

    def build_networks(self, items: list[Any]) -> None:
        parsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        if len(items) > 255 - _FIRST_LOOPBACK_NET:
            raise self.fail(f"at most {255 - _FIRST_LOOPBACK_NET} networks", ["networks"])
        for index, item in enumerate(items):
            path: FieldPath = ["networks", index]
            if any(n.name == item["name"] for n in self.networks):
                raise self.fail(f"duplicate network name {excerpt(item['name'])}", [*path, "name"])
            try:
                net = ipaddress.ip_network(item["subnet"].strip())
            except ValueError as exc:
                raise self.fail(
                    f"{excerpt(item['subnet'])} is not a network ({excerpt(str(exc), quote=False)})", [*path, "subnet"]
                ) from None
            for other, seen in zip(self.networks, parsed, strict=True):
                if net.version == seen.version and net.overlaps(seen):
                    raise self.fail(f"{net} overlaps network {other.name} ({seen})", [*path, "subnet"])
            parsed.append(net)
            self.networks.append(Network(item["name"], str(net), index))

    def build_hosts(self, items: list[Any]) -> None:
        owners: dict[str, str] = {}
        names: dict[str, str] = {}
        for index, item in enumerate(items):
            path: FieldPath = ["hosts", index]
            if any(h.name == item["name"] for h in self.hosts):
                raise self.fail(f"duplicate host name {excerpt(item['name'])}", [*path, "name"])
            addresses = tuple(
                self.host_address(a, [*path, "addresses", i], owners) for i, a in enumerate(item["addresses"])
            )
            for address in addresses:
                owners[address] = item["name"]
            dns_names = []
            for i, raw in enumerate(item.get("dns_names") or []):
                name = _canonical_name(raw)
                problem = _name_problem(raw)
                if problem:
                    raise self.fail(problem, [*path, "dns_names", i])
                if name in names:
                    raise self.fail(f"{name} is already a name of host {names[name]}", [*path, "dns_names", i])
                names[name] = item["name"]
                dns_names.append(name)
            role = item["role"]
            config, appliance = self.host_appliance(item, role, addresses, path)
            self.hosts.append(
                Host(
                    item["name"],
                    role,
                    addresses,
                    tuple(dns_names),
                    item.get("behaviour"),
                    item.get("description", ""),
                    config,
                    appliance,
                )
            )
        appliances = [i for i, h in enumerate(self.hosts) if h.role == "appliance"]
        if len(appliances) > 1:
            raise self.fail(
                f"only one host may have role appliance (also hosts[{appliances[0]}])",
                ["hosts", appliances[1], "role"],
            )

    def host_address(self, raw: str, path: FieldPath, owners: dict[str, str]) -> str:
        try:
            ip = ipaddress.ip_address(raw.strip())
        except ValueError:
            raise self.fail(f"{excerpt(raw)} is not an IP address", path) from None
        address = str(ip)
        if address in owners:
            raise self.fail(f"address {address} is already used by host {owners[address]}", path)
        network = next((n for n in self.networks if n.contains(address)), None)
        if network is None:
            raise self.fail(f"address {address} is outside every network", path)
        net = ipaddress.ip_network(network.subnet)
        if ip.version == 4 and net.prefixlen <= 30 and ip in (net.network_address, net.broadcast_address):
            which = "network" if ip == net.network_address else "broadcast"
            raise self.fail(f"address {address} is the {which} address of {network.name}", path)
        return address

    def host_appliance(
        self, item: Any, role: str, addresses: tuple[str, ...], path: FieldPath
    ) -> tuple[str | None, Appliance | None]:
        from lab.appliance.config import load_appliance

        if role != "appliance":
            if "appliance" in item:
                raise self.fail(
                    f"only a host with role appliance runs an appliance (this one is {role})", [*path, "appliance"]
                )
            return None, None
        raw = item.get("appliance", BUILTIN)
        config = raw if raw == BUILTIN else str((Path(self.file).parent / raw).resolve())
        if config != BUILTIN and not Path(config).is_file():
            raise self.fail(f"no appliance configuration at {config}", [*path, "appliance"])
        appliance = load_appliance(config)
        for interface in appliance.interfaces.values():
            if interface.address not in addresses:
                raise self.fail(
                    f"the appliance's interface {interface.name} ({interface.address}) is not an address of this host",
                    [*path, "addresses"],
                )
        return config, appliance

    def build_records(self, items: list[Any]) -> tuple[DnsRecord, ...]:
        records: list[DnsRecord] = []
        explicit_ptr: set[str] = set()
        for index, item in enumerate(items):
            record = self.record(item, ["dns", index])
            if record in records:
                raise self.fail(f"duplicate {record.type} record", ["dns", index])
            if record.type == "PTR":
                explicit_ptr.add(record.name)
            records.append(record)
        generated: list[DnsRecord] = []
        for host in self.hosts:
            for name in host.dns_names:
                for address in host.addresses:
                    kind = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
                    generated.append(DnsRecord(kind, name, address))
            if host.dns_names:
                generated.extend(
                    DnsRecord("PTR", a, host.dns_names[0]) for a in host.addresses if a not in explicit_ptr
                )
        return tuple(generated + [r for r in records if r not in generated])

    def record(self, item: Any, path: FieldPath) -> DnsRecord:
        kind = item["type"]
        needs = {
            "A": ("name", "address"),
            "AAAA": ("name", "address"),
            "PTR": ("address", "name"),
            "MX": ("domain", "exchange"),
            "TXT": ("name", "text"),
        }
        allowed = set(needs[kind]) | {"type"} | ({"preference"} if kind == "MX" else set())
        extra = sorted(set(item) - allowed)
        if extra:
            raise self.fail(f"not a field of a {kind} record (it takes {', '.join(needs[kind])})", [*path, extra[0]])
        for key in needs[kind]:
            if key not in item:
                raise self.fail(f"a {kind} record needs {key}", path)
        if kind == "MX":
            for key in ("domain", "exchange"):
                problem = _name_problem(item[key])
                if problem:
                    raise self.fail(problem, [*path, key])
            return DnsRecord(
                "MX", _canonical_name(item["domain"]), _canonical_name(item["exchange"]), item.get("preference", 10)
            )
        if kind == "TXT":
            owner = _canonical_name(item["name"])
            labels = owner.split(".")
            while labels and labels[0].startswith("_") and len(labels[0]) > 1:  # _mta-sts, _smtp._tls
                labels = labels[1:]
            problem = _name_problem(".".join(labels)) if labels else "an underscore label needs a domain after it"
            if problem:
                raise self.fail(problem, [*path, "name"])
            return DnsRecord("TXT", owner, item["text"])
        try:
            ip = ipaddress.ip_address(item["address"].strip())
        except ValueError:
            raise self.fail(f"{excerpt(item['address'])} is not an IP address", [*path, "address"]) from None
        if (kind, ip.version) in (("A", 6), ("AAAA", 4)):
            raise self.fail(f"an {kind} record holds an IPv{4 if kind == 'A' else 6} address", [*path, "address"])
        name = _canonical_name(item["name"])
        problem = _name_problem(item["name"])
        if problem:
            raise self.fail(problem, [*path, "name"])
        return DnsRecord("PTR", str(ip), name) if kind == "PTR" else DnsRecord(kind, name, str(ip))

    def check_mx(self, topology: Topology) -> None:
        for index, item in enumerate(self.doc.get("dns") or []):
            if item["type"] != "MX":
                continue
            exchange = _canonical_name(item["exchange"])
            if not any(topology.host_by_address(a) for a in topology.forward(exchange)):
                raise self.fail(
                    f"MX exchange {exchange} has no A record pointing at a host", ["dns", index, "exchange"]
                )

    def build_sts_hosts(self, items: list[Any], topology: Topology) -> tuple[StsPolicyHost, ...]:
        """``mta_sts``: each domain once, a known host that ``mta-sts.<domain>`` resolves to, valid mx patterns."""
        out: list[StsPolicyHost] = []
        for index, item in enumerate(items):
            path: FieldPath = ["mta_sts", index]
            problem = _name_problem(item["domain"])
            if problem:
                raise self.fail(problem, [*path, "domain"])
            domain = _canonical_name(item["domain"])
            if any(p.domain == domain for p in out):
                raise self.fail(f"a second MTA-STS policy host for {domain}", [*path, "domain"])
            try:
                host = topology.host(item["host"])
            except KeyError:
                raise self.fail(f"unknown host {excerpt(item['host'])}", [*path, "host"]) from None
            name = f"mta-sts.{domain}"
            if not set(topology.forward(name)) & set(host.addresses):
                raise self.fail(
                    f"{name} has no A record pointing at host {host.name} (add it to the host's dns_names)",
                    [*path, "host"],
                )
            patterns = []
            for i, raw in enumerate(item.get("mx") or []):
                problem = hostname_problem(_canonical_name(raw), fqdn=True, wildcard=True)
                if problem:
                    raise self.fail(problem, [*path, "mx", i])
                patterns.append(_canonical_name(raw))
            if not patterns and item["mode"] != "none":
                raise self.fail(f"mode {item['mode']} needs at least one mx pattern (RFC 8461 3.2)", [*path, "mx"])
            out.append(StsPolicyHost(domain, host.name, item["mode"], tuple(patterns), item.get("max_age", 86400)))
        return tuple(out)

    def pair(self, raw: list[str], path: FieldPath) -> tuple[str, str]:
        known = {h.name for h in self.hosts}
        for i, name in enumerate(raw):
            if name not in known:
                raise self.fail(f"unknown host {excerpt(name)}", [*path, i])
        if raw[0] == raw[1]:
            raise self.fail(f"a link joins two different hosts, not {excerpt(raw[0])} to itself", path)
        return raw[0], raw[1]

    def build_links(self, items: list[Any]) -> tuple[Link, ...]:
        links: list[Link] = []
        for index, item in enumerate(items):
            path: FieldPath = ["links", index, "between"]
            between = self.pair(item["between"], path)
            if any(set(link.between) == set(between) for link in links):
                raise self.fail(f"duplicate link between {between[0]} and {between[1]}", path)
            links.append(Link(between, item.get("description", "")))
        return tuple(links)

    def build_middleboxes(self, items: list[Any], links: tuple[Link, ...]) -> tuple[Middlebox, ...]:
        out: list[Middlebox] = []
        for index, item in enumerate(items):
            path: FieldPath = ["middleboxes", index]
            if any(m.name == item["name"] for m in out):
                raise self.fail(f"duplicate middlebox name {excerpt(item['name'])}", [*path, "name"])
            between = self.pair(item["between"], [*path, "between"])
            if not any(set(link.between) == set(between) for link in links):
                raise self.fail(f"no link between {between[0]} and {between[1]}", [*path, "between"])
            options = item.get("options") or {}
            out.append(
                Middlebox(
                    item["name"],
                    item["kind"],
                    between,
                    StripOptions(options.get("rewrite", True), options.get("answer_starttls")),
                    item.get("enabled", True),
                    item.get("description", ""),
                )
            )
        return tuple(out)
