"""Load YAML with line numbers and validate it against a JSON Schema.

Config, topology and scenario files all go through ``load_validated`` so that every error names
``file:line: field: problem`` the same way.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lab.errors import BadInput


class _Located(dict):  # type: ignore[type-arg]
    """A mapping that remembers the line of each key and of itself."""

    line: int
    key_lines: dict[str, int]


class _LocatedList(list):  # type: ignore[type-arg]
    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    pass


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
            raise BadInput(f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[str(key)] = value_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LocatedList:
    out = _LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, file: str) -> Any:
    """Parse YAML keeping line numbers; a syntax error becomes a one-line ``BadInput``."""
    try:
        return yaml.load(text, Loader=_LineLoader)
    except BadInput as exc:
        exc.file = file
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise BadInput(f"YAML syntax error: {exc.problem or exc.context}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise BadInput(f"YAML error: {exc}", file=file) from None


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
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in ``lab/schemas``."""
    text = resources.files("lab").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "enum":
        choices = ", ".join(str(c) for c in error.validator_value)
        return f"{error.instance!r} is not one of {choices}"
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown field(s)")
    return error.message


def validate(doc: Any, schema: dict[str, Any], file: str) -> None:
    """Raise ``BadInput`` for the first (deepest, earliest) schema violation of ``doc``."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(doc))
    if not errors:
        return
    best = jsonschema.exceptions.best_match(errors)
    path = list(best.absolute_path)
    raise BadInput(_describe(best), file=file, line=line_of(doc, path), field=field_name(path) or None)


def read_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file keeping line numbers; an unreadable file is a ``BadInput`` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    except UnicodeDecodeError:
        raise BadInput("not UTF-8 text", file=str(path)) from None
    return parse_yaml(text, str(path))


def load_validated(path: str | Path, schema_name: str) -> Any:
    """Read, parse and validate a YAML file; every failure is a ``BadInput`` naming file and line."""
    doc = read_yaml(path)
    validate(doc, load_schema(schema_name), str(path))
    return doc
