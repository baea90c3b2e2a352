"""The pytest plugin in real pytest sub-sessions (pytester, in a subprocess): items, outcomes, JUnit, reports.

Each sub-session is a fresh ``python -m pytest`` that loads the plugin the way a user's gets it: by its entry point
where smtplab is installed (tox), or with ``-p lab.pytest_plugin`` from a bare checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from importlib.metadata import distributions, entry_points
from pathlib import Path

import pytest
from peers import require_peer
from serving import Served, serve

import lab

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]  # the checkout (lab itself may be an installed copy)
ITEM = re.compile(r"^(smtplab/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")

Run = Callable[..., pytest.RunResult]


#: Where the sub-session imports lab from: this checkout (bare, or installed editable) or the installed copy (tox).
SUB_PATH = [str(REPO)] if Path(lab.__file__).resolve().is_relative_to(REPO) else []


def _autoloaded() -> bool:
    """Does the sub-session see smtplab's ``pytest11`` entry point (an install, or an egg-info in the checkout)?

    Then pytest loads the plugin by itself, and ``-p lab.pytest_plugin`` would register it a second time.
    """
    found = distributions(path=[*SUB_PATH, *sys.path])
    return any(ep.group == "pytest11" and ep.value == "lab.pytest_plugin" for dist in found for ep in dist.entry_points)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lab CA for every sub-session of this module (making one per run would only cost time)."""
    return tmp_path_factory.mktemp("smtplab-state")


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> Run:
    monkeypatch.setenv("SMTPLAB_STATE", str(state_dir))
    if SUB_PATH:
        monkeypatch.setenv("PYTHONPATH", SUB_PATH[0])

    def go(*args: str, load: bool = True) -> pytest.RunResult:
        plugin = ["-p", "lab.pytest_plugin"] if load and not _autoloaded() else []
        return pytester.runpytest_subprocess(*plugin, "-p", "no:cacheprovider", *args, timeout=120)

    return go


