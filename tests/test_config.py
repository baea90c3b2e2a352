"""The appliance configuration file: defaults, predefined groups, inheritance, errors, summaries, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lab.appliance.config import (
    appliance_from_dict,
    default_appliance,
    hat_summary,
    listener_summary,
    load_appliance,
    parse_size,
    quick_appliance,
)
from lab.appliance.model import Certificate
from lab.errors import BadInput
from lab.policy.hat import Peer
from lab.policy.modes import Behaviour, ListenerType, TLSMode
from lab.yamlsource import parse_yaml

REPO = Path(__file__).resolve().parent.parent

BASE = """\
hostname: esa.test.example
interfaces:
  - name: PublicNet
    address: 192.168.2.1
    prefix: 24
  - name: PrivateNet
    address: 192.168.1.1
certificates:
  - name: labcert
    kind: lab
listeners:
  - name: Inboundmail
    type: public
    interface: PublicNet
    port: 25
    rat: [example.com]
{hat}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_with(path: Path, needle: str, occurrence: int = 1) -> int:
    """The 1-based line of the ``occurrence``-th line containing ``needle``."""
    hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


def error_of(path: Path) -> str:
    with pytest.raises(BadInput) as caught:
        load_appliance(path)
    return str(caught.value)


def with_hat(tmp_path: Path, hat: str) -> Path:
    return write(tmp_path, BASE.format(hat=textwrap.indent(textwrap.dedent(hat), "    ")))


# --- the built-in default -------------------------------------------------------------------------------------


def test_default_appliance_listeners_and_interfaces() -> None:
    appliance = default_appliance()
    assert appliance.hostname == "esa.lab.example"
    assert {n: i.label() for n, i in appliance.interfaces.items()} == {
        "PublicNet": "PublicNet (192.168.2.1/24)",
        "PrivateNet": "PrivateNet (192.168.1.1/24)",
    }
    inbound, outbound = appliance.listeners
    assert (inbound.name, inbound.type, inbound.interface, inbound.port) == (
        "Inboundmail",
        ListenerType.PUBLIC,
        "PublicNet",
        25,
    )
    assert (outbound.name, outbound.type, outbound.interface) == ("Outboundmail", ListenerType.PRIVATE, "PrivateNet")
    assert appliance.certificates["esa-lab"] == Certificate("esa-lab", "lab", ("esa.lab.example",))
    assert inbound.certificate == "esa-lab"
    assert inbound.tls_summary() is TLSMode.NO and outbound.tls_summary() is TLSMode.NO
    assert inbound.accepts_recipient("<a@example.com>", Behaviour.ACCEPT)
    assert not inbound.accepts_recipient("<a@example.org>", Behaviour.ACCEPT)


@pytest.mark.parametrize(
    ("address", "name", "group", "behaviour"),
    [
        ("198.51.100.10", None, "WHITELIST", Behaviour.ACCEPT),
        ("198.51.100.40", "mx.bank.example", "WHITELIST", Behaviour.ACCEPT),
        ("198.51.100.40", None, "ALL", Behaviour.ACCEPT),  # no verified name: the .bank.example member misses
        ("203.0.113.66", None, "BLACKLIST", Behaviour.REJECT),
        ("203.0.113.20", None, "SUSPECTLIST", Behaviour.ACCEPT),
        ("198.51.100.20", None, "UNKNOWNLIST", Behaviour.ACCEPT),
        ("198.51.100.39", None, "UNKNOWNLIST", Behaviour.ACCEPT),
        ("198.51.100.50", "mx.secure.example", "ALL", Behaviour.ACCEPT),
    ],
)
def test_default_inbound_hat_places_internet_hosts(
    address: str, name: str | None, group: str, behaviour: Behaviour
) -> None:
    resolution = default_appliance().listener("Inboundmail").resolve(Peer.of(address, name))
    assert (resolution.match.group, resolution.policy.behaviour) == (group, behaviour)


def test_default_outbound_relays_only_the_private_net() -> None:
    outbound = default_appliance().listener("Outboundmail")
    assert outbound.resolve(Peer.of("192.168.1.25")).policy.behaviour is Behaviour.RELAY
    assert outbound.resolve(Peer.of("198.51.100.10")).match.group == "ALL"
    assert outbound.resolve(Peer.of("198.51.100.10")).policy.behaviour is Behaviour.REJECT


