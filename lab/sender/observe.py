"""What a sender did, from the receiver's side: its capture below TLS and the remote MTA's own record.

Whether anything crossed in plaintext is read from the capture, never from the sender's word: the envelope
addresses and the body marker in the client's bytes that were not inside TLS; an SMTP command written in
plaintext after a 220 to STARTTLS on the same connection; STARTTLS itself.
"""

from __future__ import annotations

import re

from lab.net.capture import Capture, Direction, Flow
from lab.scenario.observations import Observations
from lab.sender.cases import SenderCase
from lab.smtp.remote_mta import RemoteMTAFactory

_STARTTLS = re.compile(rb"(?im)^STARTTLS\r?$")
_COMMAND = re.compile(rb"(?im)^(?:EHLO|HELO|MAIL FROM:|RCPT TO:|DATA\r?$)")
_READY = re.compile(rb"^220[ -]")


def plaintext_after_220(flow: Flow) -> bool:
    """Did the client write an SMTP command in plaintext after the server's 220 to its STARTTLS?"""
    asked, ready = False, False
    for segment in flow.segments:
        if segment.direction is Direction.C2S:
            if ready and _COMMAND.search(segment.data):
                return True
            asked = asked or bool(_STARTTLS.search(segment.data))
        elif asked and not ready and _READY.match(segment.data.lstrip(b"\r\n")):
            ready = True
    return False


def observe(
    case: SenderCase, factory: RemoteMTAFactory, capture: Capture, mail_from: str, box_notes: list[str]
) -> Observations:
    """The observations of one sender run against ``case``'s receiver (``outcome`` is the caller's to refine)."""
    flows = capture.flows
    wire = b"".join(flow.payload(Direction.C2S) for flow in flows)
    messages = factory.messages
    tls_sessions = [log for log in factory.sessions if log.tls]
    delivered_tls = any(m.tls for m in messages)
    delivered_plain = any(not m.tls for m in messages)
    obs = Observations(
        connections=len(factory.sessions),
        starttls_sent=bool(_STARTTLS.search(wire)) or any("answered STARTTLS" in n for n in box_notes),
        tls=bool(tls_sessions),
        tls_version=tls_sessions[0].tls_version if tls_sessions else None,
        plaintext_after_220=any(plaintext_after_220(flow) for flow in flows),
        plaintext_exposure={
            "envelope": any(f"<{a}>".encode() in wire for a in (mail_from, case.recipient) if a),
            "body": case.marker.encode() in wire,
        },
        delivered=bool(messages),
        delivered_tls=delivered_tls,
        delivered_plaintext=delivered_plain,
        fell_back=delivered_plain and bool(_STARTTLS.search(wire)),
        outcome="delivered" if messages else "unknown",
    )
    if case.receiver.starttls == "response-injection":
        obs.response_injection_discarded = delivered_tls
    return obs