@pytest.fixture
def inproc(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> Run:
    """A sub-session in this process (fast) for runs that never reach the reactor: help, collection, usage errors."""
    monkeypatch.setenv("SMTPLAB_STATE", str(state_dir))
    loaded = any(ep.value == "lab.pytest_plugin" for ep in entry_points(group="pytest11"))
    plugin = [] if loaded else ["-p", "lab.pytest_plugin"]

    def go(*args: str) -> pytest.RunResult:
        # no:twisted: an in-process pytest-twisted would stop the reactor greenlet of this very session
        return pytester.runpytest_inprocess(*plugin, "-p", "no:twisted", "-p", "no:cacheprovider", *args)

    return go


@pytest.fixture(scope="module")
def preferred_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real ``smtplab serve --tls preferred``: declared Required, it is a deliberately broken target."""
    with serve(tmp_path_factory.mktemp("served"), "--tls", "preferred") as served:
        yield served


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """``-v`` lines: node id -> PASSED / FAILED / SKIPPED."""
    out = {}
    for line in result.outlines:
        match = ITEM.match(line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def junit_cases(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    return {f"{case.get('classname')}::{case.get('name')}": case for case in root.iter("testcase")}


def properties(case: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in case.iter("property")}


def test_inert_in_a_plain_run(run: Run, inproc: Run, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_one():\n    assert 1 + 1 == 2\n")
    help_text = inproc("--help")
    assert "--smtplab-target=HOST:PORT" in help_text.stdout.str()  # the plugin is loaded in these runs

    plain = run("-v")
    plain.assert_outcomes(passed=1)
    text = plain.stdout.str()
    assert "smtplab/" not in text and "= smtplab =" not in text and not re.search(r"^smtplab: ", text, re.M)

    listed = inproc("--collect-only", "-q")
    assert [line for line in listed.outlines if "::" in line] == ["test_plain.py::test_one"]


def test_lab_selection_items_junit_and_reports(run: Run, pytester: pytest.Pytester) -> None:
    result = run("-v", "--smtplab", "--smtplab-select", "3207-4-02,3207-4-01", "--junitxml=out.xml",
                 "--smtplab-report-dir", "report")  # fmt: skip
    result.assert_outcomes(passed=6)
    assert result.ret == 0
    names = [f"smtplab/lab:Inboundmail::3207-4-0{n}[{p}]" for n in (1, 2) for p in ("no", "preferred", "required")]
    assert outcomes(result) == dict.fromkeys(names, "PASSED")
    assert re.search(
        r"^smtplab: 2 cases against lab:Inboundmail \(policies no, preferred, required\)", result.stdout.str(), re.M
    )
    assert "verdicts: 5 passed, 0 failed, 1 informational" in result.outlines

    cases = junit_cases(pytester.path / "out.xml")
    assert sorted(cases) == sorted(name.replace("smtplab/", "smtplab.") for name in names)
    info = properties(cases["smtplab.lab:Inboundmail::3207-4-01[required]"])
    assert info["verdict"] == "INFORMATIONAL" and info["note"].startswith("INFORMATIONAL: ")
    assert properties(cases["smtplab.lab:Inboundmail::3207-4-02[no]"])["verdict"] == "OK"

    index = json.loads((pytester.path / "report" / "index.json").read_text())
    assert [f"{r['case']}[{r['policy']}]" for r in index["runs"]] == [n.split("::")[1] for n in names]
    assert (pytester.path / "report" / "index.html").stat().st_size > 0
    assert len(list(ET.parse(pytester.path / "report" / "junit.xml").getroot().iter("testcase"))) == 6


def test_deselected_items_are_never_run(run: Run, inproc: Run, pytester: pytest.Pytester) -> None:
    result = run("--smtplab-select", "3207-4.2", "-k", "required", "--smtplab-report-dir", "report")
    counts = result.parseoutcomes()
    assert counts["deselected"] > 0 and counts["passed"] > 0 and result.ret == 0
    runs = json.loads((pytester.path / "report" / "index.json").read_text())["runs"]
    assert len(runs) == counts["passed"] and {r["policy"] for r in runs} == {"required"}

    listed = inproc("--smtplab", "--collect-only", "-q", "--smtplab-report-dir", "listed")
    assert "smtplab/lab:Inboundmail::3207-4-02[required]" in listed.outlines
    assert not (pytester.path / "listed").exists()


def test_broken_target_fails_with_expected_actual_spec_and_transcript(
    run: Run, pytester: pytest.Pytester, preferred_lab: Served
) -> None:
    address = f"{preferred_lab.host}:{preferred_lab.port}"
    result = run("-v", "-rs", "--smtplab-target", address, "--smtplab-policy", "encrypt",
                 "--smtplab-select", "3207-4-06,ATK-INJECT-01", "--junitxml=out.xml")  # fmt: skip
    assert result.ret == 1
    result.assert_outcomes(failed=1, skipped=1)
    node = f"smtplab/{address}::"
    assert outcomes(result) == {
        node + "3207-4-06[required]": "FAILED",  # MAIL before STARTTLS is served: a MUST of Required broken
        node + "ATK-INJECT-01[required]": "SKIPPED",  # needs the mail log: the lab's own listeners only
    }
    out = result.stdout.str()
    failure = out[out.index("__ 3207-4-06[required] __") :]
    for needle in ("Verdict: FAILED", "\nExpected: ", "\nActual: no expected alternative matched",
                   "\nSpec: RFC 3207 4.2 (MUST): ", "\nTranscript ("):  # fmt: skip
        assert needle in failure, needle
    assert re.search(r"^  +-> MAIL FROM:<", failure, re.M)  # the plaintext MAIL the target should have refused
    skip = "SKIPPED [[]1[]] *.yaml:*: UNIMPLEMENTED: needs a declared target fact: the target's mail log file *"
    result.stdout.fnmatch_lines([skip])

    cases = junit_cases(pytester.path / "out.xml")
    failed = cases[f"smtplab.{address}::3207-4-06[required]"].find("failure")
    assert failed is not None and "Spec: RFC 3207 4.2 (MUST)" in (failed.text or "")
    assert properties(cases[f"smtplab.{address}::3207-4-06[required]"])["verdict"] == "FAILED"
    assert cases[f"smtplab.{address}::ATK-INJECT-01[required]"].find("skipped") is not None


def _profile(path: Path, name: str, address: str, policy: str, deviations: str = "[]") -> Path:
    path.write_text(f"name: {name}\naddress: {address}\npolicy: {policy}\ndeviations: {deviations}\n")
    return path


def test_profiles_deviations_and_several_targets(run: Run, pytester: pytest.Pytester, preferred_lab: Served) -> None:
    """Two profiles of one Preferred listener: declared Required it fails as declared (XFAIL); declared Preferred,
    a deviation it does not have is gone (XPASS, a failure)."""
    address = f"{preferred_lab.host}:{preferred_lab.port}"
    _profile(pytester.path / "strict.yaml", "declared-required", address, "encrypt",
             "[{case: 3207-4-06, reason: 'takes MAIL before STARTTLS'}]")  # fmt: skip
    _profile(pytester.path / "honest.yaml", "declared-preferred", address, "may",
             "[{case: 3207-4-06, reason: 'said to keep the plaintext envelope'}]")  # fmt: skip
    result = run("-v", "--smtplab-profile", "strict.yaml", "--smtplab-profile", "honest.yaml",
                 "--smtplab-select", "3207-4-06", "--smtplab-report-dir", "report")  # fmt: skip
    assert outcomes(result) == {
        "smtplab/declared-required::3207-4-06[required]": "PASSED",
        "smtplab/declared-preferred::3207-4-06[preferred]": "FAILED",
    }
    out = result.stdout.str()
    assert "Verdict: XPASS" in out and "Declared deviation: said to keep the plaintext envelope" in out
    assert "XFAIL smtplab/declared-required::3207-4-06[required]: " in out

    index = json.loads((pytester.path / "report" / "index.json").read_text())
    assert [t["name"] for t in index["targets"]] == ["declared-required", "declared-preferred"]
    assert [(r["target"], r["verdict"]) for r in index["runs"]] == [
        ("declared-required", "XFAIL"),
        ("declared-preferred", "XPASS"),
    ]
    captures = [r["capture"] for r in index["runs"]]
    assert captures[1] == "declared-preferred/captures/3207-4-06-preferred.pcap"
    assert all((pytester.path / "report" / capture).is_file() for capture in captures)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--smtplab-target", "127.0.0.1:2525"], "--smtplab-policy: an external target needs the one policy"),
        (["--smtplab", "--smtplab-policy", "maybe"], "--smtplab-policy: 'maybe' is not one of"),
        (["--smtplab-select", "NOPE-99"], "no case id starts with 'NOPE-99'"),
        (
            ["--smtplab-target", "192.0.2.1:25", "--smtplab-policy", "no"],
            "--smtplab-target: 192.0.2.1 is not a loopback address",
        ),
        (["--smtplab-profile", "missing.yaml"], "missing.yaml"),
        (["--smtplab-sender", "lab:maybe"], "--smtplab-sender: 'maybe' is not one of"),
        (["--smtplab-sender", "nope.yaml"], "--smtplab-sender: 'nope.yaml' is neither lab[:POLICY]"),
        (["--smtplab-sender", "lab", "--smtplab-select", "3207-4"], "--smtplab-select: no receiver case id starts"),
        (["--smtplab-sender", "lab:no", "--smtplab-sender", "lab:required"], "two senders share a name"),
    ],
)
def test_bad_options_are_usage_errors(inproc: Run, args: list[str], message: str) -> None:
    result = inproc(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_the_conformance_conftest_switches_the_suite_on(run: Run, pytester: pytest.Pytester) -> None:
    """No option: the lab's listeners and the appliance's outbound; a selection of one catalogue keeps its items."""
    shutil.copy(REPO / "conformance" / "conftest.py", pytester.path / "conftest.py")
    result = run("-v", "--smtplab-select", "3207-4-02", load=False)  # no --smtplab, no -p: the conftest does both
    assert result.ret == 0
    assert sorted(outcomes(result)) == [
        f"smtplab/lab:Inboundmail::3207-4-02[{p}]" for p in ("no", "preferred", "required")
    ]

    both = run("-v", "--smtplab-select", "3207-4-02,SND-DC-01", "--smtplab-report-dir", "report", load=False)
    assert both.ret == 0
    controls = ("no", "preferred", "required", "preferred-verify", "required-verify")
    assert outcomes(both) == {
        **{f"smtplab/lab:Inboundmail::3207-4-02[{p}]": "PASSED" for p in ("no", "preferred", "required")},
        **{f"smtplab/sender:appliance::SND-DC-01[{p}]": "PASSED" for p in controls},
    }
    assert re.search(r"^smtplab: 1 receiver case against sender:appliance \(policies no, preferred, required, "
                     r"preferred-verify, required-verify\); carrier memory$", both.stdout.str(), re.M)  # fmt: skip
    index = json.loads((pytester.path / "report" / "index.json").read_text())
    assert [t["name"] for t in index["targets"]] == ["lab:Inboundmail", "appliance"]
    sender_runs = [r for r in index["runs"] if r["target"] == "appliance"]
    assert [(r["case"], r["policy"], r["verdict"]) for r in sender_runs] == [("SND-DC-01", p, "OK") for p in controls]
    assert all((pytester.path / "report" / r["capture"]).is_file() for r in sender_runs)
    assert sender_runs[0]["capture"].startswith("sender_appliance/captures/SND-DC-01-")


def test_sender_items_with_ids_deselection_and_no_listener_items(run: Run, inproc: Run) -> None:
    """``--smtplab-sender`` alone: receiver case x control items only, ``-k`` decides which controls run."""
    listed = inproc("--smtplab-sender", "lab:required,no", "--smtplab-select", "SND-DC", "--collect-only", "-q")
    names = [line for line in listed.outlines if "::" in line]
    assert names and all(re.fullmatch(r"smtplab/sender:lab::SND-DC-\d+\[(no|required)\]", n) for n in names)
    assert "smtplab/sender:lab::SND-DC-01[required]" in names and "smtplab/sender:lab::SND-DC-01[no]" in names

    result = run("-v", "--smtplab-sender", "lab", "--smtplab-select", "SND-DC-01", "-k", "verify")
    assert outcomes(result) == {
        "smtplab/sender:lab::SND-DC-01[preferred-verify]": "PASSED",
        "smtplab/sender:lab::SND-DC-01[required-verify]": "PASSED",
    }
    assert "verdicts: 2 passed, 0 failed" in result.outlines


def test_a_sender_that_breaks_a_must_fails_its_item(run: Run, pytester: pytest.Pytester) -> None:
    """swaks --tls-optional declared Required: it goes on in plaintext when STARTTLS is not offered (a MUST)."""
    require_peer("swaks", shutil.which("swaks") is not None, "apt-get install swaks")
    profile = (REPO / "conformance" / "senders" / "swaks-tls-optional.yaml").read_text()
    declared = profile.replace("name: swaks-tls-optional", "name: swaks-as-required")
    declared = declared.replace("policy: preferred", "policy: required").replace("127.77.21.0", "127.77.41.0")
    assert "\npolicy: required\n" in declared and "127.77.41.0" in declared
    (pytester.path / "declared.yaml").write_text(declared)
    result = run("-v", "--smtplab-sender", "declared.yaml", "--smtplab-select", "SND-3207-4-01",
                 "--smtplab-report-dir", "report", "--junitxml=out.xml")  # fmt: skip
    assert result.ret == 1
    node = "smtplab/sender:swaks-as-required::SND-3207-4-01[required]"
    assert outcomes(result) == {node: "FAILED"}
    out = result.stdout.str()
    assert "smtplab: 1 receiver case against sender:swaks-as-required (policy required); carrier tcp" in out
    needles = ("Verdict: FAILED", "\nActual: the envelope crossed in plaintext", "\nSpec: docs/rules.md §6.3 (MUST): ")
    for needle in (*needles, "plaintext: MAIL FROM:<sender-probe@smtplab.test>"):
        assert needle in out, needle
    failed = junit_cases(pytester.path / "out.xml")[node.replace("smtplab/", "smtplab.")]
    assert properties(failed)["verdict"] == "FAILED" and failed.find("failure") is not None

    index = json.loads((pytester.path / "report" / "index.json").read_text())
    assert [(t["name"], t["policy"]) for t in index["targets"]] == [("swaks-as-required", "required")]
    assert [(r["case"], r["verdict"]) for r in index["runs"]] == [("SND-3207-4-01", "FAILED")]
    assert (pytester.path / "report" / index["runs"][0]["capture"]).is_file()


SHOULD_CASE = """\
id: 3207-4-99
title: "a SHOULD that the lab's Preferred listener does not meet (a test fixture, not a catalogue case)"
refs:
  - {ref: "RFC 3207 4", level: SHOULD, text: A sentence made up for this test.}
description: A legacy client delivers in plaintext.
expectation: This case pretends that Preferred should have refused it.
client: {host: mta-skip, behaviour: skip}
policies: [preferred]
expect:
  any:
    - {verdict: OK, label: refused, when: {delivered: false}}
"""


def test_a_missed_should_warns_and_a_harness_error_fails(run: Run, pytester: pytest.Pytester) -> None:
    """NON-STRICT passes with a SmtplabShouldWarning at the case's file; ``-W error::...`` is ``smtplab run
    --strict``: then it fails with the case's report. A fault of the lab (ERROR) fails the item, never skips it."""
    pytester.path.joinpath("should.yaml").write_text(SHOULD_CASE)
    broken = SHOULD_CASE.replace("3207-4-99", "3207-4-98").replace("host: mta-skip", "host: no-such-host")
    pytester.path.joinpath("broken.yaml").write_text(broken)
    lenient = run("--smtplab-select", "should.yaml,broken.yaml", "--junitxml=out.xml")
    lenient.assert_outcomes(passed=1, failed=1, warnings=1)
    lenient.stdout.fnmatch_lines(["*should.yaml:1: SmtplabShouldWarning: 3207-4-99[[]preferred[]] against lab:*"])
    lenient.stdout.fnmatch_lines(["Verdict: ERROR", "Actual: harness error: *the topology has no host 'no-such-host'"])
    cases = junit_cases(pytester.path / "out.xml")
    note = properties(cases["smtplab.lab:Inboundmail::3207-4-99[preferred]"])
    assert note["verdict"] == "NON-STRICT" and note["note"].startswith("NON-STRICT: no expected alternative")
    assert cases["smtplab.lab:Inboundmail::3207-4-98[preferred]"].find("failure") is not None

    strict = run("--smtplab-select", "should.yaml", "-W", "error::lab.pytest_plugin.SmtplabShouldWarning")
    strict.assert_outcomes(failed=1)
    assert "Verdict: NON-STRICT" in strict.stdout.str() and "Traceback" not in strict.stdout.str()


def _record(index: Path) -> dict:
    """An index.json without what a clock decides (when it started, how long each run took)."""
    data = json.loads(index.read_text())
    data.pop("started", None)
    for record in data["runs"]:
        record.pop("timings", None)
    return data


def test_the_plugin_and_smtplab_run_make_the_same_record(run: Run, pytester: pytest.Pytester, state_dir: Path) -> None:
    """One pipeline (lab.pipeline): the same selection gives the same record through either front end."""
    selection = "3207-4-02,ATK-INJECT-01,POL-HAT"
    result = run("--smtplab", "--smtplab-select", selection, "--smtplab-report-dir", "plugin")
    assert result.ret == 0
    env = {**os.environ, "SMTPLAB_STATE": str(state_dir)}
    if SUB_PATH:
        env["PYTHONPATH"] = os.pathsep.join([SUB_PATH[0], *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run", *selection.split(","), "--report-dir", "cli"],
        cwd=pytester.path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plugin, cli = _record(pytester.path / "plugin" / "index.json"), _record(pytester.path / "cli" / "index.json")
    assert len(plugin["runs"]) > 6
    assert plugin == cli  # verdicts, observations, transcripts, server logs, capture names
