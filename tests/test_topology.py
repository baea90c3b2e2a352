"""The topology file: the built-in lab network, DNS and reverse DNS, paths and middleboxes, loopback map, errors."""

from __future__ import annotations

import ipaddress
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from lab.errors import BadInput
from lab.net.topology import Middlebox, StripOptions, default_topology, load_topology

REPO = Path(__file__).resolve().parent.parent

SMALL = """\
networks:
  - {name: outside, subnet: 198.51.100.0/24}
  - {name: inside, subnet: 192.168.2.0/24}
hosts:
  - name: esa
    role: appliance
    addresses: [192.168.2.1]
    appliance: appliance.yaml
  - name: sender
    role: mta
    addresses: [198.51.100.7]
    dns_names: [mx.sender.example]
  - name: fw
    role: firewall
    addresses: [198.51.100.1, 192.168.2.254]
dns:
  - {type: MX, domain: example.com, preference: 20, exchange: backup.example.com}
  - {type: MX, domain: example.com, preference: 10, exchange: esa.example.com}
  - {type: A, name: esa.example.com, address: 192.168.2.1}
  - {type: A, name: backup.example.com, address: 198.51.100.1}
links:
  - {between: [sender, fw]}
  - {between: [fw, esa]}
middleboxes:
  - {name: strip, kind: starttls-strip, between: [fw, esa], options: {rewrite: false, answer_starttls: 454}}
"""

APPLIANCE = """\
hostname: esa.example.com
interfaces: [{name: PublicNet, address: 192.168.2.1}]
listeners: [{name: Inboundmail, type: public, interface: PublicNet, rat: [example.com]}]
"""


def write(tmp_path: Path, text: str, appliance: str = APPLIANCE) -> Path:
    (tmp_path / "appliance.yaml").write_text(appliance, encoding="utf-8")
    path = tmp_path / "topology.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_with(path: Path, needle: str, occurrence: int = 1) -> int:
    hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


def error_of(path: Path) -> str:
    with pytest.raises(BadInput) as caught:
        load_topology(path)
    return str(caught.value)


def edited(tmp_path: Path, old: str, new: str, appliance: str = APPLIANCE) -> Path:
    assert old in SMALL
    return write(tmp_path, SMALL.replace(old, new, 1), appliance)


# --- the built-in lab network ---------------------------------------------------------------------------------

BEHAVIOURS = {
    "skip": ("198.51.100.20", "UNKNOWNLIST"),
    "prefer": ("198.51.100.10", "WHITELIST"),
    "prefer-strict": ("198.51.100.30", "UNKNOWNLIST"),
    "require": ("198.51.100.40", "WHITELIST"),
    "require-verify": ("198.51.100.50", "ALL"),
    "misbehaving": ("203.0.113.20", "SUSPECTLIST"),
    "attacker": ("203.0.113.66", "BLACKLIST"),
}


def test_default_topology_has_one_mta_per_behaviour_in_the_appliance_groups() -> None:
    topology = default_topology()
    inbound = topology.appliance().listener("Inboundmail")
    seen = {}
    for host in topology.hosts:
        if host.behaviour is not None:
            seen[host.behaviour] = (host.address, inbound.resolve(topology.peer(host.address)).match.group)
    assert seen == BEHAVIOURS
    groups = {group for _, group in BEHAVIOURS.values()}
    assert groups == {"WHITELIST", "BLACKLIST", "SUSPECTLIST", "UNKNOWNLIST", "ALL"}


def test_default_appliance_host_runs_the_builtin_config_on_its_addresses() -> None:
    topology = default_topology()
    esa = topology.appliance_host()
    assert (esa.name, esa.addresses, esa.appliance_config) == ("esa", ("192.168.2.1", "192.168.1.1"), "builtin")
    appliance = topology.appliance()
    assert {i.address for i in appliance.interfaces.values()} == set(esa.addresses)
    assert topology.host_by_address("192.168.2.1") is esa
    assert topology.host_by_address("192.0.2.1") is None


