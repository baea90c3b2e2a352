"""The one YAML reader: bounded, with line numbers, then validated against a JSON Schema.

Appliance, topology, profile and scenario files all go through ``read_yaml`` / ``parse_yaml`` so that every
error names ``file:line: field: problem`` the same way, and so that no file can turn the loader against the
machine: the limits below are checked while the file is read and composed, before anything is built or
validated (docs/config-format.md, "Limits"). Their loaders then build the model in a ``DocumentBuilder``
subclass, which holds the document and the file name, validates against the schema and names every problem's
line with ``fail``.
"""

from __future__ import annotations

import json
import math
import re
import stat
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import yaml

from lab.errors import BadInput, excerpt

#: A YAML file larger than this is refused unread (the largest shipped file is a few KiB).
MAX_FILE_BYTES = 1024 * 1024
#: Nesting deeper than this is refused while composing, long before Python's recursion limit.
MAX_DEPTH = 64
#: Nodes in the document as aliases expand it (an alias counts the whole node it names): an alias bomb
#: ("billion laughs") stops here after a few thousand nodes of work.
MAX_NODES = 20_000
#: Characters of all scalars as aliases expand them.
MAX_TOTAL_CHARS = 2 * MAX_FILE_BYTES
#: One string value.
MAX_STRING = 64 * 1024
#: Digits of one integer (Python refuses to read more than 4300 anyway).
MAX_INT_DIGITS = 100


#: Where a value sits in a parsed document: keys and list indices from the root, e.g. ``["listeners", 0, "hat"]``.
FieldPath = list[str | int]


class _Located(dict[Any, Any]):  # YAML keys may be numbers too
    """A mapping that remembers the line of each key and of itself."""

    line: int
    key_lines: dict[str, int]


class _LocatedList(list[Any]):
    line: int
    item_lines: list[int]