# --- predefined groups and inheritance ------------------------------------------------------------------------


def test_public_listener_without_hat_gets_the_predefined_groups(tmp_path: Path) -> None:
    listener = load_appliance(with_hat(tmp_path, "")).listener("Inboundmail")
    assert [(g.name, g.policy) for g in listener.hat.groups] == [
        ("WHITELIST", "TRUSTED"),
        ("BLACKLIST", "BLOCKED"),
        ("SUSPECTLIST", "THROTTLED"),
        ("UNKNOWNLIST", "ACCEPTED"),
        ("ALL", "ACCEPTED"),
    ]
    assert sorted(listener.policies) == ["ACCEPTED", "BLOCKED", "THROTTLED", "TRUSTED"]
    assert listener.resolve(Peer.of("198.51.100.7")).match.group == "ALL"
    assert listener.resolve(Peer.of("198.51.100.7")).params.tls is TLSMode.NO


def test_private_listener_without_hat_gets_relaylist_and_all_blocked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        hostname: esa.test.example
        interfaces: [{name: PrivateNet, address: 192.168.1.1}]
        listeners:
          - {name: Outboundmail, type: Private, interface: PrivateNet}
        """,
    )
    listener = load_appliance(path).listener("Outboundmail")
    assert [(g.name, g.policy, [m.text for m in g.members]) for g in listener.hat.groups] == [
        ("RELAYLIST", "RELAYED", []),
        ("ALL", "BLOCKED", ["ALL"]),
    ]
    assert listener.resolve(Peer.of("192.168.1.9")).policy.behaviour is Behaviour.REJECT


def test_user_groups_policies_and_defaults_are_inherited(tmp_path: Path) -> None:
    path = with_hat(
        tmp_path,
        """\
        hat:
          sender_groups:
            - name: PARTNERS
              members: [mx.partner.example]
              policy: STRICT
            - name: SUSPECTLIST
              members: [10.1.]
          policies:
            STRICT: {behaviour: ACCEPT, tls: Required, verify_client: yes}
            THROTTLED: {tls: may}
            ACCEPTED: {max_message_size: 5M}
          defaults:
            tls: Preferred
            max_rcpts_per_msg: 50
        """,
    )
    listener = load_appliance(path).listener("Inboundmail")
    assert [g.name for g in listener.hat.groups] == [
        "PARTNERS",
        "SUSPECTLIST",
        "WHITELIST",
        "BLACKLIST",
        "UNKNOWNLIST",
        "ALL",
    ]
    partner = listener.resolve(Peer.of("198.51.100.10", "mx.partner.example"))
    assert (partner.match.group, partner.params.tls, partner.params.verify_client) == (
        "PARTNERS",
        TLSMode.REQUIRED,
        True,
    )
    assert partner.params.max_rcpts_per_msg == 50  # from the listener defaults
    throttled = listener.resolve(Peer.of("10.1.2.3"))
    assert (throttled.match.group, throttled.params.tls) == ("SUSPECTLIST", TLSMode.PREFERRED)
    assert throttled.params.max_msgs_per_connection == 1  # the predefined THROTTLED value survives
    assert throttled.params.max_rcpts_per_msg == 25  # the policy's own value beats the listener default
    other = listener.resolve(Peer.of("198.51.100.99"))
    assert (other.match.group, other.params.tls, other.params.max_message_size) == (
        "ALL",
        TLSMode.PREFERRED,
        5 * 1024 * 1024,
    )
    assert listener.tls_summary() is TLSMode.PREFERRED


def test_all_group_can_be_remapped_and_stays_last(tmp_path: Path) -> None:
    path = with_hat(
        tmp_path,
        """\
        hat:
          sender_groups:
            - {name: WHITELIST, members: [192.0.2.0/24]}
            - {name: all, policy: BLOCKED}  # the catch-all by any case
        """,
    )
    listener = load_appliance(path).listener("Inboundmail")
    assert [g.name for g in listener.hat.groups] == ["WHITELIST", "BLACKLIST", "SUSPECTLIST", "UNKNOWNLIST", "ALL"]
    assert listener.resolve(Peer.of("198.51.100.1")).policy.behaviour is Behaviour.REJECT
    assert listener.resolve(Peer.of("192.0.2.1")).match.group == "WHITELIST"


@pytest.mark.parametrize(
    ("spelling", "mode"),
    [
        ("no", TLSMode.NO),
        ("No", TLSMode.NO),
        ("NONE", TLSMode.NO),
        ("'No'", TLSMode.NO),
        ("preferred", TLSMode.PREFERRED),
        ("PREFERRED", TLSMode.PREFERRED),
        ("may", TLSMode.PREFERRED),
        ("Required", TLSMode.REQUIRED),
        ("encrypt", TLSMode.REQUIRED),
    ],
)
def test_tls_spellings_are_lenient(tmp_path: Path, spelling: str, mode: TLSMode) -> None:
    path = with_hat(tmp_path, f"hat:\n  policies:\n    ACCEPTED: {{tls: {spelling}}}\n")
    assert load_appliance(path).listener("Inboundmail").tls_summary() is mode


def test_listener_tls_versions_and_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        hostname: esa.test.example
        interfaces: [{name: PublicNet, address: 192.168.2.1}]
        listeners:
          - name: Inboundmail
            type: public
            interface: PublicNet
            port: 2525
            max_concurrency: 20
            tcp_queue: 5
            idle_timeout: 30
            rat: ALL
            tls: {min_version: 1.0, max_version: TLSv1.2, ciphers: "HIGH:!aNULL"}
        """,
    )
    listener = load_appliance(path).listener("Inboundmail")
    assert (listener.tls.min_version, listener.tls.max_version, listener.tls.ciphers) == ("1.0", "1.2", "HIGH:!aNULL")
    assert (listener.port, listener.max_concurrency, listener.tcp_queue, listener.timeouts.idle) == (2525, 20, 5, 30.0)
    assert listener.rat == ("ALL",)
    assert listener.accepts_recipient("x@anything.example", Behaviour.ACCEPT)


