"""The Maildir spool: atomic, durable delivery; failures leave nothing in new/; the Received header."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
import sys
import textwrap
from itertools import chain, repeat
from pathlib import Path

import pytest

from lab.appliance.spool import Maildir, MaildirNames, Spool, SpoolError, received_header
from lab.errors import BadInput
from lab.tls.tlsctx import TLSFacts

ROOT = Path(__file__).resolve().parents[1]
WHEN = dt.datetime(2026, 12, 1, 19, 40, 5, tzinfo=dt.UTC)
TLS13 = TLSFacts("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256, None)


def names(*items: str):
    source = iter(items)
    return lambda: next(source)


def test_deliver_writes_complete_file_into_new(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", name_source=MaildirNames(clock=lambda: 1764618005.25, host="esa", pid=7))
    assert {p.name for p in (tmp_path / "box").iterdir()} == {"tmp", "new", "cur"}
    name = box.deliver(b"Subject: hi\r\n\r\nbody\r\n")
    assert name == "1764618005.M250000P7Q1.esa"
    path = tmp_path / "box" / "new" / name
    assert path.read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list((tmp_path / "box" / "tmp").iterdir()) == []
    assert box.deliver(b"second") == "1764618005.M250000P7Q2.esa"
    assert [p.name for p in box.messages()] == [name, "1764618005.M250000P7Q2.esa"]


def test_host_name_is_made_safe_for_maildir(tmp_path: Path) -> None:
    source = MaildirNames(clock=lambda: 5.0, host="a/b:c", pid=1)
    assert source() == r"5.M000000P1Q1.a\057b\072c"


def test_name_collision_takes_the_next_name(tmp_path: Path) -> None:
    box = Maildir(tmp_path, name_source=names("one", "one", "two"))
    assert box.deliver(b"first") == "one"
    assert box.deliver(b"second") == "two"
    assert (tmp_path / "new" / "one").read_bytes() == b"first"
    assert (tmp_path / "new" / "two").read_bytes() == b"second"


def test_endless_collisions_are_a_spool_error(tmp_path: Path) -> None:
    box = Maildir(tmp_path, name_source=lambda: "same")
    box.deliver(b"first")
    with pytest.raises(SpoolError, match="unique"):
        box.deliver(b"second")
    assert (tmp_path / "new" / "same").read_bytes() == b"first"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_unwritable_tmp_is_a_spool_error_and_nothing_is_delivered(tmp_path: Path) -> None:
    box = Maildir(tmp_path)
    shutil.rmtree(tmp_path / "tmp")
    (tmp_path / "tmp").write_bytes(b"")  # a file where the directory should be: open() fails even for root
    with pytest.raises(SpoolError, match="cannot spool"):
        box.deliver(b"message")
    assert list((tmp_path / "new").iterdir()) == []


def test_missing_new_is_a_spool_error_and_tmp_is_cleaned(tmp_path: Path) -> None:
    box = Maildir(tmp_path)
    (tmp_path / "new").rmdir()
    with pytest.raises(SpoolError):
        box.deliver(b"message")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_partial_write_never_appears_in_new(tmp_path: Path) -> None:
    """A real short write: the file size limit makes write() fail half way (EFBIG), as a full disk would."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from lab.appliance.spool import Maildir, SpoolError
        box = Maildir({str(tmp_path)!r}, name_source=lambda: "big")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            box.deliver(b"x" * 100_000)
        except SpoolError as exc:
            print("SpoolError", exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SpoolError")
    assert list((tmp_path / "new").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


WHOLE = b"Subject: whole\r\n\r\n" + b"x" * 1000


@pytest.mark.parametrize(
    ("point", "in_new", "state"),
    [("half_written", False, False), ("before_link", False, False), ("after_link", True, True)],
)
def test_a_crash_anywhere_in_deliver_never_leaves_half_a_message_in_new(
    tmp_path: Path, point: str, in_new: bool, state: bool
) -> None:
    """The process dies (os._exit, like kill -9) at each step of tmp, fsync, link, fsync dir; then recover()."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from lab.appliance import spool
        box = spool.Maildir({str(tmp_path)!r}, name_source=lambda: "m1")
        real_write = os.write
        if {point!r} == "half_written":
            os.write = lambda fd, data: (real_write(fd, bytes(data)[:10]), os._exit(9))
        elif {point!r} == "before_link":
            os.link = lambda *args: os._exit(9)
        else:
            spool._fsync_dir = lambda *args: os._exit(9)
        box.deliver({WHOLE!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 9, done.stderr
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["m1"]  # the crash left its tmp/ file

    leftovers = Maildir(tmp_path).recover()
    assert [(item.path.name, item.delivered) for item in leftovers] == [("m1", state)]
    assert list((tmp_path / "tmp").iterdir()) == []
    messages = [p.read_bytes() for p in (tmp_path / "new").iterdir()]
    assert messages == ([WHOLE] if in_new else [])


def test_recover_on_a_clean_maildir_finds_nothing(tmp_path: Path) -> None:
    box = Maildir(tmp_path, name_source=names("one"))
    box.deliver(b"a")
    assert box.recover() == []
    assert [p.name for p in box.messages()] == ["one"]


def test_check_writable_proves_tmp_takes_files(tmp_path: Path) -> None:
    box = Maildir(tmp_path)
    box.check_writable()
    assert list((tmp_path / "tmp").iterdir()) == []  # the probe is gone
    shutil.rmtree(tmp_path / "tmp")
    (tmp_path / "tmp").write_bytes(b"")  # a file where the directory should be: fails even for root
    with pytest.raises(SpoolError, match="cannot write in"):
        box.check_writable()


def test_spool_has_one_maildir_per_listener(tmp_path: Path) -> None:
    spool = Spool(tmp_path, name_source=(f"n{i}" for i in chain(range(10), repeat(99))).__next__)
    inbound = spool.for_listener("Inboundmail")
    assert spool.for_listener("Inboundmail") is inbound
    assert inbound.deliver(b"a") == "n0"
    assert spool.for_listener("Outbound").deliver(b"b") == "n1"  # names unique across the spool
    assert (tmp_path / "Inboundmail" / "new" / "n0").read_bytes() == b"a"
    assert (tmp_path / "Outbound" / "new" / "n1").read_bytes() == b"b"
    for bad in ("", "..", "a/b"):
        with pytest.raises(BadInput):
            spool.for_listener(bad)


def test_received_header_with_tls() -> None:
    header = received_header(
        from_host="mx.example.net",
        from_addr="198.51.100.7",
        helo="mx.example.net",
        by_host="esa.lab.example",
        tls=TLS13,
        mid=1,
        recipient="bob@example.com",
        when=WHEN,
    )
    assert header == (
        b"Received: from mx.example.net (mx.example.net [198.51.100.7])\r\n"
        b"\tby esa.lab.example with ESMTPS\r\n"
        b"\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384) id 1\r\n"
        b"\tfor <bob@example.com>; Tue, 01 Dec 2026 19:40:05 +0000\r\n"
    )
    assert all(len(line.expandtabs(8)) <= 78 for line in header.split(b"\r\n"))


def test_received_header_without_tls_or_rdns_from_epoch() -> None:
    header = received_header(
        from_host=None,
        from_addr="198.51.100.7",
        helo="legacy.example.net",
        by_host="esa.lab.example",
        tls=None,
        mid=2,
        recipient=None,
        when=WHEN.timestamp(),
        esmtp=False,
    )
    assert header == (
        b"Received: from legacy.example.net ([198.51.100.7])\r\n"
        b"\tby esa.lab.example with SMTP (no TLS) id 2;\r\n"
        b"\tTue, 01 Dec 2026 19:40:05 +0000\r\n"
    )


def test_received_header_cannot_be_injected_through_helo() -> None:
    header = received_header(
        from_host="",
        from_addr="198.51.100.7",
        helo="x\r\nX-Evil: 1",
        by_host="esa.lab.example",
        tls=None,
        mid=3,
        recipient="<bob@example.com>",
        when=dt.datetime(2026, 12, 1, 19, 40, 5),  # naive: taken as UTC
    )
    lines = header.split(b"\r\n")
    assert lines[0] == b"Received: from x??X-Evil:?1 ([198.51.100.7])"
    assert all(line.startswith(b"\t") for line in lines[1:-1]) and lines[-1] == b""
    assert b"for <bob@example.com>; Tue, 01 Dec 2026 19:40:05 +0000" in header


def test_a_batch_is_made_durable_with_one_fsync_of_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.appliance import spool

    box = Maildir(tmp_path, name_source=names("a", "b", "c"))
    synced: list[Path] = []
    real = spool._fsync_dir
    monkeypatch.setattr(spool, "_fsync_dir", lambda path: (synced.append(Path(path)), real(path)))
    assert box.deliver_many([b"first", b"second", b"third"]) == ["a", "b", "c"]
    assert synced == [tmp_path / "new"]
    assert [p.read_bytes() for p in box.messages()] == [b"first", b"second", b"third"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_failed_directory_fsync_fails_the_whole_batch_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab.appliance import spool

    box = Maildir(tmp_path, name_source=names("a", "b"))

    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool, "_fsync_dir", broken)
    outcomes = box.deliver_many([b"first", b"second"])
    assert all(isinstance(item, SpoolError) and "Input/output error" in str(item) for item in outcomes)
    assert list((tmp_path / "new").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_one_message_failing_does_not_fail_its_batch(tmp_path: Path) -> None:
    box = Maildir(tmp_path, name_source=names("a", "a", *["a"] * 8, "c"))  # the second never finds a free name
    first, second, third = box.deliver_many([b"first", b"second", b"third"])
    assert (first, third) == ("a", "c")
    assert isinstance(second, SpoolError)
    assert [p.read_bytes() for p in box.messages()] == [b"first", b"third"]
