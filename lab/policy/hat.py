"""Host Access Table: ordered sender groups, first match wins (docs/rules.md §1).

Member syntax: full IPv4/IPv6 address, partial IPv4 (``10.1.``), ranges (``10.1.1.10-20`` or
``10.1.1.10-10.1.2.20``), CIDR (``10.1.0.0/16``), a fully-qualified host name (matched against the
*verified* reverse-DNS name of the peer), ``.example.com`` (any host inside that domain) and ``ALL``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lab.policy.modes import Behaviour

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class MemberSyntaxError(ValueError):
    """A sender-group member that is none of the accepted forms."""

    def __init__(self, text: str, why: str) -> None:
        super().__init__(f"{text!r}: {why}")
        self.text = text
        self.why = why


@dataclass(frozen=True)
class Peer:
    """A connecting host as the HAT sees it: its address and its verified reverse-DNS name, if any."""

    address: IPAddress
    verified_name: str | None = None

    @classmethod
    def of(cls, address: str, verified_name: str | None = None) -> Peer:
        name = verified_name.rstrip(".").lower() if verified_name else None
        return cls(ipaddress.ip_address(address), name)


@dataclass(frozen=True)
class Member:
    """One parsed member of a sender group; ``matches`` is the whole semantics."""

    text: str
    kind: str  # all | address | network | range | host | domain
    low: int = 0
    high: int = 0
    version: int = 4
    name: str = ""

    def matches(self, peer: Peer) -> bool:
        if self.kind == "all":
            return True
        if self.kind in ("address", "network", "range"):
            return peer.address.version == self.version and self.low <= int(peer.address) <= self.high
        if peer.verified_name is None:
            return False
        if self.kind == "host":
            return peer.verified_name == self.name
        return peer.verified_name.endswith(self.name)  # domain: name starts with "."


def _valid_hostname(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and len(labels) >= 2 and all(_HOST_LABEL.match(label) for label in labels)


def _partial_ipv4(text: str) -> Member | None:
    body = text[:-1] if text.endswith(".") else text
    parts = body.split(".")
    if not (1 <= len(parts) <= 3) or not all(p.isdigit() and int(p) <= 255 for p in parts):
        return None
    if not text.endswith(".") and len(parts) == 1:
        return None  # a bare number is not a prefix
    octets = [int(p) for p in parts]
    low = high = 0
    for i in range(4):
        shift = 8 * (3 - i)
        low |= (octets[i] if i < len(octets) else 0) << shift
        high |= (octets[i] if i < len(octets) else 255) << shift
    return Member(text, "network", low, high, 4)


def _range(text: str) -> Member | None:
    start_text, _, end_text = text.partition("-")
    try:
        start = ipaddress.ip_address(start_text)
    except ValueError:
        return None
    if end_text.isdigit() and start.version == 4:
        last = int(end_text)
        if last > 255:
            raise MemberSyntaxError(text, "range end must be 0-255")
        end: IPAddress = ipaddress.IPv4Address((int(start) & ~0xFF) | last)
    else:
        try:
            end = ipaddress.ip_address(end_text)
        except ValueError:
            raise MemberSyntaxError(text, "range end is neither an address nor a last octet") from None
    if end.version != start.version:
        raise MemberSyntaxError(text, "range mixes IPv4 and IPv6")
    if int(end) < int(start):
        raise MemberSyntaxError(text, "range end is below its start")
    return Member(text, "range", int(start), int(end), start.version)


def parse_member(raw: str) -> Member:
    """Parse one member; raise ``MemberSyntaxError`` naming what is wrong."""
    text = raw.strip()
    if not text:
        raise MemberSyntaxError(raw, "empty member")
    if text.upper() == "ALL":
        return Member(text, "all")
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise MemberSyntaxError(text, "not a valid CIDR network") from None
        return Member(text, "network", int(net.network_address), int(net.broadcast_address), net.version)
    try:
        addr = ipaddress.ip_address(text)
        return Member(text, "address", int(addr), int(addr), addr.version)
    except ValueError:
        pass
    if "-" in text and (text[0].isdigit() or ":" in text):
        found = _range(text)
        if found is not None:
            return found
    if text[0].isdigit() and all(c.isdigit() or c == "." for c in text):
        found = _partial_ipv4(text)
        if found is not None:
            return found
        raise MemberSyntaxError(text, "not a valid IPv4 address or prefix")
    name = text.lower().rstrip(".") if not text.startswith(".") else text.lower()
    if name.startswith("."):
        if _valid_hostname(name[1:]) or _HOST_LABEL.match(name[1:]):
            return Member(text, "domain", name=name)
        raise MemberSyntaxError(text, "not a valid domain")
    if _valid_hostname(name):
        return Member(text, "host", name=name)
    raise MemberSyntaxError(text, "not an address, network, range, host name or domain")


@dataclass(frozen=True)
class SenderGroup:
    """A named list of members that maps to a mail flow policy."""

    name: str
    members: tuple[Member, ...]
    policy: str

    @classmethod
    def of(cls, name: str, members: Sequence[str], policy: str) -> SenderGroup:
        return cls(name, tuple(parse_member(m) for m in members), policy)

    def first_match(self, peer: Peer) -> Member | None:
        return next((m for m in self.members if m.matches(peer)), None)


@dataclass(frozen=True)
class HatMatch:
    """Which group and member decided, and the policy it maps to."""

    group: str
    member: str
    policy: str


@dataclass(frozen=True)
class HostAccessTable:
    """Ordered sender groups; read top to bottom, the first group that matches decides."""

    groups: tuple[SenderGroup, ...]

    def match(self, peer: Peer) -> HatMatch | None:
        """The first matching group, ignoring policy behaviours."""
        for group in self.groups:
            member = group.first_match(peer)
            if member is not None:
                return HatMatch(group.name, member.text, group.policy)
        return None

    def resolve(self, peer: Peer, behaviours: Mapping[str, Behaviour]) -> HatMatch | None:
        """The first matching group whose policy does not say CONTINUE (then matching goes on)."""
        for group in self.groups:
            member = group.first_match(peer)
            if member is None:
                continue
            if behaviours.get(group.policy) is Behaviour.CONTINUE:
                continue
            return HatMatch(group.name, member.text, group.policy)
        return None
