"""The result record: one ``CaseRun`` per case x policy x target, gathered in a ``RunResult``.

Every report (terminal, index.json, junit.xml, index.html) is a view of this record, and ``smtplab report DIR``
rebuilds the views from ``index.json`` alone, so ``to_dict`` / ``from_dict`` must round-trip exactly and write
the same bytes for the same run: the record's own keys in a fixed order; free-form mappings (``observed``,
``conditions``) keep the order the runner built them in (``replies`` in step order), which JSON preserves.
The observations are typed (``lab.scenario.observations``) and the transcript is structured entries
(``lab.smtp.transcript.Entry``), the server log typed mail-log events; older records (schema_version 1:
rendered transcript lines; 1 and 2: server-log lines) are upgraded on reading.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lab import __version__
from lab.appliance.maillog import log_record
from lab.errors import BadInput, HarnessError
from lab.policy.modes import DeliveryTLS, TLSMode, run_policy
from lab.scenario.observations import Observations
from lab.scenario.verdict import ORDER, SpecRef, Verdict, exit_code
from lab.scenario.verdict import Level as Level  # re-exported: the record's readers name it from here
from lab.smtp.transcript import Entry, from_legacy_line, render
from lab.yamlsource import load_schema, validate

SCHEMA_VERSION = 4
#: Older versions this smtplab still reads, upgraded by ``upgrade`` (4 added the sender runs: the Verify
#: policies and the ``outcome`` / ``starttls_sent`` / ``plaintext_after_220`` observations).
READABLE_VERSIONS = (1, 2, 3, SCHEMA_VERSION)
SCHEMA_NAME = "index.schema.json"
TOOL = f"smtplab {__version__}"


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # coercion inside __post_init__ of a frozen dataclass


@dataclass(frozen=True)
class Expected:
    """The expectation alternative that decided the verdict (its verdict, label and conditions)."""

    verdict: Verdict
    label: str
    conditions: Any = None

    def __post_init__(self) -> None:
        _set(self, "verdict", Verdict(self.verdict))

    def to_dict(self) -> dict[str, Any]:
        conditions = _json_data(self.conditions, "expected.conditions")
        return {"verdict": str(self.verdict), "label": self.label, "conditions": conditions}


@dataclass(frozen=True)
class TLSInfo:
    version: str
    cipher: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "cipher": self.cipher}


@dataclass(frozen=True)
class Timings:
    """Virtual seconds on the run's clock; wall milliseconds (None when timestamps are off, for diffable output)."""

    virtual_s: float = 0.0
    wall_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"virtual_s": self.virtual_s, "wall_ms": self.wall_ms}


@dataclass(frozen=True)
class Target:
    """A system under test: ``lab:Inboundmail``, ``postfix-may``, ``HOST:PORT``; policy None = varies per case.

    A sender under test (``smtplab run --sender``) has the destination control it is declared to apply."""

    name: str
    address: str
    policy: TLSMode | DeliveryTLS | None = None
    address_map: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.policy is not None:
            _set(self, "policy", run_policy(self.policy))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "address": self.address, "policy": _opt_str(self.policy)}
        if self.address_map is not None:
            out["address_map"] = dict(sorted(self.address_map.items()))
        return out