def test_parse_size() -> None:
    assert [parse_size(v) for v in (1000, "1000", "512K", "10M", "1GB", "2 MiB")] == [
        1000,
        1000,
        512 * 1024,
        10 * 1024**2,
        1024**3,
        2 * 1024**2,
    ]
    with pytest.raises(ValueError):
        parse_size("ten megs")


def test_pem_certificate_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    from lab.tls.certs import LabCA

    issued = LabCA(tmp_path / "ca").issue("esa", ["esa.test.example"])
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "esa.pem").write_bytes(issued.cert_pem)
    (tmp_path / "certs" / "esa.key").write_bytes(issued.key_pem)
    path = write(
        tmp_path,
        """\
        hostname: esa.test.example
        interfaces: [{name: PublicNet, address: 192.168.2.1}]
        certificates:
          - {name: imported, kind: pem, cert_file: certs/esa.pem, key_file: certs/esa.key}
        listeners:
          - {name: Inboundmail, type: public, interface: PublicNet, rat: ALL, certificate: imported}
        """,
    )
    appliance = load_appliance(path)
    cert = appliance.certificates["imported"]
    assert Path(cert.cert_file or "").read_bytes() == issued.cert_pem
    assert Path(cert.key_file or "") == tmp_path / "certs" / "esa.key"
    assert listener_summary(appliance, appliance.listeners[0]).splitlines()[-1] == "Certificate: imported"


# --- errors: file:line: field: problem ------------------------------------------------------------------------


def test_bad_tls_value_names_file_line_and_field(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "hat:\n  policies:\n    ACCEPTED:\n      tls: sometimes\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'sometimes')}: listeners[0].hat.policies.ACCEPTED.tls: "
        "'sometimes' is not one of no, preferred, required"
    )