def _line(mark: Any) -> int | None:
    return mark.line + 1 if mark is not None else None


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps line numbers and charges every composed node against the budgets above."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._chars = 0
        self._expanded: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (nodes, chars) it expands to

    def _charge(self, nodes: int, chars: int, mark: Any) -> None:
        self._nodes += nodes
        self._chars += chars
        if self._nodes > MAX_NODES:
            raise BadInput(f"more than {MAX_NODES} values once aliases are expanded", line=_line(mark))
        if self._chars > MAX_TOTAL_CHARS:
            raise BadInput(f"more than {MAX_TOTAL_CHARS} characters once aliases are expanded", line=_line(mark))

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # types-PyYAML leaves Parser.peek_event bare
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self._expanded.get(id(target))
                if size is None:
                    raise BadInput(
                        f"alias *{excerpt(event.anchor)} is inside its own anchor", line=_line(event.start_mark)
                    )
                self._charge(*size, event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise BadInput(f"nested more than {MAX_DEPTH} levels deep", line=_line(event.start_mark))
        before = (self._nodes, self._chars)
        self._charge(1, len(event.value) if isinstance(event, yaml.ScalarEvent) else 0, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if getattr(event, "anchor", None) is not None:
            self._expanded[id(node)] = (self._nodes - before[0], self._chars - before[1])
        return node


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Located:
    loader.flatten_mapping(node)
    out = _Located()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise BadInput("mapping keys must be plain scalars", line=key_node.start_mark.line + 1)
        if key in out:
            raise BadInput(f"duplicate key {excerpt(key)}", line=key_node.start_mark.line + 1)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[str(key)] = value_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LocatedList:
    out = _LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


def _construct_int(loader: _LineLoader, node: yaml.ScalarNode) -> int:
    if sum(ch.isdigit() for ch in node.value) > MAX_INT_DIGITS:
        raise BadInput(f"a number of more than {MAX_INT_DIGITS} digits", line=node.start_mark.line + 1)
    return loader.construct_yaml_int(node)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _check_values(doc: Any, file: str) -> None:
    """Refuse what YAML reads but no field takes: NaN and infinities, strings longer than ``MAX_STRING``.

    The walk is bounded: the document holds at most ``MAX_NODES`` values and ``MAX_DEPTH`` levels.
    """
    stack: list[tuple[Any, list[str | int]]] = [(doc, [])]
    while stack:
        value, path = stack.pop()
        problem = None
        if isinstance(value, float) and not math.isfinite(value):
            problem = f"{value} is not a finite number"
        elif isinstance(value, str) and len(value) > MAX_STRING:
            problem = f"a string of {len(value)} characters (at most {MAX_STRING})"
        elif isinstance(value, dict):
            stack.extend((v, [*path, k]) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((v, [*path, i]) for i, v in reversed(list(enumerate(value))))
        if problem:
            raise BadInput(problem, file=file, line=line_of(doc, path), field=field_name(path) or None)


def parse_yaml(text: str, file: str) -> Any:
    """Parse YAML keeping line numbers, within the limits above; any problem is a one-line ``BadInput``."""
    if len(text) > MAX_FILE_BYTES:
        raise BadInput(f"larger than {MAX_FILE_BYTES} bytes, the limit for a YAML file", file=file)
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except BadInput as exc:
        exc.file = file
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context).split())
        raise BadInput(f"YAML syntax error: {problem}", file=file, line=_line(mark)) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise BadInput(f"YAML error: character {exc.character!r} is not allowed", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise BadInput(f"YAML error: {' '.join(str(exc).split())}", file=file) from None
    _check_values(doc, file)
    return doc


def line_of(doc: Any, path: list[str | int]) -> int | None:
    """The line of the value at ``path`` inside a parsed document (the closest known ancestor's line)."""
    line = getattr(doc, "line", None)
    node = doc
    for part in path:
        if isinstance(node, _Located) and str(part) in node.key_lines:
            line = node.key_lines[str(part)]
            node = node[part] if part in node else node.get(str(part))
        elif isinstance(node, _LocatedList) and isinstance(part, int) and part < len(node):
            line = node.item_lines[part]
            node = node[part]
        else:
            break
        line = getattr(node, "line", line)
    return line


def field_name(path: list[str | int]) -> str:
    """``['listeners', 0, 'hat']`` -> ``listeners[0].hat``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else excerpt(part, quote=False))
    return out


def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in ``lab/schemas``."""
    text = resources.files("lab").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return]  # every shipped schema is a JSON object


_MESSAGES = {  # jsonschema's wording, with the value as an excerpt
    "minimum": "{shown} is less than the minimum of {rule}",
    "maximum": "{shown} is greater than the maximum of {rule}",
    "exclusiveMinimum": "{shown} is less than or equal to the minimum of {rule}",
    "exclusiveMaximum": "{shown} is greater than or equal to the maximum of {rule}",
    "minLength": "{shown} is too short (at least {rule} characters)",
    "maxLength": "{shown} is too long ({size} characters, at most {rule})",
    "minItems": "{shown} is too short (at least {rule} items)",
    "maxItems": "{shown} is too long ({size} items, at most {rule})",
    "const": "{shown} is not {rule!r}",
    "propertyNames": "{shown} is not allowed as a name",
}


def describe(error: jsonschema.ValidationError) -> str:
    """One short line for a schema violation; the offending value appears only as an excerpt.

    jsonschema's own messages repeat the whole instance, which for a hostile file can be megabytes.
    """
    # A validator sets all three on every error it yields; the stubs also allow jsonschema's "unset" marker.
    value: Any = error.instance
    rule: Any = error.validator_value
    kind = str(error.validator)
    shown = excerpt(value)
    if kind == "enum":
        return f"{shown} is not one of {', '.join(str(c) for c in rule)}"
    if kind == "type":
        return f"{shown} is not of type {', '.join(repr(t) for t in ([rule] if isinstance(rule, str) else rule))}"
    if kind in ("additionalProperties", "unevaluatedProperties") and isinstance(value, dict):
        allowed = error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
        extra = [excerpt(k) for k in value if k not in allowed]
        return f"unknown field(s) ({', '.join(extra[:3])} {'was' if len(extra) == 1 else 'were'} unexpected)"
    if kind == "required" and isinstance(value, dict):
        missing = next((k for k in rule if k not in value), "?")
        return f"{excerpt(missing)} is a required property"
    if kind == "pattern":
        single = re.fullmatch(r"\^(\[[^\]]+\])[*+]\$", rule)  # "^[allowed]*$": name the first character outside
        bad = next((ch for ch in str(value) if single and not re.fullmatch(single.group(1), ch)), None)
        if bad is not None:
            what = "the control character" if not bad.isprintable() else "the character"
            return f"{shown} contains {what} {bad!r}, which is not allowed here"
        return f"{shown} does not match {excerpt(rule)}"
    if kind in ("minLength", "minItems") and rule == 1:
        return f"{shown} should be non-empty"
    if kind in _MESSAGES:
        size = len(value) if isinstance(value, str | list | dict) else 0
        return _MESSAGES[kind].format(shown=shown, rule=rule, size=size)
    if kind in ("oneOf", "anyOf"):
        return f"{shown} is not valid under any of the given schemas"
    return f"{shown} is not valid under the schema's {kind} rule"


def validate(doc: Any, schema: dict[str, Any], file: str) -> None:
    """Raise ``BadInput`` for the first (deepest, earliest) schema violation of ``doc``."""
    if not isinstance(doc, dict) and schema.get("type") == "object":
        kind = "a list" if isinstance(doc, list) else "a single value"
        what = "empty" if doc is None else f"{kind} ({excerpt(doc)}), not a mapping of fields"
        raise BadInput(f"the file is {what}", file=file, line=getattr(doc, "line", 1))
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(doc))
    if not errors:
        return
    best = jsonschema.exceptions.best_match(errors)
    path = list(best.absolute_path)
    if best.validator == "propertyNames":  # the path points at the mapping; name the offending key
        path = [*path, best.instance]
    raise BadInput(describe(best), file=file, line=line_of(doc, path), field=field_name(path) or None)


