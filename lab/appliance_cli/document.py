"""The appliance file being edited: what is committed, what is pending, and the commit itself.

The file is read and written with ruamel.yaml's round-trip mode so that comments and key order survive an edit.
Nothing reaches the disk until ``commit``, and ``commit`` first builds the result with the real loader
(``lab.appliance.config``): a result the loader refuses is not written.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from lab.appliance.config import appliance_from_text, default_appliance_path
from lab.appliance.model import Appliance
from lab.errors import BadInput
from lab.yamlsource import read_text


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 120
    yaml.preserve_quotes = True
    return yaml


class ConfigDocument:
    """The appliance file at ``path`` (or the built-in appliance while ``path`` does not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exists = path.exists()
        source = path if self.exists else default_appliance_path()
        text = read_text(source)  # the loader's bounded reader (size, UTF-8, regular file)
        appliance_from_text(text, str(source))  # refuse a file the lab would refuse, before any edit
        try:
            loaded = _yaml().load(text)
        except YAMLError as exc:  # pragma: no cover - the loader above read the same text
            raise BadInput(f"{exc}".splitlines()[0], file=str(source)) from None
        self.committed: CommentedMap = loaded
        self.working: CommentedMap = copy.deepcopy(loaded)
        self.changes: list[str] = []

    # -- pending changes

    def note(self, change: str) -> None:
        """Record one pending change (shown by ``commit`` and ``clear``)."""
        self.changes.append(change)

    def clear(self) -> int:
        """Drop every pending change; how many there were."""
        count = len(self.changes)
        self.working = copy.deepcopy(self.committed)
        self.changes = []
        return count

    def text(self) -> str:
        out = io.StringIO()
        _yaml().dump(self.working, out)
        return out.getvalue()

    def appliance(self) -> Appliance:
        """The pending configuration as the loader builds it (``BadInput`` if it would refuse it)."""
        return appliance_from_text(self.text(), str(self.path))

    def commit(self) -> Appliance:
        """Check the pending configuration with the real loader, then write it (atomically)."""
        text = self.text()
        appliance = appliance_from_text(text, str(self.path))
        temporary = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path)
        self.committed = copy.deepcopy(self.working)
        self.changes = []
        self.exists = True
        return appliance

    # -- where things are in the working document

    def listeners(self) -> CommentedSeq:
        items: CommentedSeq = self.working["listeners"]
        return items

    def listener(self, index: int) -> CommentedMap:
        item: CommentedMap = self.listeners()[index]
        return item

    def hat(self, index: int) -> CommentedMap:
        """The listener's ``hat`` mapping, created when the file has none."""
        listener = self.listener(index)
        if not isinstance(listener.get("hat"), dict):
            listener["hat"] = CommentedMap()
        hat: CommentedMap = listener["hat"]
        return hat

    def section(self, index: int, key: str) -> CommentedMap:
        """``hat.defaults`` or similar: a mapping under the listener's HAT, created on first use."""
        hat = self.hat(index)
        if not isinstance(hat.get(key), dict):
            hat[key] = CommentedMap()
        section: CommentedMap = hat[key]
        return section

    def outbound(self) -> CommentedMap:
        """The ``outbound`` mapping, created on first use."""
        if not isinstance(self.working.get("outbound"), dict):
            self.working["outbound"] = CommentedMap()
        outbound: CommentedMap = self.working["outbound"]
        return outbound

    def outbound_map(self, key: str) -> CommentedMap:
        """``outbound.default_destination`` or ``outbound.alerts``, created on first use."""
        outbound = self.outbound()
        if not isinstance(outbound.get(key), dict):
            outbound[key] = CommentedMap()
        section: CommentedMap = outbound[key]
        return section

    def outbound_list(self, key: str, parent: CommentedMap | None = None) -> CommentedSeq:
        """``outbound.destination_controls`` (or a list under ``parent``), created on first use."""
        owner = self.outbound() if parent is None else parent
        if not isinstance(owner.get(key), list):
            owner[key] = CommentedSeq()
        items: CommentedSeq = owner[key]
        return items

    def policy(self, index: int, name: str) -> CommentedMap:
        policies = self.section(index, "policies")
        if not isinstance(policies.get(name), dict):
            policies[name] = CommentedMap()
        policy: CommentedMap = policies[name]
        return policy

    def groups(self, index: int, effective: list[tuple[str, str]]) -> CommentedSeq:
        """``hat.sender_groups`` holding every group of the effective table, in its order.

        The loader adds the predefined groups a file leaves out; an edit of the table (move, new, delete) needs
        them written down, so those are inserted where the loader would put them. ``effective`` is the table as
        the loader built it: (group name, policy) top to bottom.
        """
        hat = self.hat(index)
        if not isinstance(hat.get("sender_groups"), list):
            hat["sender_groups"] = CommentedSeq()
        groups: CommentedSeq = hat["sender_groups"]
        present = {str(item["name"]).upper() if str(item["name"]).upper() == "ALL" else item["name"] for item in groups}
        for position, (name, _policy) in enumerate(effective):
            if name not in present:
                entry = CommentedMap([("name", name)])
                if name != "ALL":
                    entry["members"] = CommentedSeq()
                groups.insert(min(position, len(groups)), entry)
        return groups


def plain(value: Any) -> Any:
    """A value of the round-trip document as plain Python (for comparisons and messages)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value
