"""May a new connection be served, or is it turned away with a 421? (docs/rules.md §1.2, §1.5)

The listener counts connections and carries out the answer; the decision is here, over plain numbers. A
listener over its Max Concurrency refuses before the Host Access Table is read; a peer over its policy's
connections per IP is refused after it (the limit is a parameter of the policy it matched).
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.policy import replies
from lab.policy.replies import Reply


@dataclass(frozen=True)
class Refusal:
    """Turn the connection away: ``reason`` for the mail log, ``reply`` on the wire, then close."""

    reason: str
    reply: Reply = replies.TOO_MANY_CONNECTIONS


def over_max_concurrency(active: int, max_concurrency: int) -> Refusal | None:
    """``active`` counts this connection too."""
    if active > max_concurrency:
        return Refusal(f"max concurrency {max_concurrency} reached")
    return None


def over_per_ip_limit(from_this_ip: int, max_per_ip: int) -> Refusal | None:
    """``from_this_ip`` counts this connection too."""
    if from_this_ip > max_per_ip:
        return Refusal(f"max concurrency per IP {max_per_ip} reached")
    return None
