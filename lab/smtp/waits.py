"""Waiting, always bounded by the clock the client was given (virtual in the lab, the reactor outside it).

One condition is waited for at a time: the engine pokes after every protocol event, and the wait ends as soon
as its condition holds or its timeout passes, whichever comes first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred


class Timer(Protocol):
    """What ``callLater`` returns (``IDelayedCall``), as far as a wait needs it."""

    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The part of ``IReactorTime`` a wait needs (a ``task.Clock`` in the lab, the reactor outside it)."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Timer: ...
    def seconds(self) -> float: ...


@dataclass
class _Waiter:
    ready: Callable[[], bool]
    deferred: Deferred[bool]
    timer: Timer


class Waits:
    """``until(ready, timeout)``: True as soon as ``ready()`` holds, False when ``timeout`` seconds pass first."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._waiter: _Waiter | None = None

    def poke(self) -> None:
        """Something happened: end the wait under way if its condition now holds."""
        waiter = self._waiter
        if waiter is not None and waiter.ready():
            self._waiter = None
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(True)

    async def until(self, ready: Callable[[], bool], timeout: float) -> bool:
        if ready():
            return True
        deferred: Deferred[bool] = Deferred()

        def expire() -> None:
            if self._waiter is not None and self._waiter.deferred is deferred:
                self._waiter = None
                deferred.callback(False)

        self._waiter = _Waiter(ready, deferred, self.clock.callLater(timeout, expire))
        return bool(await deferred)
