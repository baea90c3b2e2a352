"""Receiver cases (scenarios/senders/*.yaml): a misbehaving receiver, and per destination control what a sender
must do with one message for it (docs/scenario-format.md, "Receiver cases"; docs/rules.md §6).

The file format is the listener cases' (refs with levels, ``expect`` alternatives judged first-match, a FAILED
alternative citing a MUST of the case's refs), with ``receiver`` in place of ``client`` and the five destination
controls as the policy axis. The loader reuses the listener loader's condition and reference checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.errors import BadInput, excerpt
from lab.policy.modes import DeliveryTLS
from lab.scenario.loader import _CaseReader, _display, _files_under, _looks_like_path, _selects, catalogue_dir
from lab.scenario.model import Condition, Expectation, Middlebox, natural_key
from lab.scenario.verdict import Level, SpecRef
from lab.yamlsource import DocumentBuilder, FieldPath, read_yaml

#: The destination controls, in report order.
SENDER_POLICIES: tuple[str, ...] = tuple(DeliveryTLS)
#: Where the receiver cases live, inside the catalogue (``scenarios/senders``).
SENDERS_DIR = "senders"
#: The observations a sender run makes (``lab.sender.observe``); conditions may name only these.
SENDER_KEYS = (
    "connections",
    "starttls_sent",
    "tls",
    "tls_version",
    "plaintext_after_220",
    "plaintext_exposure",
    "delivered",
    "delivered_tls",
    "delivered_plaintext",
    "fell_back",
    "response_injection_discarded",
    "outcome",
)
CERTIFICATES = ("lab", "self-signed", "expired", "wrong-name")


@dataclass(frozen=True)
class ReceiverSpec:
    """The receiving MTA a case stages: a remote-MTA STARTTLS mode, its certificate and TLS settings, and an
    optional middlebox in front of it."""

    starttls: str = "ok"
    certificate: str = "lab"  # lab: issued by the lab CA for the receiver's own name
    min_version: str | None = None
    max_version: str | None = None
    ciphers: str | None = None
    request_client_cert: bool = False
    middlebox: Middlebox | None = None


@dataclass(frozen=True)
class SenderCase:
    id: str
    title: str
    label: str  # the matrix row
    refs: tuple[SpecRef, ...]
    description: str
    expectation: str
    receiver: ReceiverSpec
    expect: Expectation
    policies: tuple[str, ...] = SENDER_POLICIES
    file: str | None = None
    line: int | None = None

    section = "SND"

    @property
    def strongest_level(self) -> Level:
        return max((r.level for r in self.refs), key=lambda level: level.rank)

    @property
    def domain(self) -> str:
        """The recipient domain of this case's message (one per case, so a route and a log line name the case)."""
        return f"{self.id.lower()}.senders.test"

    @property
    def hostname(self) -> str:
        """The receiving host's name: what its certificate names (or, for ``wrong-name``, does not)."""
        return f"mx.{self.domain}"

    @property
    def recipient(self) -> str:
        return f"rcpt@{self.domain}"

    @property
    def marker(self) -> str:
        return f"SMTPLAB-MARKER-{self.id}"

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.file and self.line else (self.file or self.id)


class _SenderCaseReader(_CaseReader):
    SCHEMA = "sender-case.schema.json"

    def validate(self) -> None:
        if not isinstance(self.doc, dict):
            raise BadInput(
                "a receiver case is a mapping (id, title, refs, receiver, expect ...)", file=self.file, line=1
            )
        self.normalise()
        DocumentBuilder.validate(self)

    def condition(self, key: str, value: Any, path: FieldPath) -> Condition:
        top = key.partition(".")[0]
        if top not in SENDER_KEYS:
            raise self.fail(f"{excerpt(top)} is not a sender observation (known: {', '.join(SENDER_KEYS)})", path)
        return super().condition(key, value, path)

    def build_sender(self) -> SenderCase:
        self.validate()
        doc = self.doc
        refs = tuple(SpecRef(r["ref"], Level(r["level"]), r["text"]) for r in doc["refs"])
        policies = tuple(p for p in SENDER_POLICIES if p in doc.get("policies", SENDER_POLICIES))
        expect = self.expect(doc["expect"], policies)
        self.check_alternative_refs(refs, expect)
        data = dict(doc["receiver"])
        box = data.pop("middlebox", None)
        receiver = ReceiverSpec(**data, middlebox=None if box is None else Middlebox(**box))
        label = doc.get("label") or receiver.starttls
        return SenderCase(
            id=doc["id"],
            title=doc["title"],
            label=label,
            refs=refs,
            description=doc["description"].strip(),
            expectation=doc["expectation"].strip(),
            receiver=receiver,
            expect=expect,
            policies=policies,
            file=self.file,
            line=getattr(doc, "key_lines", {}).get("id"),
        )


def load_sender_case(path: str | Path) -> SenderCase:
    path = Path(path)
    shown = _display(path)
    doc = read_yaml(path, shown)
    if doc is None:
        raise BadInput("empty file: a receiver case needs id, title, refs, receiver, expect", file=shown)
    return _SenderCaseReader(doc, shown).build_sender()


def sender_catalogue_dir() -> Path:
    return catalogue_dir() / SENDERS_DIR


def load_sender_cases(selectors: Sequence[str] | None = None) -> list[SenderCase]:
    """The receiver cases named by files, directories and id prefixes (``SND-DC``); none: all of them."""
    named: list[Path] = []
    prefixes: list[str] = []
    for text in selectors or ():
        path = Path(text)
        if path.is_dir():
            named += _files_under(path)
        elif path.is_file():
            named.append(path)
        elif _looks_like_path(text):
            raise BadInput("no such file or directory", file=text)
        else:
            prefixes.append(text)
    cases: dict[str, SenderCase] = {}
    for case in map(load_sender_case, dict.fromkeys(named)):
        _add(cases, case)
    if not selectors or prefixes:
        catalogue = [load_sender_case(f) for f in _files_under(sender_catalogue_dir())]
        for prefix in prefixes:
            if not any(_selects(prefix, c.id) for c in catalogue):
                raise BadInput(f"no receiver case id starts with {prefix!r}", field="selection")
        for case in catalogue:
            if not prefixes or any(_selects(p, case.id) for p in prefixes):
                _add(cases, case)
    return sorted(cases.values(), key=lambda c: natural_key(c.id))


def _add(cases: dict[str, SenderCase], case: SenderCase) -> None:
    other = cases.setdefault(case.id, case)
    if other is not case and Path(str(other.file)).resolve() != Path(str(case.file)).resolve():
        raise BadInput(
            f"duplicate id {case.id!r} (also in {other.where()})", file=case.file, line=case.line, field="id"
        )