def test_default_reverse_dns_verifies_except_for_the_sloppy_relay() -> None:
    topology = default_topology()
    assert topology.reverse_name("198.51.100.40") == ("mx.bank.example", True)
    assert topology.reverse_name("203.0.113.20") == ("relay.sloppy.example", False)
    assert topology.reverse_name("203.0.113.21") == (None, False)
    assert topology.peer("203.0.113.20").verified_name is None
    assert topology.peer("198.51.100.40").verified_name == "mx.bank.example"
    unverified = [h.name for h in topology.hosts if not topology.reverse_name(h.address)[1]]
    assert unverified == ["mta-misbehaving"]


def test_default_internal_server_is_relayed_by_outboundmail() -> None:
    topology = default_topology()
    internal = topology.host("mail-internal")
    outbound = topology.appliance().listener("Outboundmail")
    assert internal.role == "internal"
    assert outbound.resolve(topology.peer(internal.address)).match.group == "RELAYLIST"


def test_default_middlebox_slot_is_off_until_enabled() -> None:
    topology = default_topology()
    assert topology.host("firewall").role == "firewall"
    assert topology.middleboxes_between("mta-prefer", "esa") == ()
    slot = topology.middlebox("strip")
    assert (slot.kind, slot.between, slot.options) == ("starttls-strip", ("firewall", "esa"), StripOptions(True, None))
    stripped = topology.with_middlebox(replace(slot, enabled=True, options=StripOptions(False, 454)))
    assert [m.options.answer_starttls for m in stripped.middleboxes_between("attacker", "esa")] == [454]
    assert [m.name for m in stripped.middleboxes_between("esa", "mta-skip")] == ["strip"]
    assert stripped.middleboxes_between("esa", "mail-internal") == ()
    assert topology.middleboxes_between("mta-prefer", "esa") == ()  # the original is unchanged


def test_default_loopback_map_is_distinct_deterministic_and_never_127_0_0_1() -> None:
    first, second = default_topology().loopback_map(), default_topology().loopback_map()
    assert first == second
    assert first["198.51.100.10"] == "127.10.0.10"
    assert first["203.0.113.66"] == "127.11.0.66"
    assert first["192.168.2.1"] == "127.12.0.1"
    assert len(set(first.values())) == len(first)
    assert "127.0.0.1" not in first.values()
    assert all(ipaddress.ip_address(v) in ipaddress.ip_network("127.0.0.0/8") for v in first.values())
    everyone = {a for h in default_topology().hosts for a in h.addresses}
    assert set(first) == everyone


# --- a small topology of our own ------------------------------------------------------------------------------


def test_small_topology_paths_and_custom_appliance(tmp_path: Path) -> None:
    topology = load_topology(write(tmp_path, SMALL))
    assert topology.appliance_host().appliance_config == str(tmp_path / "appliance.yaml")
    assert topology.appliance().hostname == "esa.example.com"
    assert topology.path("sender", "esa") == ["sender", "fw", "esa"]
    boxes = topology.middleboxes_between("sender", "esa")
    assert [(m.name, m.options) for m in boxes] == [("strip", StripOptions(False, 454))]
    assert topology.reverse_name("198.51.100.7") == ("mx.sender.example", True)
    assert topology.reverse_name("192.168.2.1") == (None, False)  # an A record alone makes no PTR
    with pytest.raises(KeyError):
        topology.middleboxes_between("sender", "nosuch")


def test_unconnected_hosts_have_no_path_and_no_middlebox(tmp_path: Path) -> None:
    topology = load_topology(edited(tmp_path, "  - {between: [sender, fw]}\n", ""))
    assert topology.path("sender", "esa") is None
    assert topology.middleboxes_between("sender", "esa") == ()