def test_group_naming_unknown_policy(tmp_path: Path) -> None:
    path = with_hat(
        tmp_path, "hat:\n  sender_groups:\n    - name: PARTNERS\n      members: [10.0.0.1]\n      policy: STRCT\n"
    )
    assert error_of(path) == (
        f"{path}:{line_with(path, 'STRCT')}: listeners[0].hat.sender_groups[0].policy: "
        "unknown policy 'STRCT' (known: ACCEPTED, BLOCKED, THROTTLED, TRUSTED)"
    )


def test_custom_group_needs_a_policy_and_custom_policy_a_behaviour(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "hat:\n  sender_groups:\n    - name: PARTNERS\n      members: [10.0.0.1]\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'PARTNERS')}: listeners[0].hat.sender_groups[0]: "
        "sender group 'PARTNERS' is not predefined, so it needs a policy"
    )
    path = with_hat(tmp_path, "hat:\n  policies:\n    STRICT:\n      tls: required\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'tls: required')}: listeners[0].hat.policies.STRICT: "
        "policy 'STRICT' is not predefined, so it needs a behaviour"
    )


def test_unknown_interface(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.format(hat="").replace("interface: PublicNet", "interface: PublicNett"))
    assert error_of(path) == (
        f"{path}:{line_with(path, 'PublicNett')}: listeners[0].interface: "
        "unknown interface 'PublicNett' (known: PublicNet, PrivateNet)"
    )


def test_unknown_certificate(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "certificate: nosuch\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'nosuch')}: listeners[0].certificate: "
        "unknown certificate 'nosuch' (known: demo, labcert)"
    )


def test_duplicate_listener_name(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "")
    path.write_text(path.read_text() + "  - {name: Inboundmail, type: private, interface: PrivateNet}\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'Inboundmail', 2)}: listeners[1].name: "
        "duplicate listener name 'Inboundmail' (also listeners[0])"
    )


def test_two_listeners_on_one_interface_and_port(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "")
    path.write_text(path.read_text() + "  - {name: Second, type: private, interface: PublicNet, port: 25}\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'Second')}: listeners[1].port: "
        "listener 'Inboundmail' already uses interface PublicNet port 25"
    )


@pytest.mark.parametrize(
    ("member", "why"),
    [
        ("10.1.1.10-300", "'10.1.1.10-300': range end must be 0-255"),
        ("10.0.0.0/33", "'10.0.0.0/33': not a valid CIDR network"),
        ("bad_host!", "'bad_host!': not an address, network, range, host name or domain"),
    ],
)
def test_bad_member_syntax(tmp_path: Path, member: str, why: str) -> None:
    path = with_hat(
        tmp_path,
        f"hat:\n  sender_groups:\n    - name: WHITELIST\n      members:\n        - 10.0.0.1\n        - '{member}'\n",
    )
    assert (
        error_of(path)
        == f"{path}:{line_with(path, member)}: listeners[0].hat.sender_groups[0].members[1]: bad member {why}"
    )


def test_member_that_yaml_read_as_a_number(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "hat:\n  sender_groups:\n    - name: WHITELIST\n      members: [10.]\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, '[10.]')}: listeners[0].hat.sender_groups[0].members[0]: "
        "YAML read 10.0 as a number; quote the member, e.g. '10.0'"
    )


def test_all_must_be_last(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "hat:\n  sender_groups:\n    - name: ALL\n    - name: WHITELIST\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'name: ALL')}: listeners[0].hat.sender_groups[0].name: "
        "the ALL group must be the last sender group"
    )


def test_rat_on_a_private_listener(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.format(hat="").replace("type: public", "type: private"))
    assert error_of(path) == (
        f"{path}:{line_with(path, 'rat:')}: listeners[0].rat: "
        "a private listener has no Recipient Access Table (rat is for public listeners)"
    )


def test_unknown_field_is_a_schema_error(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "max_concurency: 10\n")
    assert error_of(path) == (
        f"{path}:{line_with(path, 'name: Inboundmail')}: listeners[0]: "
        "unknown field(s) ('max_concurency' was unexpected)"
    )


