"""index.html in a real browser: headless Chromium draws the ladder diagrams of a real run, legibly.

A few catalogue cases run (plaintext, STARTTLS, a firewall stripping STARTTLS, a failed handshake) and a hostile
run is added to their record. Chromium then takes a 1280x720 screenshot of one run (``?focus#run-...``: the run
alone, its ladder first) and dumps the DOM of ``?selfcheck``, where the page's own script counts SVG text boxes
that overlap or stick out of their diagram. Chromium missing skips the test locally and fails it under CI=true.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from serving import need_tool
from test_result import HOSTILE, _run

from lab.report import write_reports
from lab.report.ladder import PLAIN_COLOUR, TLS_COLOUR
from lab.scenario.result import load_index
from lab.scenario.verdict import Verdict

CASES = ("3207-4-02", "ATK-STRIP-01", "ATK-RESP-01", "3207-4.1-01")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,720",
)
INJECTED = '<b id="pwned">bold</b><img src=x onerror="document.title=1">'


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of ``CASES`` on the memory carrier, plus a run whose transcript is hostile and long."""
    out = tmp_path_factory.mktemp("report")
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run", "--no-timestamps", "--report-dir", str(out), *CASES],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = load_index(out / "index.json")
    hostile = [HOSTILE, "<-  250-" + "X" * 290, f"<-  250 {INJECTED}", *(f" -> line {i}" for i in range(40))]
    hostile_run = _run("HOSTILE-01", "required", Verdict.OK, transcript=hostile)
    write_reports(replace(result, runs=[*result.runs, hostile_run]), out)
    return out


def chromium(report: Path, query: str, *args: str) -> subprocess.CompletedProcess[str]:
    browser = need_tool("chromium")
    url = (report / "index.html").as_uri() + query
    profile = report / f"profile-{len(list(report.glob('profile-*')))}"
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args, url],
        capture_output=True,
        text=True,
        timeout=180,
    )


def anchor(report: Path, name: str) -> str:
    """The section id of run ``name`` (``CASE-policy``, as the page slugs it)."""
    page = (report / "index.html").read_text(encoding="utf-8")
    found = re.search(rf'id="(run-\d+-{re.escape(name)})"', page)
    assert found, name
    return found.group(1)


def colour_share(image: Image.Image, hex_colour: str, tolerance: int = 40) -> float:
    """The share of pixels close to ``hex_colour``."""
    want = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    colours = image.convert("RGB").getcolors(maxcolors=1 << 24) or []
    near = sum(n for n, px in colours if all(abs(p - w) <= tolerance for p, w in zip(px, want, strict=True)))
    return near / (image.width * image.height)


@pytest.mark.parametrize(
    ("run", "arrow_colours"),
    [("ATK-STRIP-01-preferred", [PLAIN_COLOUR]), ("ATK-RESP-01-preferred", [PLAIN_COLOUR, TLS_COLOUR])],
    ids=["stripped-by-firewall", "starttls"],
)
def test_ladder_screenshot_is_drawn_and_legible(report: Path, run: str, arrow_colours: list[str]) -> None:
    shot = report / f"{run}.png"
    done = chromium(report, f"?focus#{anchor(report, run)}", f"--screenshot={shot}")
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 720)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16) or []
        assert len(colours) > 50, "a blank (or nearly blank) page"
        white = max(colours)[0] / (1280 * 720)
        assert white < 0.97, f"{white:.0%} of the screenshot is one colour"
        for colour in arrow_colours:  # the ladder's arrows were drawn: plaintext orange, TLS green
            assert colour_share(rgb, colour) > 0.001, colour


def test_ladder_text_never_overlaps(report: Path) -> None:
    done = chromium(report, "?selfcheck", "--virtual-time-budget=5000", "--dump-dom")
    found = re.search(r'id="selfcheck">svgs=(\d+) texts=(\d+) overlaps=(\d+) outside=(\d+) empty=(\d+)<', done.stdout)
    assert found, done.stdout[-500:] + done.stderr[-2000:]
    svgs, texts, overlaps, outside, empty = (int(g) for g in found.groups())
    runs = len(load_index(report / "index.json").runs)
    assert svgs == runs and texts > 20 * runs
    assert (overlaps, outside, empty) == (0, 0, 0)


def test_hostile_transcript_stays_text_in_the_browser(report: Path) -> None:
    dom = chromium(report, "?selfcheck", "--virtual-time-budget=5000", "--dump-dom").stdout
    assert '&lt;b id="pwned"&gt;' in dom or "&lt;b id=&quot;pwned&quot;&gt;" in dom
    assert '<b id="pwned">' not in dom and "<img" not in dom
    assert "<title>smtplab" in dom  # the page's title: the injected onerror never ran
