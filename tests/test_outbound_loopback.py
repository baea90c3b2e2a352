"""One delivery over the loopback carrier: real TCP on 127.x.y.z, the same engine, queue and TLS rule."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from outboundlab import OutboundLab

from lab.net.loopback import LoopbackNetwork


def mapping() -> dict[str, str]:
    base = f"127.63.{os.getpid() % 200 + 20}"
    return {"192.168.2.1": f"{base}.1", "198.51.100.11": f"{base}.11", "198.51.100.12": f"{base}.12"}


@pytest_twisted.inlineCallbacks
def test_required_verify_delivery_over_real_tcp(tmp_path: Path) -> Any:
    net = LoopbackNetwork(mapping())
    lab = OutboundLab(tmp_path, tls="required-verify", mx1="ok", net=net)
    try:
        lab.send()
        yield net.wait(lab.engine.settled(), 60)
    finally:
        lab.engine.stop()
        yield net.close()
    [message] = lab.mtas["mx1"].messages
    assert message.tls is True and message.rcpt_to == ["bob@dest.test"]
    [attempt] = lab.engine.attempts
    assert attempt.certificate_verified is True and attempt.receiving_ip == "198.51.100.11"
    assert lab.clear_bytes() == b"EHLO esa.lab.example\r\nSTARTTLS\r\n"
    assert [e["event"] for e in lab.events()] == [
        "dcid_new",
        "dcid_route",
        "dcid_tls_success",
        "dcid_certificate",
        "delivery_start",
        "message_done",
        "dcid_close",
    ]
