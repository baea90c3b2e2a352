"""What one run of a case saw, as one typed definition.

``Observations`` is the only place the observation keys are written down. From its fields come the evaluator's
key list (``value_kinds``, which the scenario loader checks conditions against), the ``observed`` fragment of
``lab/schemas/index.schema.json`` (``json_schema``) and the table in docs/architecture.md ("Observations",
``docs_table``); tests check that the shipped schema and docs equal what is derived here.

The client engine and the runner write fields (``obs.tls = True``); the evaluator and the reports read the
record as a read-only mapping of the keys that are present (``None`` = absent = not applicable), so scenario
conditions keep naming ``replies.MAIL`` or ``plaintext_exposure.body``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class ValueKind(StrEnum):
    """The type of an observation as scenario conditions see it (which tests and operators apply)."""

    BOOL = "bool"
    CODE = "code"  # a reply code: 250, or a class "5xx" in conditions
    INT = "int"
    STR = "str"
    CODES = "codes"  # {label: code}
    EXPOSURE = "exposure"  # {envelope: bool, body: bool}
    LINES = "lines"  # mail-log events {event, fields, line}; `has` matches each event's rendered line
    EVENTS = "events"  # {event: bool | int} from a mail log, in any MTA's words (lab.scenario.logevents)


_SCHEMA: dict[ValueKind, dict[str, Any]] = {
    ValueKind.BOOL: {"type": "boolean"},
    ValueKind.CODE: {"type": "integer"},
    ValueKind.INT: {"type": "integer", "minimum": 0},
    ValueKind.STR: {"type": "string"},
    ValueKind.CODES: {"type": "object", "additionalProperties": {"type": "integer"}},
    ValueKind.EXPOSURE: {
        "type": "object",
        "additionalProperties": False,
        "properties": {"envelope": {"type": "boolean"}, "body": {"type": "boolean"}},
    },
    ValueKind.LINES: {
        "type": "array",
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["event", "fields", "line"],
            "properties": {"event": {"type": "string"}, "fields": {"type": "object"}, "line": {"type": "string"}},
        },
    },
    ValueKind.EVENTS: {"type": "object", "additionalProperties": {"type": ["boolean", "integer"]}},
}

_DOCS_TYPE: dict[ValueKind, str] = {
    ValueKind.BOOL: "bool",
    ValueKind.CODE: "int",
    ValueKind.INT: "int",
    ValueKind.STR: "str",
    ValueKind.CODES: "{label: int}",
    ValueKind.EXPOSURE: "{`envelope`: bool, `body`: bool}",
    ValueKind.LINES: "[{`event`, `fields`, `line`}]",
    ValueKind.EVENTS: "{event: bool or int}",
}


def _meta(
    kind: ValueKind, meaning: str, *, choices: tuple[str, ...] = (), lab_only: str | None = None
) -> dict[str, Any]:
    """What an observation field is: its kind, its meaning for the docs, its values, the requirement it implies."""
    return {"kind": kind, "meaning": meaning, "choices": choices, "lab_only": lab_only}


@dataclass(eq=False)
class Observations(Mapping[str, Any]):
    """One run's observations; a field left ``None`` was not observed (not applicable)."""

    connected: bool | None = field(default=None, metadata=_meta(ValueKind.BOOL, "a banner (any code) was received"))
    banner: int | None = field(default=None, metadata=_meta(ValueKind.CODE, "the greeting's code (220, 554 ...)"))
    starttls_advertised: bool | None = field(
        default=None,
        metadata=_meta(
            ValueKind.BOOL,
            "the first EHLO reply listed STARTTLS (as the client saw it, after any middlebox)",
        ),
    )
    starttls_reply: int | None = field(
        default=None, metadata=_meta(ValueKind.CODE, "the code of the reply to the first STARTTLS")
    )
    tls: bool | None = field(default=None, metadata=_meta(ValueKind.BOOL, "a TLS handshake completed"))
    tls_version: str | None = field(default=None, metadata=_meta(ValueKind.STR, "e.g. `TLSv1.3`"))
    tls_cipher: str | None = field(default=None, metadata=_meta(ValueKind.STR, "e.g. `TLS_AES_256_GCM_SHA384`"))
    tls_error: str | None = field(default=None, metadata=_meta(ValueKind.STR, "why the handshake failed (client side)"))
    server_cert_verified: bool | None = field(
        default=None,
        metadata=_meta(ValueKind.BOOL, "the server certificate verified against the client's trust anchor and name"),
    )
    delivered: bool | None = field(default=None, metadata=_meta(ValueKind.BOOL, "some DATA got a 2xx final reply"))
    delivered_tls: bool | None = field(
        default=None, metadata=_meta(ValueKind.BOOL, "some DATA got a 2xx final reply inside TLS")
    )
    delivered_plaintext: bool | None = field(
        default=None, metadata=_meta(ValueKind.BOOL, "some DATA got a 2xx final reply in plaintext")
    )
    replies: dict[str, int] | None = field(
        default=None,
        metadata=_meta(
            ValueKind.CODES,
            "reply codes of labelled steps; default label = the verb, `VERB/tls` inside TLS; repeats get `#2`, `#3`; "
            "a `raw` step with `settle` also records the replies beyond those it waited for (`END#2` ...)",
        ),
    )
    closed_by: str | None = field(
        default=None, metadata=_meta(ValueKind.STR, "who closed the connection first", choices=("client", "server"))
    )
    aborted: bool | None = field(
        default=None,
        metadata=_meta(ValueKind.BOOL, "the client gave up by its own rule (e.g. require and STARTTLS missing)"),
    )
    fell_back: bool | None = field(
        default=None, metadata=_meta(ValueKind.BOOL, "the client went on (or retried) in plaintext after a TLS problem")
    )
    injection_executed: bool | None = field(
        default=None, metadata=_meta(ValueKind.BOOL, "a reply to bytes injected behind STARTTLS arrived inside TLS")
    )
    response_injection_discarded: bool | None = field(
        default=None,
        metadata=_meta(ValueKind.BOOL, "the client discarded server bytes buffered behind the 220 to STARTTLS"),
    )
    plaintext_exposure: dict[str, bool] | None = field(
        default=None,
        metadata=_meta(ValueKind.EXPOSURE, "envelope addresses / body marker seen unencrypted in the capture"),
    )
    connections: int | None = field(default=None, metadata=_meta(ValueKind.INT, "TCP connections the client opened"))
    starttls_sent: bool | None = field(
        default=None,
        metadata=_meta(ValueKind.BOOL, "the sender under test sent STARTTLS (sender runs, from the capture)"),
    )
    plaintext_after_220: bool | None = field(
        default=None,
        metadata=_meta(
            ValueKind.BOOL,
            "on a connection where the receiver had answered STARTTLS with 220, the sender then wrote an SMTP "
            "command in plaintext (sender runs, from the capture)",
        ),
    )
    outcome: str | None = field(
        default=None,
        metadata=_meta(
            ValueKind.STR,
            "what became of the message (sender runs): a receiver took it, the sender's log says deferred or "
            "bounced, or none of these was seen in the bounded wait",
            choices=("delivered", "deferred", "bounced", "unknown"),
        ),
    )
    spooled: int | None = field(
        default=None,
        metadata=_meta(
            ValueKind.INT, "messages the lab's listener spooled in this run (lab targets only)", lab_only="spool"
        ),
    )
    server_log: list[dict[str, Any]] | None = field(
        default=None,
        metadata=_meta(
            ValueKind.LINES,
            "the listener's mail log of this run as typed events: name, fields (docs/maillog.md) and the rendered "
            "line without its timestamp, which `has` matches (lab targets only)",
            lab_only="server-log",
        ),
    )
    log: dict[str, bool | int] | None = field(
        default=None,
        metadata=_meta(
            ValueKind.EVENTS,
            "named mail-log events of the run in the target's dialect: seen (bool) or counted (int); "
            "docs/scenario-format.md, `log.EVENT`",
        ),
    )
    #: Keys no field holds (an index.json written by another tool); kept and shown, never judged.
    extra: dict[str, Any] = field(default_factory=dict, metadata={"kind": None})

    @classmethod
    def for_client(cls) -> Observations:
        """What a client run starts from: the facts that are always known, the rest absent."""
        return cls(
            connected=False,
            connections=0,
            tls=False,
            delivered=False,
            delivered_tls=False,
            delivered_plaintext=False,
            aborted=False,
            replies={},
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observations:
        if isinstance(data, Observations):
            return data
        known = set(value_kinds())
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The present keys, in definition order, then any extra ones."""
        return dict(self.items())

    # -- the read-only mapping view the evaluator and the reports use

    def __getitem__(self, key: str) -> Any:
        if key in _KINDS:
            value = getattr(self, key)
            if value is not None:
                return value
        elif key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in _KINDS if getattr(self, name) is not None)
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Observations({self.to_dict()!r})"


_FIELDS = [f for f in fields(Observations) if f.metadata["kind"] is not None]
_KINDS: dict[str, ValueKind] = {f.name: f.metadata["kind"] for f in _FIELDS}


def value_kinds() -> dict[str, ValueKind]:
    """Every observation key and its kind, in definition order (the evaluator's key list)."""
    return dict(_KINDS)


def lab_only_keys() -> dict[str, str]:
    """Keys only the lab's own target can report, and the requirement they imply."""
    return {f.name: f.metadata["lab_only"] for f in _FIELDS if f.metadata["lab_only"]}


def json_schema() -> dict[str, Any]:
    """The ``observed`` fragment of index.schema.json (further keys are allowed: ``extra``)."""
    properties: dict[str, Any] = {}
    for f in _FIELDS:
        choices = f.metadata["choices"]
        properties[f.name] = {"enum": list(choices)} if choices else dict(_SCHEMA[f.metadata["kind"]])
    return {
        "description": "docs/architecture.md, Observations; absent = not applicable; further keys are allowed",
        "type": "object",
        "properties": properties,
    }


def docs_table() -> str:
    """The Markdown table of docs/architecture.md, "Observations"."""
    rows = ["| key | type | meaning |", "|---|---|---|"]
    for f in _FIELDS:
        choices = f.metadata["choices"]
        kind = " / ".join(f"`{c}`" for c in choices) if choices else _DOCS_TYPE[f.metadata["kind"]]
        rows.append(f"| `{f.name}` | {kind} | {f.metadata['meaning']} |")
    return "\n".join(rows) + "\n"
