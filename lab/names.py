"""Host names as RFC 1123 2.1 spells them, checked once for every file that holds one.

A host name reaches the wire (the appliance's banner and EHLO reply), certificates (DNSName SANs) and the
lab's DNS, so the loaders refuse anything else at load time with a reason, not at run time with a traceback.
"""

from __future__ import annotations

import ipaddress
import re

from lab.errors import BadInput, excerpt

MAX_NAME = 253  # RFC 1035 2.3.4, without the trailing dot
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def hostname_problem(name: str, *, fqdn: bool = False, wildcard: bool = False) -> str | None:
    """Why ``name`` is not an RFC 1123 host name, or ``None`` if it is one.

    Labels are letters, digits and inner hyphens, 1-63 characters; the whole name at most 253; the last label
    is not all digits (that would be an IPv4 address). ``fqdn``: at least two labels. ``wildcard``: a
    leading ``*.`` label is allowed (certificate names).
    """
    if not isinstance(name, str) or not name:
        return "an empty host name"
    if len(name) > MAX_NAME:
        return f"a host name of {len(name)} characters (at most {MAX_NAME})"
    control = next((ch for ch in name if not ch.isprintable() or ch.isspace()), None)
    if control is not None:
        return f"{excerpt(name)} contains {control!r}; a host name is letters, digits, hyphens and dots"
    labels = name.split(".")
    if wildcard and labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if fqdn and len(labels) < 2:
        return f"{excerpt(name)} is not a fully-qualified host name (it has no dot)"
    for label in labels:
        if not _LABEL.match(label):
            return (
                f"{excerpt(name)} is not a host name: label {excerpt(label, 20)} is not letters, digits and inner "
                "hyphens of 1-63 characters (RFC 1123)"
            )
    if labels[-1].isdigit():
        return f"{excerpt(name)} is not a host name: its last label is all digits"
    return None


_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback IP literal; a host name is not (only an ``allow_remote`` target has one)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_loopback(address: str, field: str = "address") -> str:
    """Peers may only ever bind 127.0.0.0/8; anything else is a user error, not something to try."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise BadInput(f"{address!r} is not an IPv4 address", field=field) from None
    if ip.version != 4 or ip not in _LOOPBACK:
        raise BadInput(f"{address} is outside 127.0.0.0/8; peers bind loopback addresses only", field=field)
    return str(ip)