def test_with_middlebox_needs_a_link(tmp_path: Path) -> None:
    topology = load_topology(write(tmp_path, SMALL))
    with pytest.raises(BadInput) as caught:
        topology.with_middlebox(Middlebox("x", "starttls-strip", ("sender", "esa")))
    assert str(caught.value) == f"{tmp_path / 'topology.yaml'}: no link between 'sender' and 'esa' for middlebox 'x'"


def test_loopback_map_for_large_and_ipv6_networks(tmp_path: Path) -> None:
    text = """\
    networks:
      - {name: big, subnet: 10.0.0.0/8}
      - {name: v6, subnet: "2001:db8::/64"}
    hosts:
      - {name: a, role: mta, addresses: [10.200.0.9, "2001:db8::25"]}
      - {name: b, role: client, addresses: [10.0.0.5, "2001:db8::1"]}
    """
    mapping = load_topology(write(tmp_path, text)).loopback_map()
    assert mapping == {
        "10.0.0.5": "127.10.0.1",  # offsets beyond 16 bits: ranks in address order
        "10.200.0.9": "127.10.0.2",
        "2001:db8::1": "127.11.0.1",
        "2001:db8::25": "127.11.0.37",
    }


def test_topology_without_appliance(tmp_path: Path) -> None:
    path = write(
        tmp_path, "networks: [{name: n, subnet: 10.0.0.0/24}]\nhosts: [{name: a, role: mta, addresses: [10.0.0.2]}]\n"
    )
    topology = load_topology(path)
    with pytest.raises(BadInput) as caught:
        topology.appliance_host()
    assert str(caught.value) == f"{path}: the topology has no host with role appliance"


# --- errors: file:line: field: problem ------------------------------------------------------------------------


def test_unknown_host_in_a_link(tmp_path: Path) -> None:
    path = edited(tmp_path, "{between: [sender, fw]}", "{between: [sendr, fw]}")
    assert error_of(path) == f"{path}:{line_with(path, 'sendr')}: links[0].between[0]: unknown host 'sendr'"


def test_address_outside_every_network(tmp_path: Path) -> None:
    path = edited(tmp_path, "addresses: [198.51.100.7]", "addresses: [198.51.101.7]")
    assert error_of(path) == (
        f"{path}:{line_with(path, '198.51.101.7')}: hosts[1].addresses[0]: "
        "address 198.51.101.7 is outside every network"
    )


def test_duplicate_address(tmp_path: Path) -> None:
    path = edited(tmp_path, "addresses: [198.51.100.1, 192.168.2.254]", "addresses: [198.51.100.7]")
    assert error_of(path) == (
        f"{path}:{line_with(path, '198.51.100.7', 2)}: hosts[2].addresses[0]: "
        "address 198.51.100.7 is already used by host sender"
    )


def test_network_address_is_not_a_host_address(tmp_path: Path) -> None:
    path = edited(tmp_path, "addresses: [198.51.100.7]", "addresses: [198.51.100.0]")
    assert error_of(path) == (
        f"{path}:{line_with(path, '198.51.100.0]')}: hosts[1].addresses[0]: "
        "address 198.51.100.0 is the network address of outside"
    )


def test_overlapping_networks(tmp_path: Path) -> None:
    path = edited(tmp_path, "subnet: 192.168.2.0/24", "subnet: 198.51.100.128/25")
    assert error_of(path) == (
        f"{path}:{line_with(path, '/25')}: networks[1].subnet: "
        "198.51.100.128/25 overlaps network outside (198.51.100.0/24)"
    )


def test_subnet_with_host_bits(tmp_path: Path) -> None:
    path = edited(tmp_path, "subnet: 192.168.2.0/24", "subnet: 192.168.2.1/24")
    assert error_of(path) == (
        f"{path}:{line_with(path, '192.168.2.1/24')}: networks[1].subnet: "
        "'192.168.2.1/24' is not a network (192.168.2.1/24 has host bits set)"
    )


def test_middlebox_off_any_link(tmp_path: Path) -> None:
    path = edited(tmp_path, "between: [fw, esa], options", "between: [sender, esa], options")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'name: strip')}: middleboxes[0].between: no link between sender and esa"
    )


