"""The lab's appliance listener in-process, for tests: its mail log in memory, spool and state under one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime

from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance
from lab.appliance.spool import Spool
from lab.smtp.listener import ApplianceRuntime


def lab_runtime(appliance: Appliance, clock: IReactorTime, root: Path, **options: Any) -> ApplianceRuntime:
    """``root/spool`` and ``root/state``; ``options`` go to ``ApplianceRuntime`` (faults, reverse_dns, maillog ...)."""
    options.setdefault("maillog", MailLog(None, clock=clock.seconds))
    return ApplianceRuntime(appliance, clock=clock, spool=Spool(root / "spool"), state_dir=root / "state", **options)
