"""HAT member syntax and first-match-wins, as tables (docs/rules.md §1)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.policy.hat import HostAccessTable, MemberSyntaxError, Peer, SenderGroup, parse_member
from lab.policy.modes import Behaviour

# member, peer address, verified name, matches?
MATCH_TABLE = [
    ("ALL", "198.51.100.7", None, True),
    ("all", "2001:db8::1", None, True),
    ("198.51.100.7", "198.51.100.7", None, True),
    ("198.51.100.7", "198.51.100.8", None, False),
    ("2001:db8::1", "2001:db8::1", None, True),
    ("2001:db8::1", "198.51.100.7", None, False),
    ("10.1.", "10.1.200.3", None, True),
    ("10.1.", "10.2.0.1", None, False),
    ("10.", "10.255.255.255", None, True),
    ("10.1.1.", "10.1.1.0", None, True),
    ("10.1.1.", "10.1.2.0", None, False),
    ("10.1.1.10-20", "10.1.1.10", None, True),
    ("10.1.1.10-20", "10.1.1.20", None, True),
    ("10.1.1.10-20", "10.1.1.21", None, False),
    ("10.1.1.10-20", "10.1.1.9", None, False),
    ("10.1.1.250-10.1.2.5", "10.1.2.1", None, True),
    ("10.1.1.250-10.1.2.5", "10.1.2.6", None, False),
    ("10.1.0.0/16", "10.1.99.1", None, True),
    ("10.1.0.0/16", "10.2.0.1", None, False),
    ("2001:db8::/32", "2001:db8:ffff::1", None, True),
    ("2001:db8::/32", "2001:db9::1", None, False),
    ("mx.example.net", "198.51.100.7", "mx.example.net", True),
    ("mx.example.net", "198.51.100.7", "MX.Example.NET.", True),
    ("mx.example.net", "198.51.100.7", None, False),  # unverified reverse DNS never matches a name
    ("mx.example.net", "198.51.100.7", "mx2.example.net", False),
    (".example.net", "198.51.100.7", "mx.example.net", True),
    (".example.net", "198.51.100.7", "a.b.example.net", True),
    (".example.net", "198.51.100.7", "example.net", False),
    (".example.net", "198.51.100.7", "badexample.net", False),
    (".example.net", "198.51.100.7", None, False),
    ("1and1-mail.com", "198.51.100.7", "1and1-mail.com", True),
]


@pytest.mark.parametrize(("member", "address", "name", "expected"), MATCH_TABLE)
def test_member_matches(member: str, address: str, name: str | None, expected: bool) -> None:
    assert parse_member(member).matches(Peer.of(address, name)) is expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty member"),
        ("10.1.1.20-10", "range end is below its start"),
        ("10.1.1.10-300", "range end must be 0-255"),
        ("10.1.1.1-2001:db8::1", "range mixes IPv4 and IPv6"),
        ("10.300.", "not a valid IPv4 address or prefix"),
        ("10.0.0.0/33", "not a valid CIDR network"),
        ("-bad-.example", "not an address, network, range, host name or domain"),
        ("under_score.example.com", "not an address, network, range, host name or domain"),
        (".", "not a valid domain"),
    ],
)
def test_member_syntax_errors(text: str, why: str) -> None:
    with pytest.raises(MemberSyntaxError) as info:
        parse_member(text)
    assert info.value.why == why


def _table() -> HostAccessTable:
    return HostAccessTable(
        (
            SenderGroup.of("WHITELIST", ["198.51.100.10", ".trusted.example"], "TRUSTED"),
            SenderGroup.of("BLACKLIST", ["203.0.113.0/24"], "BLOCKED"),
            SenderGroup.of("SUSPECTLIST", ["198.51.100.10", "198.51.100.20-29"], "THROTTLED"),
            SenderGroup.of("CHECKED", ["198.51.100.30"], "CHECK"),
            SenderGroup.of("UNKNOWNLIST", ["198.51.100.30"], "ACCEPTED"),
            SenderGroup.of("ALL", ["ALL"], "ACCEPTED"),
        )
    )


BEHAVIOURS = {
    "TRUSTED": Behaviour.ACCEPT,
    "BLOCKED": Behaviour.REJECT,
    "THROTTLED": Behaviour.ACCEPT,
    "CHECK": Behaviour.CONTINUE,
    "ACCEPTED": Behaviour.ACCEPT,
}


@pytest.mark.parametrize(
    ("address", "name", "group", "member"),
    [
        ("198.51.100.10", None, "WHITELIST", "198.51.100.10"),  # first match wins over SUSPECTLIST
        ("198.51.100.99", "mx.trusted.example", "WHITELIST", ".trusted.example"),
        ("203.0.113.5", "mx.trusted.example", "WHITELIST", ".trusted.example"),  # order, not specificity
        ("203.0.113.5", None, "BLACKLIST", "203.0.113.0/24"),
        ("198.51.100.25", None, "SUSPECTLIST", "198.51.100.20-29"),
        ("198.51.100.30", None, "UNKNOWNLIST", "198.51.100.30"),  # CONTINUE keeps matching
        ("192.0.2.1", None, "ALL", "ALL"),
    ],
)
def test_first_match_wins(address: str, name: str | None, group: str, member: str) -> None:
    match = _table().resolve(Peer.of(address, name), BEHAVIOURS)
    assert match is not None
    assert (match.group, match.member) == (group, member)


def test_match_ignores_continue_but_resolve_does_not() -> None:
    peer = Peer.of("198.51.100.30")
    assert _table().match(peer).group == "CHECKED"  # type: ignore[union-attr]
    assert _table().resolve(peer, BEHAVIOURS).group == "UNKNOWNLIST"  # type: ignore[union-attr]


def test_no_group_matches() -> None:
    table = HostAccessTable((SenderGroup.of("ONLY", ["10.0.0.1"], "ACCEPTED"),))
    assert table.resolve(Peer.of("10.0.0.2"), {"ACCEPTED": Behaviour.ACCEPT}) is None


ipv4 = st.integers(min_value=0, max_value=2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))


@given(address=ipv4, prefix=st.integers(min_value=0, max_value=32))
def test_cidr_matches_exactly_its_network(address: str, prefix: int) -> None:
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    member = parse_member(str(network))
    for probe in (network.network_address, network.broadcast_address):
        assert member.matches(Peer.of(str(probe)))
    if int(network.broadcast_address) < 2**32 - 1:
        assert not member.matches(Peer.of(str(network.broadcast_address + 1)))


@given(peer=ipv4, members=st.lists(ipv4, min_size=1, max_size=5))
def test_resolve_is_the_first_group_containing_the_peer(peer: str, members: list[str]) -> None:
    groups = tuple(SenderGroup.of(f"G{i}", [m], "P") for i, m in enumerate(members))
    table = HostAccessTable((*groups, SenderGroup.of("ALL", ["ALL"], "P")))
    match = table.resolve(Peer.of(peer), {"P": Behaviour.ACCEPT})
    expected = next((f"G{i}" for i, m in enumerate(members) if m == peer), "ALL")
    assert match is not None and match.group == expected
