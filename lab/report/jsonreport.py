"""``index.json``: the record itself, schema-versioned, the source every other view is rebuilt from."""

from __future__ import annotations

import json
from pathlib import Path

from lab.errors import HarnessError
from lab.report import atomic_write
from lab.scenario.result import RunResult
from lab.scenario.verdict import Verdict


def dumps(result: RunResult) -> str:
    """The same run gives the same text: fixed key order, sorted free-form mappings, ASCII-only escapes.

    The record is built from typed parts (``Observations``, transcript ``Entry``, server-log events) and the
    schema's ``observed`` fragment is derived from them, so it is not validated again on every write (that took
    a fifth of the default run); the tests validate the whole catalogue's record (tests/test_catalogue.py), and
    every reader (``smtplab report``, ``diff``) validates what it loads. The one rule no type holds is checked
    here: an XFAIL or XPASS names its deviation.
    """
    for run in result.runs:
        if run.verdict in (Verdict.XFAIL, Verdict.XPASS) and not run.deviation:
            raise HarnessError(f"the result record does not match index.schema.json: {run.name} has no deviation")
    data = result.to_dict()
    return json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def write_index(result: RunResult, path: Path) -> Path:
    """Write atomically; a half-written index.json would make ``smtplab report`` fail."""
    return atomic_write(Path(path), dumps(result).encode("ascii"))
