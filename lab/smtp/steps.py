"""The scripted client's step vocabulary: what a scenario file lists, as frozen dataclasses.

Steps are data, not code: the engine in ``lab.smtp.client`` interprets them, and a
scenario file lists them under ``steps`` in YAML. ``steps_from_data`` validates against
``lab/schemas/steps.schema.json`` (so every error names file, line and field) and builds the dataclasses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema
from OpenSSL import SSL

from lab.errors import BadInput, excerpt
from lab.policy.fallback import ClientTLS
from lab.yamlsource import describe, field_name, line_of, load_schema

DEFAULT_EHLO = "client.example.net"

#: The verb of each action key, in the order the schema lists them.
ACTIONS = (
    "ehlo",
    "helo",
    "send",
    "raw",
    "starttls",
    "mail",
    "quit",
    "wait",
    "reconnect",
    "expect_close",
    "if",
    "tls_policy",
)
MODIFIERS = ("as", "expect", "on_mismatch")
_VERSION_NAMES = {"1": "1.0", "1.0": "1.0", "1.1": "1.1", "1.2": "1.2", "1.3": "1.3"}


@dataclass(frozen=True)
class TLSOptions:
    """How the client does its side of STARTTLS; ``lab.tls.tlsctx.ClientTLS`` gets most of it.

    ``client_cert``: ``none``, ``lab`` (issued by the lab CA) or ``untrusted`` (issued by a CA nobody trusts).
    ``abort_mid_handshake`` sends the ClientHello and closes; ``plaintext_after_220`` never starts TLS at all.
    """

    min_version: str | None = None
    max_version: str | None = None
    ciphers: str | None = None
    verify: bool = False
    server_name: str | None = None
    client_cert: str = "none"
    abort_mid_handshake: bool = False
    plaintext_after_220: bool = False


@dataclass(frozen=True, kw_only=True)
class Step:
    """What every step may carry: a label for its reply, the codes it expects, and what a mismatch does."""

    label: str | None = None
    expect: tuple[str, ...] = ()
    on_mismatch: str = "abort"  # abort | continue

    def expects(self, code: int) -> bool:
        """Does ``code`` meet ``expect``? (no expectation: anything goes)"""
        return not self.expect or any(code_matches(code, pattern) for pattern in self.expect)


@dataclass(frozen=True)
class Ehlo(Step):
    name: str


@dataclass(frozen=True)
class Helo(Step):
    name: str


@dataclass(frozen=True)
class Send(Step):
    """One command line; CRLF is added."""

    line: str


@dataclass(frozen=True)
class Raw(Step):
    """Bytes as they are (hostile input): one write per chunk when ``separate``, else all in one write.

    ``replies`` is how many replies to wait for; by default one per LF in the data. ``settle``: then listen that
    many seconds more and record every further reply, so that a case can tell from replies alone whether the
    server executed bytes it should have taken as message text (SMTP smuggling).
    """

    chunks: tuple[bytes, ...]
    separate: bool = False
    replies: int | None = None
    settle: float | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def expected_replies(self) -> int:
        return self.data.count(b"\n") if self.replies is None else self.replies


@dataclass(frozen=True)
class StartTLS(Step):
    """``STARTTLS`` (with ``argument`` if given), ``inject`` written in the same write right behind it."""

    inject: bytes = b""
    argument: str | None = None
    tls: TLSOptions = field(default_factory=TLSOptions)


@dataclass(frozen=True)
class Mail(Step):
    """A whole transaction: MAIL, one RCPT per recipient, DATA, the message, the final dot.

    ``expect`` is checked against the last reply of the transaction (the dot's when it got that far).
    """

    mail_from: str
    rcpt_to: tuple[str, ...]
    body: str | None = None
    size: int | None = None
    marker: str | None = None


@dataclass(frozen=True)
class Quit(Step):
    pass


@dataclass(frozen=True)
class Wait(Step):
    """Let virtual time pass; replies that arrive meanwhile are recorded."""

    seconds: float


@dataclass(frozen=True)
class Reconnect(Step):
    """Close this connection (if open) and open a new one to the same target."""


@dataclass(frozen=True)
class ExpectClose(Step):
    """Wait (bounded) for the server to close the connection."""


@dataclass(frozen=True)
class If(Step):
    """Branch on the capability list of the last EHLO on this connection (forgotten after TLS)."""

    capability: str
    then: tuple[Step, ...] = ()
    else_: tuple[Step, ...] = ()


@dataclass(frozen=True)
class TLSPolicy(Step):
    """EHLO, then what ``behaviour`` does about STARTTLS, decided by ``lab.policy.fallback`` (the one rule table).

    On success the client EHLOs again inside TLS; the steps after this one are "the delivery" that goes on in
    TLS, in plaintext, or again on a new plaintext connection, as the table says.
    """

    behaviour: ClientTLS
    ehlo: str = DEFAULT_EHLO
    tls: TLSOptions = field(default_factory=TLSOptions)


def code_matches(code: int, pattern: str) -> bool:
    """``250`` matches ``"250"``, ``"25x"``, ``"2xx"``."""
    text = str(code)
    return len(text) == 3 and all(p in ("x", c) for p, c in zip(pattern.lower(), text, strict=True))


def decode_escapes(text: str) -> bytes:
    """Text to bytes, honouring ``\\r \\n \\t \\0 \\xNN \\\\`` so single-quoted YAML can say what it means.

    Characters U+0000-U+00FF become that one byte (so ``"\\xff"`` in double-quoted YAML is the byte 0xFF);
    anything above is UTF-8.
    """
    out = bytearray()
    i = 0
    simple = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\x00", "\\": b"\\"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in simple:
                out += simple[nxt]
                i += 2
                continue
            if nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
        out += bytes([ord(ch)]) if ord(ch) < 256 else ch.encode("utf-8")
        i += 1
    return bytes(out)


# -- parsing


class _Parser:
    """Builds steps from validated data, knowing where each came from for error messages."""

    def __init__(self, root: Any, file: str | None, lines: Sequence[int] | None, prefix: list[str | int]) -> None:
        self.root = root
        self.file = file
        self.lines = lines
        self.prefix = prefix
        self.schema = load_schema("steps.schema.json")

    def fail(self, problem: str, path: list[str | int]) -> BadInput:
        line = line_of(self.root, path)
        if (line is None or line == getattr(self.root, "line", None)) and self.lines and path:
            index = path[0]
            if isinstance(index, int) and index < len(self.lines):
                line = self.lines[index]
        return BadInput(problem, file=self.file, line=line, field=field_name(self.prefix + path))

    def steps(self, data: Any, path: list[str | int]) -> tuple[Step, ...]:
        if data is None:
            return ()
        if not isinstance(data, list):
            raise self.fail("must be a list of steps", path)
        return tuple(self.step(item, [*path, i]) for i, item in enumerate(data))

    def step(self, data: Any, path: list[str | int]) -> Step:
        if isinstance(data, str) and data in ("quit", "reconnect", "expect_close"):
            data = {data: None}
        if not isinstance(data, Mapping):
            raise self.fail(f"a step is a mapping with one of: {', '.join(ACTIONS)}", path)
        actions = [k for k in data if k in ACTIONS]
        if not actions:
            unknown = ", ".join(str(k) for k in data if k not in MODIFIERS) or "nothing"
            raise self.fail(f"no action in step (found {unknown}; use one of {', '.join(ACTIONS)})", path)
        if len(actions) > 1:
            raise self.fail(f"one action per step, found {', '.join(actions)}", path)
        action = actions[0]
        self.validate(data, f"{action}_step", path)
        common: dict[str, Any] = {
            "label": data.get("as"),
            "expect": tuple(str(e).lower() for e in _as_list(data.get("expect"))),
            "on_mismatch": data.get("on_mismatch", "abort"),
        }
        value = data[action]
        here = [*path, action]
        build: Callable[[Any, list[str | int], dict[str, Any]], Step] = getattr(self, f"_{action}")
        return build(value, here, common)

    def validate(self, data: Any, definition: str, path: list[str | int]) -> None:
        """Check one step against its own definition; nested steps (``if``) are checked when built."""
        defs = dict(self.schema["$defs"])
        if definition == "if_step":
            shallow = {"type": ["array", "null"]}
            body = defs["if_body"]
            defs["if_body"] = {**body, "properties": {**body["properties"], "then": shallow, "else": shallow}}
        schema = {"$ref": f"#/$defs/{definition}", "$defs": defs}
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
        if errors:
            best = jsonschema.exceptions.best_match(errors)
            raise self.fail(describe(best), path + list(best.absolute_path))

    # one builder per action: (value, path, common) -> Step

    def _ehlo(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        return Ehlo(str(value), **common)

    def _helo(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        return Helo(str(value), **common)

    def _send(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        if "\r" in value or "\n" in value:
            raise self.fail("send is one command line (CRLF is added); use raw for several or for hostile bytes", path)
        return Send(value, **common)

    def _raw(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        data = value if isinstance(value, Mapping) else {"data": value}
        chunks_in = data["data"]
        chunks = tuple(decode_escapes(c) for c in _as_list(chunks_in))
        separate = bool(data.get("separate", isinstance(chunks_in, list)))
        settle = data.get("settle")
        return Raw(
            chunks,
            separate=separate,
            replies=data.get("replies"),
            settle=None if settle is None else float(settle),
            **common,
        )

    def _starttls(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        value = value or {}
        tls = self.tls_options(value.get("tls"), [*path, "tls"])
        inject = decode_escapes(value.get("inject", ""))
        return StartTLS(inject=inject, argument=value.get("argument"), tls=tls, **common)

    def _mail(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        if "body" in value and "size" in value:
            raise self.fail("give body or size, not both", path)
        to = tuple(_as_list(value["to"]))
        return Mail(
            value["from"], to, body=value.get("body"), size=value.get("size"), marker=value.get("marker"), **common
        )

    def _quit(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        return Quit(**common)

    def _wait(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        return Wait(float(value), **common)

    def _reconnect(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        return Reconnect(**common)

    def _expect_close(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        return ExpectClose(**common)

    def _if(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        then = self.steps(value.get("then"), [*path, "then"])
        else_ = self.steps(value.get("else"), [*path, "else"])
        return If(str(value["capability"]).upper(), then=then, else_=else_, **common)

    def _tls_policy(self, value: Any, path: list[str | int], common: dict[str, Any]) -> Step:
        data = value if isinstance(value, Mapping) else {"behaviour": value}
        behaviour = ClientTLS(data["behaviour"])
        tls = self.tls_options(data.get("tls"), [*path, "tls"])
        if behaviour is ClientTLS.REQUIRE_VERIFY:
            if (data.get("tls") or {}).get("verify") is False:
                raise self.fail("require-verify always verifies the server certificate", [*path, "tls", "verify"])
            tls = replace(tls, verify=True)
        return TLSPolicy(behaviour, ehlo=str(data.get("ehlo", DEFAULT_EHLO)), tls=tls, **common)

    def tls_options(self, data: Any, path: list[str | int]) -> TLSOptions:
        if not data:
            return TLSOptions()
        low, high = data.get("min_version"), data.get("max_version")
        if "versions" in data:
            if low is not None or high is not None:
                raise self.fail("give versions or min_version/max_version, not both", [*path, "versions"])
            low, high = data["versions"]
        low, high = _version(low), _version(high)
        if low is not None and high is not None and float(low) > float(high):
            raise self.fail(f"min version {low} is above max version {high}", path)
        if "sni" in data and "server_name" in data:
            raise self.fail("give sni or server_name, not both", [*path, "sni"])
        if data.get("ciphers") is not None and not _usable_ciphers(data["ciphers"]):
            raise self.fail(
                f"no usable cipher in {excerpt(data['ciphers'])} (an OpenSSL cipher string)", [*path, "ciphers"]
            )
        if data.get("abort_mid_handshake") and data.get("plaintext_after_220"):
            raise self.fail("abort_mid_handshake and plaintext_after_220 exclude each other", path)
        return TLSOptions(
            min_version=low,
            max_version=high,
            ciphers=data.get("ciphers"),
            verify=bool(data.get("verify", False)),
            server_name=data.get("server_name", data.get("sni")),
            client_cert=data.get("client_cert", "none"),
            abort_mid_handshake=bool(data.get("abort_mid_handshake", False)),
            plaintext_after_220=bool(data.get("plaintext_after_220", False)),
        )


def _usable_ciphers(ciphers: str) -> bool:
    """Would OpenSSL accept this cipher string? Checked at load time so the error names file and line."""
    try:
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        return False
    return True


def _version(value: Any) -> str | None:
    """``1.2``, ``"1.2"``, ``"TLSv1.2"`` -> ``"1.2"`` (the schema has already checked the spelling)."""
    if value is None:
        return None
    text = str(value)
    text = text[4:] if text.lower().startswith("tlsv") else text
    return _VERSION_NAMES[text]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def steps_from_data(
    data: Any,
    *,
    file: str | None = None,
    lines: Sequence[int] | None = None,
    where: Sequence[str | int] = ("steps",),
) -> list[Step]:
    """Build steps from parsed YAML (a list); raise ``BadInput`` naming file, line and ``steps[i].field``.

    ``data`` keeps line numbers when it comes from ``lab.yamlsource.parse_yaml``; ``lines`` (the line of each
    step) helps when it does not. ``where`` is the path of the list inside its document, for messages.
    """
    parser = _Parser(data, file, lines, list(where))
    return list(parser.steps(data, []))


def steps_schema() -> dict[str, Any]:
    """The JSON Schema fragment (draft 2020-12); a scenario schema refers to ``$defs/steps``."""
    return load_schema("steps.schema.json")
