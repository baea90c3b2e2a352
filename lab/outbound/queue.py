"""The appliance's durable delivery queue: what it has accepted for delivery elsewhere, and each item's state.

One item is one message for one recipient domain (a message for two domains is two items: each domain has its
own MX hosts, destination control and fate). The message bytes go into a Maildir (``lab.appliance.spool``:
written, fsynced, linked, directory fsynced), then the item's envelope and state into ``state/<name>.json``
(written to a temporary name, fsynced, renamed, directory fsynced). ``enqueue`` returns only then, so a listener
that relays answers 250 only once both are on disk; ``OutboundQueue(root)`` over the same directory after a
restart sees every item as it was last saved and the engine goes on from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lab.appliance.spool import Maildir, SpoolError


class QueueState:
    QUEUED = "queued"  # waiting for its next attempt
    DELIVERED = "delivered"
    BOUNCED = "bounced"


@dataclass(frozen=True)
class QueuedRecipient:
    rid: int
    address: str
    state: str = QueueState.QUEUED  # queued | delivered | bounced
    reason: str = ""  # the last reply or problem (the DSN's Diagnostic-Code)
    status: str = ""  # the enhanced status code (RFC 3463) of that reply, when known


@dataclass(frozen=True)
class QueueItem:
    """One message for one domain: the envelope, the recipients' states and the retry bookkeeping."""

    name: str  # the message file's name in the queue's Maildir
    mid: int
    sender: str  # "" is the null reverse-path (a DSN)
    domain: str
    recipients: tuple[QueuedRecipient, ...]
    queued_at: float
    next_attempt: float
    attempts: int = 0  # connection rounds tried so far
    is_dsn: bool = False
    last_reason: str = ""

    @property
    def pending(self) -> tuple[QueuedRecipient, ...]:
        return tuple(r for r in self.recipients if r.state == QueueState.QUEUED)

    @property
    def done(self) -> bool:
        return not self.pending

    def with_recipients(self, updates: dict[int, QueuedRecipient]) -> QueueItem:
        return replace(self, recipients=tuple(updates.get(r.rid, r) for r in self.recipients))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> QueueItem:
        recipients = tuple(QueuedRecipient(**r) for r in data.pop("recipients"))
        return QueueItem(recipients=recipients, **data)


@dataclass
class OutboundQueue:
    """The queue under ``root``: ``messages/`` (a Maildir) and ``state/`` (one JSON file per item)."""

    root: Path
    items: dict[str, QueueItem] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.maildir = Maildir(self.root / "messages")
        self.state_dir = self.root / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.recovered = self._load()

    # -- adding and saving

    def enqueue(
        self,
        data: bytes,
        *,
        mid: int,
        sender: str,
        recipients: Sequence[tuple[int, str]],
        now: float,
        is_dsn: bool = False,
    ) -> list[QueueItem]:
        """Store a message durably, one item per recipient domain; raises SpoolError leaving nothing behind."""
        by_domain: dict[str, list[QueuedRecipient]] = {}
        for rid, address in recipients:
            by_domain.setdefault(domain_of(address), []).append(QueuedRecipient(rid, address))
        made: list[QueueItem] = []
        try:
            for domain, rcpts in by_domain.items():
                name = self.maildir.deliver(data)
                item = QueueItem(name, mid, sender, domain, tuple(rcpts), now, now, is_dsn=is_dsn)
                self._save(item)
                made.append(item)
        except (SpoolError, OSError) as exc:
            for item in made:
                self._remove(item)
            raise SpoolError(f"cannot queue MID {mid}: {exc}") from exc
        return made

    def update(self, item: QueueItem) -> None:
        """Save the item's new state durably; a finished item leaves the queue (state first, then message)."""
        if item.done:
            self._remove(item)
        else:
            self._save(item)

    def message(self, item: QueueItem) -> bytes:
        return (self.maildir.path / "new" / item.name).read_bytes()

    def due(self, now: float) -> list[QueueItem]:
        """Items whose next attempt is due, oldest first."""
        return sorted((i for i in self.items.values() if i.next_attempt <= now), key=lambda i: (i.next_attempt, i.name))

    def next_due(self) -> float | None:
        return min((i.next_attempt for i in self.items.values()), default=None)

    def __iter__(self) -> Iterator[QueueItem]:
        return iter(sorted(self.items.values(), key=lambda i: i.name))

    def __len__(self) -> int:
        return len(self.items)

    # -- files

    def _state_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def _save(self, item: QueueItem) -> None:
        path = self._state_path(item.name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(item.to_json(), sort_keys=True).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.state_dir)
        self.items[item.name] = item

    def _remove(self, item: QueueItem) -> None:
        self._state_path(item.name).unlink(missing_ok=True)
        _fsync_dir(self.state_dir)
        (self.maildir.path / "new" / item.name).unlink(missing_ok=True)
        self.items.pop(item.name, None)

    def _load(self) -> list[tuple[str, int]]:
        """Read the items back; drop what a crash left half made (never acknowledged: the 250 comes after both
        files). Returns what was dropped, ``(path, bytes)``, for the mail log."""
        dropped: list[tuple[str, int]] = [(str(x.path), x.size) for x in self.maildir.recover()]
        new = self.maildir.path / "new"
        messages = {p.name for p in new.iterdir()}
        for path in sorted(self.state_dir.glob("*.tmp")):
            dropped.append((str(path), path.stat().st_size))
            path.unlink()
        for path in sorted(self.state_dir.glob("*.json")):
            name = path.name[: -len(".json")]
            try:
                item: QueueItem | None = QueueItem.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError, KeyError):
                item = None
            if item is None or name not in messages:  # unreadable, or its message is gone
                dropped.append((str(path), path.stat().st_size))
                path.unlink()
                continue
            self.items[name] = item
        for name in sorted(messages - set(self.items)):  # a message whose state never reached the disk
            dropped.append((str(new / name), (new / name).stat().st_size))
            (new / name).unlink()
        return dropped


def domain_of(address: str) -> str:
    return address.strip("<>").rpartition("@")[2].rstrip(".").lower()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
