"""Scenario cases as plain, immutable data (docs/scenario-format.md).

A case is data, not code: the loader builds these from YAML, the evaluator judges an
``observed`` mapping against them, the runner reads the client, target and lab-only needs from them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lab.errors import BadInput
from lab.policy.modes import TLS_MODE_SPELLINGS, parse_tls_mode
from lab.scenario.observations import ValueKind, lab_only_keys, value_kinds
from lab.scenario.verdict import Level, SpecRef, Verdict

#: The policy axis, in report order (TLSMode values).
POLICIES: tuple[str, ...] = ("no", "preferred", "required")


def parse_policies(text: str, field: str) -> list[str]:
    """A comma-separated policy list as a user writes it (``may,encrypt``, ``No``) -> canonical names in report
    order; an unknown word or an empty list is ``BadInput`` naming ``field``."""
    chosen: set[str] = set()
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        mode = parse_tls_mode(word)
        if mode is None:
            raise BadInput(f"{word!r} is not one of {TLS_MODE_SPELLINGS}", field=field)
        chosen.add(str(mode))
    if not chosen:
        raise BadInput("name at least one policy", field=field)
    return [policy for policy in POLICIES if policy in chosen]


#: What a case may need that only the lab's own target gives; against an external target such a case is
#: UNIMPLEMENTED with these words as the reason.
REQUIREMENTS: dict[str, str] = {
    "middlebox": "a middlebox on the link (STARTTLS stripping)",
    "hat-group": "the client placed in a chosen sender group of the lab's HAT",
    "policy-config": "mail flow policy parameters set by the lab",
    "server-cert": "a chosen certificate on the lab's listener",
    "client-cert-ca": "client-certificate verification against the lab CA",
    "spool": "the lab's spool (count of stored messages)",
    "server-log": "the lab's mail log",
    "remote-mta": "the lab's misbehaving receiving MTA",
    "listener": "a chosen listener of the lab's appliance (not its public one)",
}

#: The observation keys conditions may name and their value kind, derived from ``Observations``.
OBSERVATION_KEYS: dict[str, ValueKind] = value_kinds()

#: Keys whose values only the lab's own target can report, and the requirement they imply.
LAB_ONLY_KEYS: dict[str, str] = lab_only_keys()


# --- conditions -------------------------------------------------------------------------------------------------

_MISSING: Any = object()


class Test:
    """One test on one observed value; ``value`` is ``MISSING`` when the key is absent."""

    MISSING: Any = _MISSING

    def holds(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _same(expected: Any, value: Any) -> bool:
    """Equality that keeps booleans apart from numbers (``true`` never equals ``1``)."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) and isinstance(value, bool) and expected == value
    return bool(expected == value)


@dataclass(frozen=True)
class Equals(Test):
    value: Any

    def holds(self, value: Any) -> bool:
        return value is not _MISSING and _same(self.value, value)

    def describe(self) -> str:
        return _show(self.value)


CODE_PATTERN = re.compile(r"^[1-5][0-9xX]{2}(\|[1-5][0-9xX]{2})*$")


@dataclass(frozen=True)
class CodeClass(Test):
    """Reply codes by class: ``"5xx"``, ``"4xx|5xx"``, ``"25x"``, ``"502|454"``."""

    pattern: str

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | str):
            return False
        text = str(value)
        if isinstance(value, str) and not text.isdigit():
            return False
        return any(
            len(alt) == len(text) and all(p in "xX" or p == c for p, c in zip(alt, text, strict=True))
            for alt in self.pattern.split("|")
        )

    def describe(self) -> str:
        return self.pattern


@dataclass(frozen=True)
class OneOf(Test):
    tests: tuple[Test, ...]

    def holds(self, value: Any) -> bool:
        return any(t.holds(value) for t in self.tests)

    def describe(self) -> str:
        return "one of [" + ", ".join(t.describe() for t in self.tests) + "]"


@dataclass(frozen=True)
class Not(Test):
    """Holds when the inner test does not (an absent key fails every test but ``absent``, so ``not`` holds)."""

    test: Test

    def holds(self, value: Any) -> bool:
        return not self.test.holds(value)

    def describe(self) -> str:
        return f"not {self.test.describe()}"


@dataclass(frozen=True)
class Match(Test):
    """``re.search`` on a string value."""

    regex: str

    def holds(self, value: Any) -> bool:
        return isinstance(value, str) and re.search(self.regex, value) is not None

    def describe(self) -> str:
        return f"matching /{self.regex}/"


@dataclass(frozen=True)
class Has(Test):
    """Some line of a list matches (``re.search``): a string, or a mail-log event's rendered ``line``."""

    regex: str

    def holds(self, value: Any) -> bool:
        if not isinstance(value, list | tuple):
            return False
        lines = (item.get("line") if isinstance(item, dict) else item for item in value)
        return any(isinstance(line, str) and re.search(self.regex, line) is not None for line in lines)

    def describe(self) -> str:
        return f"a line matching /{self.regex}/"


