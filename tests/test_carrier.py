"""The carrier seam: every carrier provides ``ICarrier``, and the same client, listener and TLS factory work over
each (memory on virtual time; loopback and TCP on the real reactor); ``-j`` workers give the serial record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from labruntime import lab_runtime
from serving import free_port, fresh_loopback
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from lab.appliance.config import quick_appliance
from lab.errors import HarnessError
from lab.net.carrier import EXTERNAL_CARRIER, LAB_CARRIERS, CarrierTimeout, ICarrier, drive, open_carrier
from lab.net.loopback import LoopbackNetwork
from lab.net.memory import MemoryNetwork
from lab.net.middlebox import StartTLSStripper
from lab.net.tcp import TCPCarrier
from lab.policy.modes import TLSMode
from lab.scenario.loader import load_cases
from lab.scenario.runner import RunOptions, run_cases
from lab.smtp.behaviours import behaviour_steps
from lab.smtp.client import ClientRecord, ScriptedClient
from lab.smtp.steps import TLSOptions
from lab.tls.certs import LabCA
from lab.tls.tlsctx import ClientCerts, ClientTLSFactory, lab_client_tls

CLIENT, SERVER = "198.51.100.7", "192.0.2.25"


@pytest.mark.parametrize(
    "make",
    [
        lambda: MemoryNetwork(),
        lambda: LoopbackNetwork({CLIENT: "127.0.9.1"}, reactor=MemoryReactorClock()),
        lambda: TCPCarrier(reactor=MemoryReactorClock()),
    ],
    ids=["memory", "loopback", "tcp"],
)
def test_every_carrier_provides_the_interface(make: Any) -> None:
    carrier = make()
    assert verifyObject(ICarrier, carrier)
    assert carrier.name in (*LAB_CARRIERS, EXTERNAL_CARRIER)
    assert carrier.clock.seconds() >= 0


def test_the_carrier_is_chosen_by_name_in_one_place() -> None:
    assert open_carrier("memory").name == "memory"
    assert open_carrier("loopback", mapping={CLIENT: "127.0.9.1"}, reactor=MemoryReactorClock()).name == "loopback"
    assert open_carrier("tcp", reactor=MemoryReactorClock()).name == "tcp"
    with pytest.raises(HarnessError, match="no carrier 'pigeon'"):
        open_carrier("pigeon")


class StubReactor:
    """Just the main-loop step ``drive`` uses: no timed call pending, I/O waits are recorded, never slept."""

    running = False

    def __init__(self) -> None:
        self.waits: list[float] = []

    def runUntilCurrent(self) -> None:
        pass

    def timeout(self) -> float | None:
        return None

    def doIteration(self, delay: float) -> None:
        self.waits.append(delay)


def test_drive_refuses_a_running_reactor_and_times_out() -> None:
    running = StubReactor()
    running.running = True
    with pytest.raises(HarnessError, match="running"):
        drive(running, defer.Deferred(), 1)
    idle = StubReactor()
    with pytest.raises(CarrierTimeout):
        drive(idle, defer.Deferred(), 0.05)
    assert idle.waits and max(idle.waits) <= 0.05  # waits for I/O until the deadline, never past it
    assert drive(idle, defer.succeed("done"), 1) == "done"


# -- the same client, listener and TLS factory over each carrier


def serve_lab(net: Any, host: str, tmp_path: Path, port: int = 25) -> LabCA:
    appliance = quick_appliance(host, port, TLSMode.REQUIRED)
    runtime = lab_runtime(appliance, net.clock, tmp_path)
    net.listen(host, port, runtime.factory(appliance.listeners[0]))
    return LabCA(tmp_path / "state")


def client_for(net: Any, src: str | None, dst: str, tls: Any, port: int = 25, **connect: Any) -> ScriptedClient:
    steps = behaviour_steps("require", ehlo="mx.example.net", mail_from="a@example.net", rcpt_to="b@example.com")
    return ScriptedClient(
        steps,
        clock=net.clock,
        connect=lambda f: net.connect(src, dst, port, f, **connect),
        tls_factory=tls,
        reply_timeout=10,
        target=f"{dst}:{port}",
    )


def assert_delivered_in_tls(record: ClientRecord) -> None:
    assert record.observed["tls"] is True and record.observed["delivered_tls"] is True, record.transcript
    assert "server_cert_verified" in record.observed  # the factory's creator checked the certificate
    assert not record.observed["delivered_plaintext"]


def test_connect_and_tls_over_the_memory_carrier(tmp_path: Path) -> None:
    net = open_carrier("memory")
    ca = serve_lab(net, SERVER, tmp_path)
    tls = lab_client_tls(server_name="esa.lab.example", trust_pems=(ca.ca_pem,), state_dir=tmp_path / "state")
    record = net.run_until(client_for(net, CLIENT, SERVER, tls).run(), timeout=600)
    net.drain()
    assert_delivered_in_tls(record)
    assert net.capture.flows and net.capture.flows[0].client.ip == CLIENT  # recorded on the client's side


@pytest_twisted.ensureDeferred
async def test_connect_and_tls_over_the_loopback_carrier(tmp_path: Path) -> None:
    net = open_carrier("loopback", mapping={CLIENT: fresh_loopback(), SERVER: fresh_loopback()}, reactor=reactor)
    ca = serve_lab(net, SERVER, tmp_path)
    tls = lab_client_tls(server_name="esa.lab.example", trust_pems=(ca.ca_pem,), state_dir=tmp_path / "state")
    try:
        record = await net.wait(client_for(net, CLIENT, SERVER, tls).run(), 30)
    finally:
        await net.close()
    assert_delivered_in_tls(record)
    assert record.connections[0].server == (SERVER, 25)  # the protocols see virtual addresses


@pytest_twisted.ensureDeferred
async def test_connect_and_tls_over_the_tcp_carrier_with_a_relay_for_the_middlebox(tmp_path: Path) -> None:
    server = fresh_loopback()
    port = free_port(server)
    net = open_carrier("tcp", reactor=reactor)
    ca = serve_lab(net, server, tmp_path, port)
    certs = ClientCerts(tmp_path / "state", "client.example", issue_lab=False)
    tls = ClientTLSFactory(server_name="esa.lab.example", trust_pems=(ca.ca_pem,), certs=certs)
    try:
        record = await net.wait(client_for(net, None, server, tls, port).run(), 30)
        assert_delivered_in_tls(record)
        boxes = [StartTLSStripper()]
        stripped = await net.wait(client_for(net, None, server, tls, port, middleboxes=boxes).run(), 30)
    finally:
        await net.close()
    assert stripped.observed["starttls_advertised"] is False  # the relay on the path rewrote the capability
    assert stripped.observed["aborted"] is True and not stripped.observed["delivered"]  # require gives up
    assert stripped.connections[0].server == (server, port)  # still "connected to the target"


def test_one_client_tls_factory_caches_per_choice_and_watches_for_a_certificate_request(tmp_path: Path) -> None:
    cached = lab_client_tls(state_dir=tmp_path, cache=True)
    assert cached(TLSOptions()) is cached(TLSOptions())
    assert cached(TLSOptions()) is not cached(TLSOptions(max_version="1.2"))
    lab_cert = cached(TLSOptions(client_cert="lab")).client_cert
    assert lab_cert is not None and lab_cert.subject_cn == "client.example.net"
    given = ClientCerts(tmp_path, "c.example", issue_lab=False)
    assert given("lab") is None and given("none") is None and given("untrusted") is not None
    watched = ClientTLSFactory(watch=True)
    assert watched(TLSOptions()) is not watched(TLSOptions()) and watched.cert_requested is False


# -- -j: workers start clean and give the serial record


def test_two_workers_give_the_same_record_as_one(tmp_path: Path) -> None:
    cases = load_cases(["2920-3.1"])
    options = {"carrier": "memory", "state_dir": tmp_path / "state", "timestamps": False}
    serial = run_cases(cases, ["no", "preferred", "required"], RunOptions(**options, jobs=1))
    parallel = run_cases(cases, ["no", "preferred", "required"], RunOptions(**options, jobs=2))
    assert len(serial.runs) > 2
    assert [r.to_dict() for r in parallel.runs] == [r.to_dict() for r in serial.runs]