def test_pem_file_missing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        hostname: esa.test.example
        interfaces: [{name: PublicNet, address: 192.168.2.1}]
        certificates:
          - name: imported
            kind: pem
            cert_file: nosuch.pem
            key_file: nosuch.key
        listeners:
          - {name: Inboundmail, type: public, interface: PublicNet, rat: ALL}
        """,
    )
    assert error_of(path) == (
        f"{path}:{line_with(path, 'nosuch.pem')}: certificates[0].cert_file: "
        f"{tmp_path / 'nosuch.pem'}: cannot read: No such file or directory"
    )


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "hostname: esa\ninterfaces:\n  - name: [PublicNet\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: YAML syntax error: ")
    assert "\n" not in message


def test_appliance_from_dict_names_the_given_file() -> None:
    doc = parse_yaml("hostname: esa\ninterfaces: [{name: A, address: 10.0.0.1}]\nlisteners: []\n", "inline.yaml")
    with pytest.raises(BadInput) as caught:
        appliance_from_dict(doc, "inline.yaml")
    assert str(caught.value) == "inline.yaml:3: listeners: [] should be non-empty"


# --- summaries ------------------------------------------------------------------------------------------------


def test_summary_of_a_required_public_listener_is_spec_1() -> None:
    appliance = quick_appliance("192.168.2.1", 25, TLSMode.REQUIRED)
    assert listener_summary(appliance, appliance.listener("Inboundmail")) == (
        "Name: Inboundmail\n"
        "Type: Public\n"
        "Interface: PublicNet (192.168.2.1/24) TCP Port 25\n"
        "Protocol: SMTP\n"
        "Default Domain:\n"
        "Max Concurrency: 1000 (TCP Queue: 50)\n"
        "Domain map: disabled\n"
        "TLS: Required\n"
        "Certificate: demo (INSECURE built-in demo certificate)"
    )


def test_quick_appliance_sets_tls_on_all_and_defaults() -> None:
    cert = Certificate("esa", "lab", ("esa.lab.example",))
    appliance = quick_appliance("127.0.0.1", 2525, TLSMode.PREFERRED, verify_client=True, certificate=cert)
    listener = appliance.listener("Inboundmail")
    assert (listener.interface, listener.port, listener.rat, listener.certificate) == (
        "PublicNet",
        2525,
        ("ALL",),
        "esa",
    )
    assert appliance.certificates == {"esa": cert}
    for peer in ("198.51.100.1", "::1"):
        params = listener.resolve(Peer.of(peer)).params
        assert (params.tls, params.verify_client) == (TLSMode.PREFERRED, True)
    assert listener.defaults.tls is TLSMode.PREFERRED
    assert listener_summary(appliance, listener).splitlines()[-1] == "Certificate: esa"


def test_hat_summary_lists_groups_in_order_with_policy_tls() -> None:
    listener = default_appliance().listener("Inboundmail")
    assert hat_summary(listener).splitlines() == [
        "Host Access Table of Inboundmail (first match wins):",
        "  Sender group  Policy     Behaviour  TLS  Members",
        "  WHITELIST     TRUSTED    ACCEPT     No   198.51.100.10, .bank.example",
        "  BLACKLIST     BLOCKED    REJECT     No   203.0.113.66",
        "  SUSPECTLIST   THROTTLED  ACCEPT     No   203.0.113.0/24",
        "  UNKNOWNLIST   ACCEPTED   ACCEPT     No   198.51.100.20-39",
        "  ALL           ACCEPTED   ACCEPT     No   ALL",
    ]


def test_schema_knows_every_policy_parameter() -> None:
    import dataclasses
    import json

    from lab.policy.params import PolicyParams

    schema = json.loads((REPO / "lab" / "schemas" / "appliance.schema.json").read_text())
    names = {f.name for f in dataclasses.fields(PolicyParams)}
    assert set(schema["$defs"]["params"]["properties"]) == names
    assert set(schema["$defs"]["policy"]["properties"]) == names | {"behaviour"}


# --- the command ----------------------------------------------------------------------------------------------


def smtplab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_listeners_prints_the_default_appliance() -> None:
    done = smtplab("listeners")
    assert done.returncode == 0, done.stderr
    assert "Interface: PublicNet (192.168.2.1/24) TCP Port 25" in done.stdout
    assert "  BLACKLIST     BLOCKED    REJECT     No   203.0.113.66" in done.stdout
    assert "Name: Outboundmail" in done.stdout


def test_cli_listeners_bad_config_exits_3_with_one_line(tmp_path: Path) -> None:
    path = with_hat(tmp_path, "hat:\n  policies:\n    ACCEPTED: {tls: sometimes}\n")
    done = smtplab("listeners", "--config", str(path))
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr == (
        f"smtplab: {path}:{line_with(path, 'sometimes')}: listeners[0].hat.policies.ACCEPTED.tls: "
        "'sometimes' is not one of no, preferred, required\n"
    )


def test_the_documented_example_loads(tmp_path: Path) -> None:
    from lab.tls.certs import LabCA

    doc = (REPO / "docs" / "config-format.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    issued = LabCA(tmp_path / "ca").issue("esa", ["esa.lab.example"])
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "esa.pem").write_bytes(issued.cert_pem)
    (tmp_path / "certs" / "esa.key").write_bytes(issued.key_pem)
    appliance = load_appliance(write(tmp_path, example))
    inbound = appliance.listener("Inboundmail")
    assert [g.name for g in inbound.hat.groups] == [
        "WHITELIST",
        "PARTNERS",
        "BLACKLIST",
        "SUSPECTLIST",
        "UNKNOWNLIST",
        "ALL",
    ]
    bank = inbound.resolve(Peer.of("198.51.100.40", "mx.bank.example"))
    assert (bank.policy.name, bank.params.tls, bank.params.max_message_size) == ("STRICT", TLSMode.REQUIRED, 20 << 20)
    assert inbound.resolve(Peer.of("192.0.2.1")).params.tls is TLSMode.PREFERRED
    assert appliance.listener("Outboundmail").resolve(Peer.of("192.168.1.5")).policy.behaviour is Behaviour.RELAY


def test_anchors_and_merge_keys_within_the_limits_still_work(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        hostname: esa.test.example
        interfaces: [{name: PublicNet, address: 192.168.2.1}]
        listeners:
          - name: Inboundmail
            type: public
            interface: PublicNet
            rat: [example.com]
            hat:
              policies:
                STRICT: &strict {behaviour: accept, tls: required, banner_text: strict}
                STRICTER: {<<: *strict, max_rcpts_per_msg: 5}
              sender_groups:
                - {name: A, members: &partners [10.0.0.1, 10.0.0.2], policy: STRICT}
                - {name: B, members: *partners, policy: STRICTER}
        """,
    )
    listener = load_appliance(path).listeners[0]
    assert listener.policies["STRICTER"].params.max_rcpts_per_msg == 5
    assert listener.policies["STRICTER"].params.banner_text == "strict"