@dataclass(frozen=True)
class Absent(Test):
    """``absent: true``: the key is missing (or null); ``absent: false``: it is there."""

    absent: bool = True

    def holds(self, value: Any) -> bool:
        missing = value is _MISSING or value is None
        return missing if self.absent else not missing

    def describe(self) -> str:
        return "absent" if self.absent else "present"


@dataclass(frozen=True)
class AllOf(Test):
    tests: tuple[Test, ...]

    def holds(self, value: Any) -> bool:
        return all(t.holds(value) for t in self.tests)

    def describe(self) -> str:
        return " and ".join(t.describe() for t in self.tests)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


def lookup(observed: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key (``replies.MAIL/tls``, ``plaintext_exposure.envelope``) or ``Test.MISSING``.

    At each level the longest remaining name that is a key wins, so labels may themselves contain dots.
    """
    node: Any = observed
    rest = key
    while True:
        if not isinstance(node, Mapping):
            return _MISSING
        if rest in node:
            return node[rest]
        cut = [i for i, c in enumerate(rest) if c == "."]
        for i in reversed(cut):
            if rest[:i] in node:
                node, rest = node[rest[:i]], rest[i + 1 :]
                break
        else:
            return _MISSING


@dataclass(frozen=True)
class Condition:
    key: str  # dotted observation key
    test: Test
    source: Any = None  # the value as written, for reports

    def holds(self, observed: Mapping[str, Any]) -> bool:
        return self.test.holds(lookup(observed, self.key))

    def unmet(self, observed: Mapping[str, Any]) -> str | None:
        """``None`` when it holds, else ``key: wanted X (observed Y)``."""
        value = lookup(observed, self.key)
        if self.test.holds(value):
            return None
        seen = "absent" if value is _MISSING else _show(value)
        return f"{self.key}: wanted {self.test.describe()} (observed {seen})"


@dataclass(frozen=True)
class Alternative:
    """One expected outcome; the first alternative whose conditions all hold decides the verdict."""

    verdict: Verdict
    label: str
    when: tuple[Condition, ...] = ()
    ref: str | None = None  # the case ref whose rule this outcome breaks (FAILED: a MUST, NON-STRICT: a SHOULD)

    def unmet(self, observed: Mapping[str, Any]) -> list[str]:
        return [u for c in self.when if (u := c.unmet(observed)) is not None]

    def to_dict(self) -> dict[str, Any]:
        """The form result records and reports show (``conditions`` as written in the file)."""
        out = {"verdict": str(self.verdict), "label": self.label, "conditions": {c.key: c.source for c in self.when}}
        if self.ref is not None:
            out["ref"] = self.ref
        return out


@dataclass(frozen=True)
class Expectation:
    """Ordered alternatives per policy; ``any`` alternatives are tried after the policy's own."""

    by_policy: Mapping[str, tuple[Alternative, ...]]

    def for_policy(self, policy: str) -> tuple[Alternative, ...]:
        return tuple(self.by_policy.get(policy, ())) + tuple(self.by_policy.get("any", ()))


# --- the parts of a case ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    """The simulated sending MTA: a host of the topology and either a named behaviour or explicit steps."""

    host: str
    behaviour: str | None = None
    steps: tuple[Any, ...] | None = None  # lab.smtp.steps.Step objects (raw mappings if that module is absent)
    ehlo: str | None = None  # None: the host's own name
    mail_from: str = "alice@example.net"
    rcpt_to: tuple[str, ...] = ("bob@example.com",)
    body_marker: str | None = None  # None: derived from the case id

    def describe(self) -> str:
        return self.behaviour if self.behaviour else f"steps ({len(self.steps or ())})"


@dataclass(frozen=True)
class Middlebox:
    kind: str = "starttls-strip"
    rewrite: bool = True  # 250-STARTTLS -> 250-XXXXXXXA
    answer_starttls: int | None = None  # e.g. 454: the middlebox answers STARTTLS itself


@dataclass(frozen=True)
class RemoteMTA:
    """Run the client against the lab's misbehaving receiving MTA instead of a listener."""

    starttls: str  # ok | absent | 454 | garbage-after-220 | response-injection | handshake-fail
    hostname: str = "mx.remote.example"


@dataclass(frozen=True)
class Case:
    id: str
    title: str
    section: str
    refs: tuple[SpecRef, ...]
    description: str
    expectation: str  # prose for the student; ``expect`` is the machine form
    client: ClientSpec
    expect: Expectation
    target: str | None = None  # listener name; None: the public one
    requires: tuple[str, ...] = ()  # keys of REQUIREMENTS, sorted
    middlebox: Middlebox | None = None
    remote_mta: RemoteMTA | None = None
    policies: tuple[str, ...] = POLICIES
    verify_client: bool = False
    server_cert: str | None = None  # "demo" | "lab": the certificate the listener presents
    policy_behaviour: str | None = None  # overrides the behaviour of the client's sender-group policy
    policy_params: Mapping[str, Any] = field(default_factory=dict)  # extra PolicyParams for that policy
    facts: Mapping[str, Any] = field(default_factory=dict)  # target facts it needs, with the lab's own values
    source: Any = field(default=None, compare=False, repr=False)  # the file's document before facts were filled in
    file: str | None = None
    line: int | None = None

    def log_events(self, policy: str | None = None) -> list[str]:
        """The mail-log events (``log.EVENT``) the alternatives name: for ``policy`` (its own and ``any``), or all."""
        alternatives = (
            self.expect.for_policy(policy)
            if policy is not None
            else tuple(alt for alts in self.expect.by_policy.values() for alt in alts)
        )
        keys = (c.key for alt in alternatives for c in alt.when)
        return list(dict.fromkeys(key.split(".", 1)[1] for key in keys if key.startswith("log.")))

    def missing_facts(self, declared: Mapping[str, Any]) -> list[str]:
        """The facts this case needs that a target did not declare (``maillog`` when it reads log events)."""
        needed = [*self.facts, *(["maillog"] if self.log_events() else [])]
        return [name for name in needed if declared.get(name) is None]

    @property
    def strongest_level(self) -> Level:
        return max((r.level for r in self.refs), key=lambda level: level.rank)

    @property
    def marker(self) -> str:
        """The body marker that plaintext-exposure checks look for."""
        return self.client.body_marker or f"SMTPLAB-MARKER-{self.id}"

    def envelope_addresses(self) -> tuple[str, ...]:
        """Every envelope address the client sends: a behaviour's, or those its steps name (for exposure checks)."""
        if self.client.steps is None:
            return (self.client.mail_from, *self.client.rcpt_to)
        found: list[str] = []
        for step in _walk(self.client.steps):
            if hasattr(step, "mail_from") and hasattr(step, "rcpt_to"):
                found += [step.mail_from, *step.rcpt_to]
            for text in _step_texts(step):
                found += _ADDRESS.findall(text)
        return tuple(dict.fromkeys(a for a in found if a))

    def markers(self) -> tuple[str, ...]:
        """The body lines that show a message body on the wire: a behaviour's marker, or the steps' markers."""
        if self.client.steps is None:
            return (self.marker,)
        found = [m for step in _walk(self.client.steps) if (m := getattr(step, "marker", None))]
        return tuple(dict.fromkeys(found)) or (self.marker,)

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.file and self.line else (self.file or self.id)

    def lab_only_reason(self) -> str | None:
        """Why this case cannot run against an external target, or ``None``."""
        if not self.requires:
            return None
        return "needs " + "; ".join(REQUIREMENTS[r] for r in self.requires)


def id_section(case_id: str) -> str:
    """The spec section an id belongs to: ``3207-4.2-01`` -> ``RFC 3207 4.2``; ``POL-HAT-01`` -> ``POL``."""
    head = case_id.split("-", 1)[0]
    if head.isdigit():
        rfc, sec, _ = case_id.split("-")
        return f"RFC {rfc} {sec}"
    return head


def natural_key(case_id: str) -> tuple[Any, ...]:
    """Order RFC cases by number, section (4 before 4.2 before 4.10) and serial, then POL, then ATK."""
    head, _, rest = case_id.partition("-")
    if head.isdigit():
        sec, _, serial = rest.rpartition("-")
        return (0, int(head), tuple(int(p) for p in sec.split(".") if p.isdigit()), int(serial or 0))
    return (
        {"POL": 1, "ATK": 2}.get(head, 3),
        head,
        tuple((0, int(p)) if p.isdigit() else (1, p) for p in rest.split("-")),
    )


_ADDRESS = re.compile(r"(?i)(?:MAIL FROM|RCPT TO):\s*<([^<>\r\n]*)>")


def _walk(steps: Any) -> list[Any]:
    """Steps in order, the branches of ``if`` steps included."""
    out: list[Any] = []
    for step in steps or ():
        out.append(step)
        out += _walk(getattr(step, "then", ())) + _walk(getattr(step, "else_", ()))
    return out


def _step_texts(step: Any) -> list[str]:
    """The command text a step writes by hand (``send``, ``raw``, ``starttls`` injection)."""
    texts = [getattr(step, "line", None)]
    texts += [chunk.decode("latin-1") for chunk in getattr(step, "chunks", ())]
    inject = getattr(step, "inject", b"")
    texts.append(inject.decode("latin-1") if inject else None)
    return [t for t in texts if isinstance(t, str)]
