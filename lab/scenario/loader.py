"""Load scenario cases: YAML with line numbers, the scenario JSON Schema, then the checks a schema cannot make.

Every error is one ``lab.errors.BadInput`` printed as ``FILE:LINE: field: problem``. A selection is a mix of
files, directories and id prefixes (h2spec style: ``3207-4`` selects ``3207-4-01`` and ``3207-4.2-01``);
nothing selects the whole catalogue, which ships inside the package (``lab/catalogue``, the same files as
``scenarios/`` in a checkout).
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

from lab.errors import BadInput, excerpt
from lab.scenario.facts import substitute
from lab.scenario.logevents import EVENTS
from lab.scenario.model import (
    CODE_PATTERN,
    LAB_ONLY_KEYS,
    OBSERVATION_KEYS,
    POLICIES,
    Absent,
    AllOf,
    Alternative,
    Case,
    ClientSpec,
    CodeClass,
    Condition,
    Equals,
    Expectation,
    Has,
    Match,
    Middlebox,
    Not,
    OneOf,
    RemoteMTA,
    Test,
    id_section,
    natural_key,
)
from lab.scenario.verdict import Level, SpecRef, Verdict
from lab.yamlsource import DocumentBuilder, FieldPath, describe, line_of, load_schema, read_yaml

STEPS_URI = "https://smtplab.invalid/schemas/steps.schema.json"
SUFFIXES = (".yaml", ".yml")


def catalogue_dir() -> Path:
    """The built-in catalogue: package data, so it is there in a checkout and when installed.

    In a checkout ``lab/catalogue`` is a symlink to ``scenarios/``; resolving it shows users the file they edit.
    """
    return Path(str(resources.files("lab").joinpath("catalogue"))).resolve()


def _display(path: Path) -> str:
    """A path as the user should read it: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    """The scenario schema with the steps schema registered under the URI it ``$ref``s."""
    steps = load_schema("steps.schema.json")
    resource = Resource.from_contents(steps)
    registry: Registry = Registry().with_resources([(STEPS_URI, resource)])
    if steps.get("$id") and steps["$id"] != STEPS_URI:
        registry = registry.with_resource(steps["$id"], resource)
    return jsonschema.Draft202012Validator(load_schema("scenario.schema.json"), registry=registry)


@functools.lru_cache(maxsize=1)
def behaviour_names() -> frozenset[str] | None:
    """The client behaviours the lab knows (``lab.smtp.behaviours.BEHAVIOURS``); ``None`` if that part is absent."""
    try:
        module = importlib.import_module("lab.smtp.behaviours")
    except ImportError:
        return None
    return frozenset(module.BEHAVIOURS)


