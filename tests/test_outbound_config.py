"""The outbound part of the appliance file and the virtual DNS: loaded, defaulted, and refused with FILE:LINE."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lab.appliance.config import default_appliance, load_appliance
from lab.cli import main
from lab.errors import BadInput
from lab.net.topology import default_topology, load_topology
from lab.policy.destinations import DestinationTLS

BASE = """\
hostname: esa.test.example
interfaces:
  - {name: PublicNet, address: 192.168.2.1}
certificates:
  - {name: out, kind: lab, hostnames: [esa.test.example]}
listeners:
  - {name: Inboundmail, type: public, interface: PublicNet, rat: [example.com]}
outbound:
"""


def write(tmp_path: Path, outbound: str) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent(outbound), "  "), encoding="utf-8")
    return path


def line_with(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_the_default_appliance_has_destination_controls_and_an_alert_recipient() -> None:
    outbound = default_appliance().outbound
    lookup = outbound.destinations.lookup
    assert lookup("bank.example").tls is DestinationTLS.REQUIRED
    assert lookup("secure.example").tls is DestinationTLS.REQUIRED_VERIFY
    assert lookup("mx.partner.example").tls is DestinationTLS.PREFERRED_VERIFY
    assert lookup("anything.example").tls is DestinationTLS.PREFERRED
    assert outbound.alert_recipients_for("system", "warning") == ("postmaster@example.com",)
    assert outbound.alert_recipients_for("system", "information") == ()


def test_an_entry_inherits_what_it_leaves_out_from_the_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        certificate: out
        default_destination: {tls: No, max_concurrency: 10, max_messages_per_connection: 5}
        destination_controls:
          - {domain: .Example.ORG, tls: Required (Verify), bounce_profile: fast}
        bounce_profiles:
          - {name: fast, initial_wait: 10, max_wait: 20, max_retries: 2}
        alerts:
          recipients: [{address: ops@example.com}]
        """,
    )
    outbound = load_appliance(path).outbound
    assert outbound.destinations.default.tls is DestinationTLS.NO  # YAML 1.1 read No as false
    entry = outbound.destinations.lookup("mx.example.org")
    assert (entry.tls, entry.max_concurrency, entry.max_messages_per_connection) == (
        DestinationTLS.REQUIRED_VERIFY,
        10,
        5,
    )
    assert outbound.bounce_profile("fast").schedule() == [0, 10, 30]
    assert outbound.alert_recipients_for("antivirus", "critical") == ("ops@example.com",)  # all by default


@pytest.mark.parametrize(
    ("outbound", "needle", "message"),
    [
        (
            "default_destination: {tls: sometimes}\n",
            "sometimes",
            "outbound.default_destination.tls: 'sometimes' is not",
        ),
        ("destination_controls:\n  - {domain: a.test, max_concurrency: 1001}\n", "1001", "max_concurrency"),
        ("destination_controls:\n  - {domain: 'a b', tls: no}\n", "a b", "is not a domain or .domain"),
        (
            "destination_controls:\n  - {domain: a.test}\n  - {domain: A.test.}\n",
            "A.test.",
            "duplicate destination a.test",
        ),
        ("destination_controls:\n  - {domain: a.test, bounce_profile: slow}\n", "slow", "unknown bounce profile"),
        ("bounce_profiles:\n  - {name: x, initial_wait: 100, max_wait: 10}\n", "max_wait", "shorter than"),
        ("interface: Nowhere\n", "Nowhere", "unknown interface"),
        ("certificate: nope\n", "nope", "unknown certificate"),
        ("alerts:\n  recipients: [{address: ops@example.com, severities: [loud]}]\n", "loud", "'loud' is not one of"),
        ("alerts:\n  recipients: [{address: not-an-address}]\n", "not-an-address", "address"),
    ],
)
def test_bad_outbound_settings_name_file_line_and_field(
    tmp_path: Path, outbound: str, needle: str, message: str
) -> None:
    path = write(tmp_path, outbound)
    with pytest.raises(BadInput) as caught:
        load_appliance(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:{line_with(path, needle)}: outbound.")
    assert message in text


def test_the_cli_exits_3_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "default_destination: {tls: sometimes}\n")
    assert main(["listeners", "--config", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:{line_with(path, 'sometimes')}:" in err


# -- the virtual DNS ---------------------------------------------------------------------------------------------

TOPOLOGY = """\
networks: [{name: n, subnet: 198.51.100.0/24}]
hosts:
  - {name: esa, role: appliance, addresses: [198.51.100.1], appliance: appliance.yaml}
  - {name: a, role: mta, addresses: [198.51.100.10], dns_names: [a.mx.test]}
  - {name: b, role: mta, addresses: [198.51.100.11], dns_names: [b.mx.test]}
dns:
  - {type: MX, domain: dest.test, preference: 20, exchange: b.mx.test}
  - {type: MX, domain: dest.test, preference: 10, exchange: a.mx.test}
  - {type: MX, domain: dest.test, preference: 20, exchange: a.mx.test}
  - {type: TXT, name: _mta-sts.dest.test, text: "v=STSv1; id=1"}
  - {type: TXT, name: _smtp._tls.dest.test, text: "v=TLSRPTv1; rua=mailto:r@dest.test"}
"""


def topology(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "appliance.yaml").write_text(
        "hostname: esa.test\ninterfaces: [{name: PublicNet, address: 198.51.100.1}]\n"
        "listeners: [{name: In, type: public, interface: PublicNet}]\n"
    )
    path = tmp_path / "topology.yaml"
    path.write_text(TOPOLOGY + extra)
    return path


def test_mx_answers_in_preference_order_with_addresses(tmp_path: Path) -> None:
    topo = load_topology(topology(tmp_path))
    assert [(h.exchange, h.preference, h.addresses) for h in topo.mx("DEST.test.")] == [
        ("a.mx.test", 10, ("198.51.100.10",)),
        ("b.mx.test", 20, ("198.51.100.11",)),  # equal preferences keep file order
        ("a.mx.test", 20, ("198.51.100.10",)),
    ]
    assert [h.exchange for h in topo.mx("a.mx.test")] == ["a.mx.test"]  # no MX: the implicit MX (RFC 5321 5.1)
    assert topo.mx("nowhere.test") == ()


def test_txt_records(tmp_path: Path) -> None:
    topo = load_topology(topology(tmp_path))
    assert topo.txt("_mta-sts.dest.test") == ("v=STSv1; id=1",)
    assert topo.txt("_smtp._tls.DEST.test") == ("v=TLSRPTv1; rua=mailto:r@dest.test",)
    assert topo.txt("dest.test") == ()
    assert default_topology().txt("_mta-sts.secure.example") == ("v=STSv1; id=20261201",)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("{type: TXT, name: _mta-sts.dest.test}", "a TXT record needs text"),
        ("{type: TXT, name: '_x._y', text: a}", "dns[5].name"),
        ("{type: TXT, name: a.test, text: a, preference: 1}", "not a field of a TXT record"),
        ('{type: TXT, name: a.test, text: "caf\\xe9"}', "dns[5].text"),
    ],
)
def test_bad_txt_records(tmp_path: Path, record: str, message: str) -> None:
    path = topology(tmp_path, f"  - {record}\n")
    with pytest.raises(BadInput) as caught:
        load_topology(path)
    assert f"{path}:{len(path.read_text().splitlines())}:" in str(caught.value) and message in str(caught.value)