def test_bad_middlebox_option(tmp_path: Path) -> None:
    path = edited(tmp_path, "answer_starttls: 454", "answer_starttls: 250")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'name: strip')}: middleboxes[0].options.answer_starttls: "
        "250 is less than the minimum of 400"
    )


def test_mx_exchange_without_a_host(tmp_path: Path) -> None:
    path = edited(tmp_path, "exchange: backup.example.com", "exchange: gone.example.com")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'gone.example.com')}: dns[0].exchange: "
        "MX exchange gone.example.com has no A record pointing at a host"
    )


def test_record_fields_by_type(tmp_path: Path) -> None:
    path = edited(
        tmp_path, "{type: A, name: esa.example.com, address: 192.168.2.1}", "{type: a, name: esa.example.com}"
    )
    assert error_of(path) == f"{path}:{line_with(path, 'type: a,')}: dns[2]: a A record needs address"
    path = edited(
        tmp_path,
        "{type: A, name: esa.example.com, address: 192.168.2.1}",
        "{type: A, name: x.example, address: '2001:db8::1'}",
    )
    assert error_of(path) == f"{path}:{line_with(path, 'x.example')}: dns[2].address: an A record holds an IPv4 address"
    path = edited(
        tmp_path,
        "{type: A, name: esa.example.com, address: 192.168.2.1}",
        "{type: PTR, address: 192.168.2.1, domain: x.example}",
    )
    assert error_of(path) == (
        f"{path}:{line_with(path, 'type: PTR')}: dns[2].domain: not a field of a PTR record (it takes address, name)"
    )


def test_duplicate_host_name(tmp_path: Path) -> None:
    path = edited(tmp_path, "  - name: fw\n", "  - name: sender\n")
    assert error_of(path) == f"{path}:{line_with(path, 'name: sender', 2)}: hosts[2].name: duplicate host name 'sender'"


def test_bad_role_is_a_schema_error(tmp_path: Path) -> None:
    path = edited(tmp_path, "role: firewall", "role: Router")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'Router')}: hosts[2].role: "
        "'router' is not one of appliance, mta, client, internal, firewall"
    )


def test_appliance_interface_must_be_an_address_of_the_host(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL, APPLIANCE.replace("192.168.2.1", "192.168.2.9"))
    assert error_of(path) == (
        f"{path}:{line_with(path, '[192.168.2.1]')}: hosts[0].addresses: "
        "the appliance's interface PublicNet (192.168.2.9) is not an address of this host"
    )


def test_error_inside_the_appliance_file_names_that_file(tmp_path: Path) -> None:
    path = write(tmp_path, SMALL, APPLIANCE.replace("type: public", "type: publik"))
    assert error_of(path) == (
        f"{tmp_path / 'appliance.yaml'}:3: listeners[0].type: 'publik' is not one of public, private"
    )


def test_missing_appliance_file(tmp_path: Path) -> None:
    path = edited(tmp_path, "appliance: appliance.yaml", "appliance: nosuch.yaml")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'nosuch.yaml')}: hosts[0].appliance: "
        f"no appliance configuration at {tmp_path / 'nosuch.yaml'}"
    )


def test_appliance_field_on_another_role(tmp_path: Path) -> None:
    path = edited(tmp_path, "    dns_names: [mx.sender.example]\n", "    appliance: builtin\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'appliance: builtin')}: hosts[1].appliance: "
        "only a host with role appliance runs an appliance (this one is mta)"
    )


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "networks:\n  - {name: n, subnet: 10.0.0.0/24\nhosts: []\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: YAML syntax error: ")
    assert "\n" not in message


def test_the_documented_example_loads(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "topology-format.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    topology = load_topology(write(tmp_path, example))
    assert topology.reverse_name("203.0.113.9") == ("relay.odd.example", False)
    assert [m.name for m in topology.middleboxes_between("sender", "esa")] == ["strip"]
