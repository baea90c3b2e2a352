"""The smtplab pytest plugin (entry point ``pytest11``): the conformance suite as pytest items.

Loaded in every pytest run of an environment where smtplab is installed, so it does nothing until a
conformance option or the ``conformance/`` conftest asks for it.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smtplab", "smtplab conformance suite")
    group.addoption(
        "--smtplab-target",
        metavar="HOST:PORT|PROFILE",
        default=None,
        help="run the catalogue against this target (default: the lab's own listeners)",
    )