@pytest.mark.parametrize(
    ("tls", "field", "problem"),
    [
        ("{ciphers: 'NOT-A-CIPHER'}", "ciphers", "no usable cipher in 'NOT-A-CIPHER'"),
        ("{min_version: 1.3, max_version: 1.2}", "min_version", "min_version 1.3 is above max_version 1.2"),
    ],
)
def test_tls_settings_are_built_with_openssl_at_load(tmp_path: Path, tls: str, field: str, problem: str) -> None:
    path = write(tmp_path, BASE.format(hat=f"    tls: {tls}"))
    message = error_of(path)
    assert message.startswith(f"{path}:{line_with(path, 'tls:')}: listeners[0].tls.{field}: {problem}"), message


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("hostname: esa.test.example", 'hostname: "esa.test.example\\r\\n250 x"', "hostname"),
        ("hostname: esa.test.example", "hostname: esa_1.example", "hostname"),
        ("    port: 25", "    port: 25\n    tcp_queue: 4294967296", "listeners[0].tcp_queue"),
        ("    port: 25", "    port: 25\n    default_domain: 'a b'", "listeners[0].default_domain"),
        ("    kind: lab", "    kind: lab\n    hostnames: ['bad\\nname']", "certificates[0].hostnames[0]"),
    ],
)
def test_values_that_would_break_serve_are_refused_at_load(tmp_path: Path, old: str, new: str, field: str) -> None:
    path = write(tmp_path, BASE.format(hat="").replace(old, new))
    message = error_of(path)
    assert f": {field}: " in message and "\n" not in message, message