def _entry(value: Any) -> Entry:
    """An ``Entry``, its dict form (index.json), or a rendered line (hand-built records, version 1)."""
    if isinstance(value, Entry):
        return value
    if isinstance(value, dict):
        return Entry.from_dict(value)
    if isinstance(value, str):
        try:
            return from_legacy_line(value)
        except ValueError as exc:
            raise HarnessError(str(exc)) from None
    raise HarnessError(f"transcript entry expected, got {type(value).__name__}")


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _coerce(value: Any, cls: type) -> Any:
    """Accept the dict form of a part (as the JSON has it), or any object with ``to_dict()`` giving that form
    (``lab.scenario.model.SpecRef``, ``Alternative``), wherever the dataclass is expected."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict) and callable(getattr(value, "to_dict", None)):
        value = value.to_dict()
    if isinstance(value, dict):
        try:
            return cls(**value)
        except (TypeError, ValueError) as exc:
            raise HarnessError(f"{cls.__name__}: {exc}") from None
    raise HarnessError(f"{cls.__name__} expected, got {type(value).__name__}")


@dataclass(frozen=True, kw_only=True)
class CaseRun:
    """What one case did under one policy against one target, and the verdict on it."""

    case: str
    title: str
    section: str
    spec_refs: list[SpecRef] = field(default_factory=list)
    description: str = ""
    expectation: str = ""
    client: str
    target: str
    policy: TLSMode | DeliveryTLS  # a sender run's Verify settings are DeliveryTLS
    carrier: str
    verdict: Verdict
    reason: str
    expected: Expected | None = None
    observed: Observations = field(default_factory=Observations)
    transcript: list[Entry] = field(default_factory=list)
    tls: TLSInfo | None = None
    timings: Timings = field(default_factory=Timings)
    capture: str | None = None
    keylog: str | None = None
    deviation: str | None = None

    def __post_init__(self) -> None:
        _set(self, "policy", run_policy(self.policy))
        _set(self, "verdict", Verdict(self.verdict))
        _set(self, "spec_refs", [_coerce(r, SpecRef) for r in self.spec_refs])
        _set(self, "expected", _coerce(self.expected, Expected))
        _set(self, "tls", _coerce(self.tls, TLSInfo))
        _set(self, "timings", _coerce(self.timings, Timings))
        _set(self, "observed", Observations.from_dict(self.observed))
        _set(self, "transcript", [_entry(e) for e in self.transcript])

    @property
    def lines(self) -> list[str]:
        """The transcript as swaks-style text (a view of the entries)."""
        return render(self.transcript)

    @property
    def name(self) -> str:
        """``CASE[policy]``: how reports name this run."""
        return f"{self.case}[{self.policy}]"

    def to_dict(self) -> dict[str, Any]:
        where = f"runs[{self.name}]"
        return {
            "case": self.case,
            "title": self.title,
            "section": self.section,
            "spec_refs": [r.to_dict() for r in self.spec_refs],
            "description": self.description,
            "expectation": self.expectation,
            "client": self.client,
            "target": self.target,
            "policy": str(self.policy),
            "carrier": self.carrier,
            "verdict": str(self.verdict),
            "reason": self.reason,
            "expected": None if self.expected is None else self.expected.to_dict(),
            "observed": _json_data(self.observed.to_dict(), f"{where}.observed"),
            "transcript": [e.to_dict() for e in self.transcript],
            "tls": None if self.tls is None else self.tls.to_dict(),
            "timings": self.timings.to_dict(),
            "capture": self.capture,
            "keylog": self.keylog,
            "deviation": self.deviation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseRun:
        """From an already validated mapping (``RunResult.from_dict`` validates)."""
        return cls(**data)


SENDER_CASE_PREFIX = "SND-"


def is_sender_run(run: CaseRun) -> bool:
    """A receiver case run against a sender (``smtplab run --sender``): its ``client`` names the receiver case and
    its ``target`` the sender under test."""
    return run.case.startswith(SENDER_CASE_PREFIX)


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One run of the suite: its settings, its targets and every ``CaseRun``, in run order."""

    schema_version: int = SCHEMA_VERSION
    tool: str = TOOL
    seed: int
    carrier: str
    started: str | None = None
    targets: list[Target] = field(default_factory=list)
    address_map: dict[str, str] = field(default_factory=dict)
    runs: list[CaseRun] = field(default_factory=list)

    def __post_init__(self) -> None:
        _set(self, "targets", [_coerce(t, Target) for t in self.targets])
        _set(self, "runs", [_coerce(r, CaseRun) for r in self.runs])

    def counts(self) -> dict[Verdict, int]:
        """Every verdict (zeros included) in the report order ``lab.scenario.verdict.ORDER``."""
        out = dict.fromkeys(ORDER, 0)
        for run in self.runs:
            out[run.verdict] += 1
        return out

    def exit_code(self) -> int:
        return exit_code([r.verdict for r in self.runs])

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": self.tool,
            "seed": self.seed,
            "carrier": self.carrier,
            "started": self.started,
            "targets": [t.to_dict() for t in self.targets],
            "address_map": dict(sorted(self.address_map.items())),
            "runs": [r.to_dict() for r in self.runs],
        }

    @classmethod
    def from_dict(cls, data: Any, file: str | None = None) -> RunResult:
        """Validate against ``lab/schemas/index.schema.json`` and build; a bad record is ``BadInput``."""
        data = check_record(data, file)
        return cls(
            schema_version=data["schema_version"],
            tool=data["tool"],
            seed=data["seed"],
            carrier=data["carrier"],
            started=data["started"],
            targets=[Target(**t) for t in data["targets"]],
            address_map=dict(data["address_map"]),
            runs=[CaseRun.from_dict(r) for r in data["runs"]],
        )