def read_text(path: str | Path, name: str | None = None) -> str:
    """A UTF-8 text file of at most ``MAX_FILE_BYTES``; anything else is a ``BadInput`` naming it (``name``)."""
    path = Path(path)
    shown = str(path) if name is None else name
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise BadInput("is a directory, not a file", file=shown)
        if not stat.S_ISREG(mode):
            raise BadInput("not a regular file", file=shown)
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise BadInput(f"cannot read: {getattr(exc, 'strerror', None) or exc}", file=shown) from None
    if len(data) > MAX_FILE_BYTES:
        raise BadInput(f"larger than {MAX_FILE_BYTES} bytes, the limit for this file", file=shown)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BadInput(f"not UTF-8 text (byte 0x{data[exc.start]:02x})", file=shown, line=line) from None


def read_yaml(path: str | Path, name: str | None = None) -> Any:
    """Read and parse a YAML file keeping line numbers; errors name the file as ``name`` (default: the path)."""
    return parse_yaml(read_text(path, name), str(path) if name is None else name)


class DocumentBuilder:
    """The base of every loader's builder: one parsed document, the name of its file, and ``fail``.

    A subclass names its JSON Schema in ``SCHEMA`` (a file in ``lab/schemas``), calls ``validate()`` once the
    document is normalised, then builds the model, raising ``self.fail(problem, path)`` for anything the schema
    cannot say (duplicates, cross-references, values checked by code): the error names ``file:line: field``.
    """

    SCHEMA: ClassVar[str] = ""

    def __init__(self, doc: Any, file: str) -> None:
        self.doc = doc
        self.file = file

    def fail(self, problem: str, path: FieldPath) -> BadInput:
        """The error for ``problem`` at ``path`` (``problem`` quotes user values through ``lab.errors.excerpt``)."""
        return BadInput(problem, file=self.file, line=self.line(path), field=field_name(path) or None)

    def line(self, path: FieldPath) -> int | None:
        """The line of the value at ``path``."""
        return line_of(self.doc, path)

    def validate(self) -> None:
        """Check the document against ``SCHEMA``; the first violation is a ``BadInput`` at its line."""
        validate(self.doc, load_schema(self.SCHEMA), self.file)
