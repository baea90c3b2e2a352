"""Fixtures shared by the modules that start real peer MTAs (test_peers.py, test_interop.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import make_peer_workdir

from lab.tls.certs import LabCA


@pytest.fixture(scope="module")
def peer_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A work directory the postfix and nobody users can reach (pytest's tmp_path cannot), one per module."""
    root = make_peer_workdir(prefix=f"smtplab-{request.module.__name__.rpartition('.')[2]}-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def lab_ca(peer_root: Path) -> LabCA:
    """The lab CA that issues the peers' certificates and is the trust anchor of the clients."""
    return LabCA(peer_root / "state")