@lru_cache(maxsize=1)
def index_schema() -> dict[str, Any]:
    return load_schema(SCHEMA_NAME)


def check_record(data: object, file: str | None = None) -> dict[str, Any]:
    """The record in the current version (an upgraded copy of an older one); ``BadInput`` (file, field) unless
    ``data`` is an index.json record this version reads."""
    where = file or "index.json"
    if not isinstance(data, dict):
        raise BadInput("the record must be a JSON object", file=where)
    version = data.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise BadInput(
            f"unsupported schema_version {version!r} (this smtplab reads {readable})",
            file=where,
            field="schema_version",
        )
    if version != SCHEMA_VERSION:
        data = copy.deepcopy(data)
        upgrade(data, where)
    validate(data, index_schema(), where)
    return data


def upgrade(data: dict[str, Any], where: str = "index.json") -> None:
    """Bring a schema_version 1 or 2 record to the current version, in place.

    Version 1 stored each transcript line as its rendered text; the marker (``->``, ``~>``, ``<-``, ``<~``,
    ``<**``, ``===``) gives the entry's direction and layer, and the fields version 1 never had stay null.
    Versions 1 and 2 stored the server log as lines without timestamps; each is read back into its event
    (``lab.appliance.maillog.log_record``), the only place a rendered log line is parsed.
    """
    runs = data.get("runs")
    for i, run in enumerate(runs if isinstance(runs, list) else []):
        if not isinstance(run, dict):
            continue
        _upgrade_list(run, "transcript", lambda line: from_legacy_line(line).to_dict(), f"runs[{i}]", where)
        observed = run.get("observed")
        if isinstance(observed, dict):
            _upgrade_list(observed, "server_log", log_record, f"runs[{i}].observed", where)
    data["schema_version"] = SCHEMA_VERSION


def _upgrade_list(holder: dict[str, Any], key: str, convert: Any, path: str, where: str) -> None:
    """Replace the strings of ``holder[key]`` by ``convert(string)``; anything else is left for the schema."""
    items = holder.get(key)
    if not isinstance(items, list):
        return
    out: list[Any] = []
    for j, item in enumerate(items):
        try:
            out.append(convert(item) if isinstance(item, str) else item)
        except (ValueError, BadInput) as exc:
            message = exc.problem if isinstance(exc, BadInput) else str(exc)
            raise BadInput(message, file=where, field=f"{path}.{key}[{j}]") from None
    holder[key] = out


def load_index(path: str | Path) -> RunResult:
    """Read ``index.json``; a missing, unreadable, non-JSON or wrong-schema file is a one-line ``BadInput``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput("no such file (run `smtplab run` first, or name a report directory)", file=str(path)) from None
    except OSError as exc:
        raise BadInput(f"cannot read: {exc.strerror}", file=str(path)) from None
    except UnicodeDecodeError:
        raise BadInput("not UTF-8 text", file=str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"not JSON: {exc.msg}", file=str(path), line=exc.lineno) from None
    return RunResult.from_dict(data, file=str(path))


def _json_data(value: Any, where: str) -> Any:
    """A plain copy of JSON data, order kept; anything else (bytes, sets, NaN) is a lab fault, not the user's."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HarnessError(f"{where}: {value!r} is not JSON")
        return value
    if isinstance(value, list | tuple):
        return [_json_data(v, where) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key in value:
            if not isinstance(key, str):
                raise HarnessError(f"{where}: key {key!r} is not a string")
            out[key] = _json_data(value[key], f"{where}.{key}")
        return out
    raise HarnessError(f"{where}: {type(value).__name__} is not JSON data")
