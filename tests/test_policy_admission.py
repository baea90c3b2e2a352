"""The 421 admission decisions the listener carries out, by table."""

from __future__ import annotations

import pytest

from lab.policy import replies
from lab.policy.admission import Refusal, over_max_concurrency, over_per_ip_limit


@pytest.mark.parametrize(
    ("active", "limit", "expected"),
    [
        (1, 1, None),
        (2, 1, Refusal("max concurrency 1 reached")),
        (1000, 1000, None),
        (1001, 1000, Refusal("max concurrency 1000 reached")),
    ],
)
def test_max_concurrency(active: int, limit: int, expected: Refusal | None) -> None:
    assert over_max_concurrency(active, limit) == expected


@pytest.mark.parametrize(
    ("count", "limit", "expected"),
    [
        (1, 1, None),
        (2, 1, Refusal("max concurrency per IP 1 reached")),
        (10, 10, None),
        (11, 10, Refusal("max concurrency per IP 10 reached")),
    ],
)
def test_per_ip_limit(count: int, limit: int, expected: Refusal | None) -> None:
    assert over_per_ip_limit(count, limit) == expected


def test_a_refusal_is_421_too_many_connections() -> None:
    refusal = over_max_concurrency(2, 1)
    assert refusal is not None and refusal.reply.wire == replies.TOO_MANY_CONNECTIONS.wire
    assert refusal.reply.wire.startswith(b"421 4.3.2 ")