class _CaseReader(DocumentBuilder):
    """Checks one parsed document and builds its ``Case``; ``fail`` names file, line and field."""

    def __init__(self, doc: Any, file: str, facts: Mapping[str, Any] | None = None) -> None:
        super().__init__(doc, file)
        self.source = copy.deepcopy(doc)
        self.facts = facts  # a target's declared facts; None: the lab's own (the file's ``facts:`` values)

    def normalise(self) -> None:
        """YAML 1.1 reads the policy name ``no`` as false: give it its name back (keeping line numbers)."""
        expect = self.doc.get("expect")
        if isinstance(expect, dict) and False in expect:
            items = list(expect.items())
            expect.clear()
            expect.update(("no" if k is False else k, v) for k, v in items)
            lines = getattr(expect, "key_lines", None)
            if lines is not None and "False" in lines:
                lines["no"] = lines.pop("False")
        policies = self.doc.get("policies")
        if isinstance(policies, list):
            policies[:] = ["no" if p is False else p for p in policies]
        remote = self.doc.get("remote_mta")
        if isinstance(remote, dict) and isinstance(remote.get("starttls"), int):
            remote["starttls"] = str(remote["starttls"])  # 454 written bare

    def fill_facts(self) -> None:
        """Put the facts' values (the lab's, or a target's) where the file writes ``${name}``."""
        lab = self.doc.get("facts")
        values = dict(lab) if isinstance(lab, Mapping) else {}
        if self.facts is not None:
            values.update({k: v for k, v in self.facts.items() if k in values})
        for key in [k for k in self.doc if k not in ("facts", "id")]:
            try:
                self.doc[key] = substitute(self.doc[key], values)
            except KeyError as exc:
                raise self.fail(f"${{{exc.args[0]}}} names no fact of this case's facts", [key]) from None
            except TypeError as exc:
                raise self.fail(f"a placeholder does not fit its fact's value: {exc}", [key]) from None

    def validate(self) -> None:
        """The scenario schema (with the steps schema it refers to), with messages that name known fields."""
        if not isinstance(self.doc, Mapping):
            raise BadInput("a scenario file is a mapping (id, title, refs, ...)", file=self.file, line=1)
        self.normalise()
        self.fill_facts()
        errors = list(_validator().iter_errors(self.doc))
        if not errors:
            return
        if any(list(e.absolute_path)[:2] == ["client", "steps"] for e in errors):
            self.steps()  # the steps parser names the step and field more precisely; raises if it finds it
        best = jsonschema.exceptions.best_match(errors)
        path: FieldPath = list(best.absolute_path)
        if best.validator == "additionalProperties" and isinstance(best.instance, Mapping):
            allowed = best.schema.get("properties", {})
            extra = [k for k in best.instance if k not in allowed]
            if extra:
                known = ", ".join(allowed)
                raise self.fail(f"unknown field {excerpt(extra[0])} (known: {known})", [*path, extra[0]])
        raise self.fail(_describe(best), path)

    def steps(self) -> tuple[Any, ...]:
        from lab.smtp.steps import steps_from_data

        data = self.doc["client"]["steps"]
        return tuple(steps_from_data(data, file=self.file, where=("client", "steps")))

    def build(self) -> Case:
        self.validate()
        doc = self.doc
        case_id = doc["id"]
        section = doc.get("section") or id_section(case_id)
        if case_id[0].isdigit() and section != id_section(case_id):
            raise self.fail(
                f"section {excerpt(section)} does not match the id (expected {id_section(case_id)!r})", ["section"]
            )
        refs = tuple(SpecRef(r["ref"], Level(r["level"]), r["text"]) for r in doc["refs"])
        policies = tuple(p for p in POLICIES if p in doc.get("policies", POLICIES))
        expect = self.expect(doc["expect"], policies)
        client = self.client(doc["client"], case_id)
        middlebox = Middlebox(**doc["middlebox"]) if "middlebox" in doc else None
        remote = RemoteMTA(**doc["remote_mta"]) if "remote_mta" in doc else None
        if remote is not None and "target" in doc:
            raise self.fail("a case runs against a listener (target) or the remote MTA, not both", ["remote_mta"])
        requires = set(doc.get("requires", ()))
        requires |= self.derived_requirements(expect)
        self.check_alternative_refs(refs, expect)
        return Case(
            id=case_id,
            title=doc["title"],
            section=section,
            refs=refs,
            description=doc["description"].strip(),
            expectation=doc["expectation"].strip(),
            client=client,
            expect=expect,
            target=doc.get("target"),
            requires=tuple(sorted(requires)),
            middlebox=middlebox,
            remote_mta=remote,
            policies=policies,
            verify_client=bool(doc.get("verify_client", False)),
            server_cert=doc.get("server_cert"),
            policy_behaviour=doc.get("policy_behaviour"),
            policy_params=dict(doc.get("policy_params", {})),
            facts=dict(doc.get("facts", {})),
            source=self.source,
            file=self.file,
            line=getattr(doc, "key_lines", {}).get("id"),
        )

    def derived_requirements(self, expect: Expectation) -> set[str]:
        """Lab-only needs that follow from other fields, so authors need not repeat them in ``requires``."""
        doc = self.doc
        out = set()
        if "middlebox" in doc:
            out.add("middlebox")
        if "remote_mta" in doc:
            out.add("remote-mta")
        facts = doc.get("facts", {})
        if doc.get("verify_client") and "client_cert" not in facts:
            out.add("client-cert-ca")
        if "server_cert" in doc:
            out.add("server-cert")
        # Facts stand for the policy parameters the lab sets: a target declares its own values instead.
        if ("policy_params" in doc and not facts) or "policy_behaviour" in doc:
            out.add("policy-config")
        if "target" in doc:
            out.add("listener")
        for alternatives in expect.by_policy.values():
            for alt in alternatives:
                for cond in alt.when:
                    top = cond.key.split(".", 1)[0]
                    if top in LAB_ONLY_KEYS:
                        out.add(LAB_ONLY_KEYS[top])
        return out

    def client(self, data: Mapping[str, Any], case_id: str) -> ClientSpec:
        has_behaviour, has_steps = "behaviour" in data, "steps" in data
        if has_behaviour == has_steps:
            raise self.fail("give exactly one of behaviour or steps", ["client"])
        behaviour = data.get("behaviour")
        known = behaviour_names()
        if behaviour is not None and known is not None and behaviour not in known:
            raise self.fail(
                f"unknown behaviour {excerpt(behaviour)} (known: {', '.join(sorted(known))})", ["client", "behaviour"]
            )
        steps = self.steps() if has_steps else None
        rcpt = data.get("rcpt_to", ("bob@example.com",))
        return ClientSpec(
            host=data["host"],
            behaviour=behaviour,
            steps=steps,
            ehlo=data.get("ehlo"),
            mail_from=data.get("mail_from", "alice@example.net"),
            rcpt_to=(rcpt,) if isinstance(rcpt, str) else tuple(rcpt),
            body_marker=data.get("body_marker"),
        )

    def expect(self, data: Mapping[str, Any], policies: Sequence[str]) -> Expectation:
        for policy in data:
            if policy != "any" and policy not in policies:
                raise self.fail(
                    f"policy {excerpt(policy)} is not among this case's policies ({', '.join(policies)})",
                    ["expect", policy],
                )
        for policy in policies:
            if policy not in data and "any" not in data:
                raise self.fail(
                    f"no alternatives for policy {policy!r} (give expect.{policy} or expect.any)", ["expect"]
                )
        by_policy = {
            policy: tuple(self.alternative(alt, ["expect", policy, i]) for i, alt in enumerate(alts))
            for policy, alts in data.items()
        }
        return Expectation(by_policy)

    def alternative(self, data: Mapping[str, Any], path: FieldPath) -> Alternative:
        when = data.get("when") or {}
        conditions = tuple(self.condition(str(k), v, [*path, "when", str(k)]) for k, v in when.items())
        return Alternative(Verdict(data["verdict"]), data["label"], conditions, data.get("ref"))

    def check_alternative_refs(self, refs: tuple[SpecRef, ...], expect: Expectation) -> None:
        """The verdict of an alternative is the level of the rule it breaks: FAILED cites a MUST of the case's
        refs, NON-STRICT a SHOULD; any ``ref`` names one of the case's refs."""
        wanted = {Verdict.FAILED: Level.MUST, Verdict.NON_STRICT: Level.SHOULD}
        for policy, alternatives in expect.by_policy.items():
            for i, alt in enumerate(alternatives):
                where: FieldPath = ["expect", policy, i, "ref"]
                levels = {r.level for r in refs if r.ref == alt.ref}
                if alt.ref is not None and not levels:
                    names = ", ".join(dict.fromkeys(r.ref for r in refs))
                    raise self.fail(f"{alt.ref!r} is not one of the case's refs ({names})", where)
                level = wanted.get(alt.verdict)
                if level is not None and level not in levels:
                    raise self.fail(
                        f"a {alt.verdict} alternative must cite a {level} ref of the case (ref: ...)", where[:-1]
                    )

    def condition(self, key: str, value: Any, path: FieldPath) -> Condition:
        top, _, sub = key.partition(".")
        if top not in OBSERVATION_KEYS:
            close = difflib.get_close_matches(top, OBSERVATION_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(sorted(OBSERVATION_KEYS))
            raise self.fail(f"unknown observation key {excerpt(top)} ({hint})", path)
        kind: str = OBSERVATION_KEYS[top]
        if kind == "exposure" and sub:
            if sub not in ("envelope", "body"):
                raise self.fail(f"plaintext_exposure has envelope and body, not {excerpt(sub)}", path)
            kind = "bool"
        elif kind == "codes" and sub:
            kind = "code"
        elif kind == "events":
            if sub not in EVENTS:
                raise self.fail(f"log names an event: log.EVENT, one of {', '.join(EVENTS)}", path)
            kind = EVENTS[sub][0]
        elif sub:
            raise self.fail(f"{top} is not a mapping: drop {excerpt('.' + sub)}", path)
        return Condition(key, self.test(value, kind, key, path), _plain(value))

    def test(self, value: Any, kind: str, key: str, path: FieldPath) -> Test:
        if isinstance(value, Mapping):
            if not value:
                raise self.fail("an empty condition; use {absent: true} or a value", path)
            tests = [self.operator(str(op), arg, kind, key, [*path, str(op)]) for op, arg in value.items()]
            return tests[0] if len(tests) == 1 else AllOf(tuple(tests))
        if isinstance(value, list):
            if not value:
                raise self.fail("an empty list matches nothing; give the values it may take", path)
            return OneOf(tuple(self.test(v, kind, key, [*path, i]) for i, v in enumerate(value)))
        return self.scalar(value, kind, key, path)

    def operator(self, op: str, arg: Any, kind: str, key: str, path: FieldPath) -> Test:
        if op == "not":
            return Not(self.test(arg, kind, key, path))
        if op == "absent":
            if not isinstance(arg, bool):
                raise self.fail("absent takes true or false", path)
            return Absent(arg)
        if op in ("match", "has"):
            if not isinstance(arg, str):
                raise self.fail(f"{op} takes a regular expression (a string)", path)
            try:
                re.compile(arg)
            except re.error as exc:
                raise self.fail(f"bad regular expression: {exc}", path) from None
            if op == "has" and kind != "lines":
                raise self.fail(f"has is for lists of lines (server_log); {key} is a {_kind_name(kind)}", path)
            if op == "match" and kind != "str":
                raise self.fail(f"match is for strings; {key} is a {_kind_name(kind)}", path)
            return Has(arg) if op == "has" else Match(arg)
        raise self.fail(f"unknown operator {excerpt(op)} (use not, match, has or absent)", path)

    def scalar(self, value: Any, kind: str, key: str, path: FieldPath) -> Test:
        if value is None:
            raise self.fail("null is not a value to compare; use {absent: true}", path)
        if kind == "code":
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return Equals(value)
            if isinstance(value, str) and CODE_PATTERN.match(value):
                return CodeClass(value.lower())
            raise self.fail(f'{excerpt(value)} is not a reply code or class (250, "5xx", "4xx|5xx")', path)
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(f"{key} is true or false, not {excerpt(value)}", path)
            return Equals(value)
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(f"{key} is a number, not {excerpt(value)}", path)
            return Equals(value)
        if kind == "str":
            if not isinstance(value, str):
                raise self.fail(f"{key} is a string, not {excerpt(value)}", path)
            return Equals(value)
        if kind == "lines":
            raise self.fail(f"{key} is a list of lines: use {{has: REGEX}}", path)
        example = "replies.MAIL" if kind == "codes" else "plaintext_exposure.envelope"
        raise self.fail(f"{key} is a mapping: name one entry with a dotted key, e.g. {example}", path)


def _kind_name(kind: str) -> str:
    return {"code": "reply code", "bool": "boolean", "int": "number", "str": "string"}.get(kind, kind)


def _plain(value: Any) -> Any:
    """Located YAML containers back to plain dict/list, for reports and JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "pattern" and list(error.absolute_path) == ["id"]:
        return f"{excerpt(error.instance)} is not a case id (RFC-SECTION-NN like 3207-4.2-01, POL-WORD-NN, ATK-WORD-NN)"
    return describe(error)


def load_case_file(path: str | Path) -> Case:
    """One scenario file; every problem is a ``BadInput`` naming file, line and field."""
    path = Path(path)
    shown = _display(path)
    doc = read_yaml(path, shown)
    if doc is None:
        raise BadInput(
            "empty file: a scenario needs id, title, refs, description, expectation, client, expect", file=shown
        )
    return _CaseReader(doc, shown).build()


def with_facts(case: Case, facts: Mapping[str, Any]) -> Case:
    """The case rebuilt with a target's declared facts in place of the lab's values."""
    if not case.facts or case.source is None:
        return case
    return _CaseReader(copy.deepcopy(case.source), case.file or case.id, facts).build()


def check_client_hosts(cases: Iterable[Case], hosts: Collection[str]) -> None:
    """Every case's ``client.host`` is a host of the topology it runs in; else a ``BadInput`` at its line."""
    for case in cases:
        if case.client.host in hosts:
            continue
        line = case.line
        if case.file:
            line = line_of(read_yaml(case.file), ["client", "host"]) or line
        raise BadInput(
            f"unknown host {excerpt(case.client.host)} (known: {', '.join(sorted(hosts))})",
            file=case.file,
            line=line,
            field="client.host",
        )


#: The receiver cases (``lab.sender.cases``) share the catalogue directory but not this format.
SENDER_CASES = "senders"


def _files_under(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in SUFFIXES and p.is_file() and SENDER_CASES not in p.relative_to(directory).parts[:1]
    )


def _load_files(files: Iterable[Path]) -> list[Case]:
    """Load and check ids unique across all of them (a duplicate names both files)."""
    seen: dict[str, Case] = {}
    out = []
    for file in files:
        case = load_case_file(file)
        if case.id in seen:
            first = seen[case.id]
            raise BadInput(
                f"duplicate id {case.id!r} (also in {first.where()})", file=case.file, line=case.line, field="id"
            )
        seen[case.id] = case
        out.append(case)
    return out


def _selects(prefix: str, case_id: str) -> bool:
    """h2spec-style: ``3207-4`` selects ``3207-4-01`` and ``3207-4.2-01``; ``ATK`` selects every attack."""
    p, c = prefix.upper().rstrip("-"), case_id.upper()
    return c == p or c.startswith(p + "-") or c.startswith(p + ".")


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(SUFFIXES) or text in (".", "..")


def load_cases(selectors: Sequence[str | Path] | None = None) -> list[Case]:
    """The cases named by files, directories and id prefixes; none: the whole built-in catalogue.

    Cases come out in id order (RFC sections numerically, then POL, then ATK), each once.
    """
    selectors = list(selectors or [])
    if not selectors:
        return sorted(_load_files(_files_under(catalogue_dir())), key=lambda c: natural_key(c.id))
    files: dict[Path, Path] = {}
    prefixes: list[str] = []
    for sel in selectors:
        text = str(sel)
        path = Path(text)
        if path.is_dir():
            files.update((f.resolve(), f) for f in _files_under(path))
        elif path.is_file():
            files.setdefault(path.resolve(), path)
        elif isinstance(sel, Path) or _looks_like_path(text):
            raise BadInput("no such file or directory", file=text)
        else:
            prefixes.append(text)
    picked = {c.id: c for c in _load_files(files.values())}
    if prefixes:
        catalogue = _load_files(_files_under(catalogue_dir()))
        for prefix in prefixes:
            hits = [c for c in catalogue if _selects(prefix, c.id)]
            if not hits:
                raise BadInput(f"no case id starts with {prefix!r} (smtplab list shows them)", field="selection")
            for case in hits:
                other = picked.setdefault(case.id, case)
                if other is not case and Path(str(other.file)).resolve() != Path(str(case.file)).resolve():
                    raise BadInput(
                        f"duplicate id {case.id!r} (also in {case.where()})",
                        file=other.file,
                        line=other.line,
                        field="id",
                    )
    return sorted(picked.values(), key=lambda c: natural_key(c.id))
