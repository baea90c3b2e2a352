"""pytest in this folder is the conformance suite: the smtplab plugin is switched on here without ``--smtplab``.

The plugin is loaded by its entry point where smtplab is installed (``tox -e conformance``); in a bare checkout
(``python3 -m pytest conformance``) this conftest registers it, so both ways run the same items. With no target,
profile or sender named, the suite judges the lab's own listeners and the appliance's outbound delivery
(``--smtplab-sender appliance``: the receiver cases under every destination control).
"""

from __future__ import annotations

import pytest

from lab import pytest_plugin

#: What ``--smtplab-sender`` is when the session names no target, profile or sender of its own.
DEFAULT_SENDERS = ("appliance",)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    if not pluginmanager.is_registered(pytest_plugin) and not pluginmanager.is_blocked("smtplab"):
        pluginmanager.register(pytest_plugin, "smtplab")


def pytest_configure(config: pytest.Config) -> None:
    pytest_plugin.enable(config, senders=DEFAULT_SENDERS)
