"""The destination-control core: the TLS decision table, the lookup by domain, the bounce profile's schedule."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.policy.destinations import (
    BounceProfile,
    DestinationControl,
    DestinationControls,
    DestinationTLS,
    Next,
    TLSEvent,
    before_220,
    decide,
    parse_destination_tls,
    result_type,
)

S, E = DestinationTLS, TLSEvent
CLEAR, TLS, DEFER = Next.CLEAR, Next.TLS, Next.DEFER

#: Every setting x every event: what the delivery client does next (docs/rules.md §6).
TABLE: dict[DestinationTLS, dict[TLSEvent, Next]] = {
    S.NO: {E.NOT_ADVERTISED: CLEAR, E.REFUSED: CLEAR, E.FAILED_AFTER_220: CLEAR, E.UNVERIFIED: CLEAR, E.OK: CLEAR},
    S.PREFERRED: {E.NOT_ADVERTISED: CLEAR, E.REFUSED: CLEAR, E.FAILED_AFTER_220: DEFER, E.UNVERIFIED: TLS, E.OK: TLS},
    S.REQUIRED: {E.NOT_ADVERTISED: DEFER, E.REFUSED: DEFER, E.FAILED_AFTER_220: DEFER, E.UNVERIFIED: TLS, E.OK: TLS},
    S.PREFERRED_VERIFY: {
        E.NOT_ADVERTISED: CLEAR,
        E.REFUSED: CLEAR,
        E.FAILED_AFTER_220: DEFER,
        E.UNVERIFIED: TLS,
        E.OK: TLS,
    },
    S.REQUIRED_VERIFY: {
        E.NOT_ADVERTISED: DEFER,
        E.REFUSED: DEFER,
        E.FAILED_AFTER_220: DEFER,
        E.UNVERIFIED: DEFER,
        E.OK: TLS,
    },
}


def test_the_table_covers_every_setting_and_event() -> None:
    assert set(TABLE) == set(DestinationTLS)
    assert all(set(row) == set(TLSEvent) for row in TABLE.values())


@pytest.mark.parametrize(("setting", "event"), [(s, e) for s in DestinationTLS for e in TLSEvent])
def test_decide(setting: DestinationTLS, event: TLSEvent) -> None:
    assert decide(setting, event) is TABLE[setting][event]


@given(st.sampled_from(list(DestinationTLS)), st.sampled_from(list(TLSEvent)))
def test_the_rules_behind_the_table(setting: DestinationTLS, event: TLSEvent) -> None:
    nxt = decide(setting, event)
    if nxt is Next.CLEAR and setting is not DestinationTLS.NO:
        assert not setting.required and before_220(event)  # clear only for Preferred, and only before the 220
    if setting.required:
        assert nxt is not Next.CLEAR  # nothing in the clear, ever
    if event is TLSEvent.FAILED_AFTER_220 and setting.attempts_tls:
        assert nxt is Next.DEFER  # no fallback to the clear after the 220
    if nxt is Next.TLS:
        assert event in (TLSEvent.OK, TLSEvent.UNVERIFIED)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("No", S.NO),
        ("none", S.NO),
        ("may", S.PREFERRED),
        ("Preferred", S.PREFERRED),
        ("encrypt", S.REQUIRED),
        ("REQUIRED", S.REQUIRED),
        ("Preferred (Verify)", S.PREFERRED_VERIFY),
        ("preferred-verify", S.PREFERRED_VERIFY),
        ("required_verify", S.REQUIRED_VERIFY),
        ("Required (Verify)", S.REQUIRED_VERIFY),
        ("verify", S.REQUIRED_VERIFY),
        ("sometimes", None),
        ("", None),
    ],
)
def test_spellings(text: str, setting: DestinationTLS | None) -> None:
    assert parse_destination_tls(text) is setting


def test_every_setting_reads_back_from_its_own_name() -> None:
    assert all(parse_destination_tls(str(s)) is s for s in DestinationTLS)


def test_result_types_are_those_of_rfc_8460() -> None:
    assert result_type(E.NOT_ADVERTISED) == result_type(E.REFUSED) == "starttls-not-supported"
    assert result_type(E.FAILED_AFTER_220) == "validation-failure"
    assert result_type(E.UNVERIFIED, "certificate-host-mismatch") == "certificate-host-mismatch"
    assert result_type(E.UNVERIFIED) == "certificate-not-trusted"
    assert result_type(E.OK) is None


CONTROLS = DestinationControls(
    DestinationControl("default", S.PREFERRED),
    {
        "example.com": DestinationControl("example.com", S.REQUIRED),
        ".example.com": DestinationControl(".example.com", S.REQUIRED_VERIFY),
        ".a.example.com": DestinationControl(".a.example.com", S.NO),
    },
)


@pytest.mark.parametrize(
    ("domain", "entry"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.COM.", "example.com"),
        ("mail.example.com", ".example.com"),
        ("x.mail.example.com", ".example.com"),
        ("b.a.example.com", ".a.example.com"),  # the nearest .parent wins
        ("a.example.com", ".example.com"),  # .a.example.com covers subdomains of a.example.com only
        ("example.org", "default"),
        ("notexample.com", "default"),
    ],
)
def test_lookup(domain: str, entry: str) -> None:
    assert CONTROLS.lookup(domain).domain == entry


@given(st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,3}", fullmatch=True))
def test_a_domain_outside_every_entry_gets_the_default(label: str) -> None:
    domain = f"{label}.test"
    assert CONTROLS.lookup(domain).domain == "default"


def test_retry_waits_double_up_to_the_maximum() -> None:
    profile = BounceProfile(initial_wait=60, max_wait=300, max_retries=100, max_time_in_queue=10**9)
    assert [profile.wait_before(n) for n in range(1, 7)] == [60, 120, 240, 300, 300, 300]


def test_schedule_ends_at_max_retries_or_the_time_in_queue() -> None:
    assert BounceProfile(initial_wait=60, max_wait=240, max_retries=3, max_time_in_queue=3600).schedule() == [
        0,
        60,
        180,
        420,
    ]
    assert BounceProfile(initial_wait=60, max_wait=3600, max_retries=100, max_time_in_queue=500).schedule() == [
        0,
        60,
        180,
        420,
    ]
    assert BounceProfile(max_retries=0).schedule() == [0]


@given(
    st.floats(1, 1000),
    st.floats(1, 10000),
    st.integers(0, 50),
    st.floats(1, 10**6),
)
def test_schedule_respects_every_limit(initial: float, extra: float, retries: int, in_queue: float) -> None:
    profile = BounceProfile(
        initial_wait=initial, max_wait=initial + extra, max_retries=retries, max_time_in_queue=in_queue
    )
    times = profile.schedule()
    assert times[0] == 0 and len(times) <= retries + 1
    assert all(t <= in_queue for t in times)
    assert all(b > a for a, b in itertools.pairwise(times))
