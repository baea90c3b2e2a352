"""``index.json``: the record itself, schema-versioned, the source every other view is rebuilt from."""

from __future__ import annotations

import json
from pathlib import Path

from lab.errors import BadInput, HarnessError
from lab.report import atomic_write
from lab.scenario.result import RunResult, check_record


def dumps(result: RunResult) -> str:
    """The same run gives the same text: fixed key order, sorted free-form mappings, ASCII-only escapes."""
    data = result.to_dict()
    try:
        check_record(data)
    except BadInput as exc:  # the lab built a record it could not read back: its fault, not the user's
        raise HarnessError(f"the result record does not match index.schema.json: {exc}") from None
    return json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def write_index(result: RunResult, path: Path) -> Path:
    """Write atomically; a half-written index.json would make ``smtplab report`` fail."""
    return atomic_write(Path(path), dumps(result).encode("ascii"))
