"""Baselines: verdict ranking, compare(), baseline_exit_code() and ``smtplab diff`` (output and exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lab.cli
from lab.conformance.baseline import RANK, Kind, baseline_exit_code, compare, rank, summary
from lab.errors import BadInput
from lab.policy.modes import TLSMode
from lab.scenario.result import CaseRun, RunResult
from lab.scenario.verdict import Verdict


def case_run(case: str, verdict: Verdict, policy: str = "required", target: str = "postfix-encrypt") -> CaseRun:
    deviation = "declared" if verdict in (Verdict.XFAIL, Verdict.XPASS) else None
    return CaseRun(
        case=case,
        title=case,
        section="3",
        client="c",
        target=target,
        policy=TLSMode(policy),
        carrier="loopback",
        verdict=verdict,
        reason=f"{case} was {verdict}",
        deviation=deviation,
    )


def record(*runs: CaseRun) -> RunResult:
    return RunResult(seed=1, carrier="loopback", runs=list(runs))


def write(path: Path, result: RunResult) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return path


def test_rank_covers_every_verdict_once() -> None:
    assert sorted(RANK) == sorted(Verdict)
    assert rank(Verdict.OK) == 0
    assert rank(Verdict.XFAIL) < rank(Verdict.NON_STRICT) < rank(Verdict.XPASS) < rank(Verdict.FAILED)
    assert rank(Verdict.FAILED) < rank(Verdict.ERROR)


@pytest.mark.parametrize(
    ("before", "after", "kind"),
    [
        (Verdict.OK, Verdict.FAILED, Kind.REGRESSED),
        (Verdict.INFORMATIONAL, Verdict.NON_STRICT, Kind.REGRESSED),
        (Verdict.XFAIL, Verdict.XPASS, Kind.REGRESSED),
        (Verdict.XFAIL, Verdict.FAILED, Kind.REGRESSED),
        (Verdict.FAILED, Verdict.ERROR, Kind.REGRESSED),
        (Verdict.OK, Verdict.SKIPPED, Kind.REGRESSED),
        (Verdict.FAILED, Verdict.XFAIL, Kind.IMPROVED),
        (Verdict.ERROR, Verdict.OK, Kind.IMPROVED),
        (Verdict.NON_STRICT, Verdict.OK, Kind.IMPROVED),
        (Verdict.FAILED, Verdict.FAILED, Kind.UNCHANGED),
        (Verdict.OK, Verdict.OK, Kind.UNCHANGED),
    ],
)
def test_kind_follows_the_rank(before: Verdict, after: Verdict, kind: Kind) -> None:
    (change,) = compare(record(case_run("C-1", before)), record(case_run("C-1", after)))
    assert change.kind is kind
    assert change.regressed is (kind is Kind.REGRESSED)
    assert baseline_exit_code(record(case_run("C-1", before)), record(case_run("C-1", after))) == int(change.regressed)


def test_key_is_case_policy_and_target() -> None:
    old = record(case_run("C-1", Verdict.OK, "required"), case_run("C-1", Verdict.OK, "required", "aiosmtpd-require"))
    new = record(case_run("C-1", Verdict.FAILED, "preferred"), case_run("C-1", Verdict.OK, "required"))
    changes = {c.name: c.kind for c in compare(old, new)}
    assert changes == {
        "C-1[preferred]@postfix-encrypt": Kind.ADDED,
        "C-1[required]@postfix-encrypt": Kind.UNCHANGED,
        "C-1[required]@aiosmtpd-require": Kind.REMOVED,
    }


def test_new_failures_count_as_regressions_removed_cases_do_not() -> None:
    old = record(case_run("GONE-1", Verdict.FAILED))
    new = record(case_run("NEW-1", Verdict.OK), case_run("NEW-2", Verdict.FAILED))
    changes = compare(old, new)
    assert [(c.case, c.kind, c.regressed) for c in changes] == [
        ("NEW-1", Kind.ADDED, False),
        ("NEW-2", Kind.ADDED, True),
        ("GONE-1", Kind.REMOVED, False),
    ]
    assert summary(changes) == "1 regressed, 0 improved, 0 unchanged; 2 added, 1 removed"
    assert baseline_exit_code(old, record(case_run("NEW-1", Verdict.OK))) == 0


def test_known_failures_in_the_baseline_pass() -> None:
    old = record(case_run("A-1", Verdict.FAILED), case_run("B-1", Verdict.XFAIL), case_run("C-1", Verdict.OK))
    assert baseline_exit_code(old, old) == 0
    assert old.exit_code() == 1  # on its own the run fails; against its baseline it does not


def test_two_runs_of_one_key_cannot_be_compared() -> None:
    twice = record(case_run("C-1", Verdict.OK), case_run("C-1", Verdict.FAILED))
    with pytest.raises(BadInput, match="two runs of C-1"):
        compare(record(), twice)


# -- smtplab diff, through the real dispatcher


@pytest.fixture
def smtplab():  # type: ignore[no-untyped-def]
    assert lab.cli.COMMANDS["diff"] == "diff"
    return lab.cli.main


def test_diff_prints_changes_and_summary_and_exits_1_on_regression(tmp_path: Path, smtplab, capsys) -> None:  # type: ignore[no-untyped-def]
    old = write(tmp_path / "old" / "index.json", record(
        case_run("3207-4-01", Verdict.OK), case_run("3207-4-02", Verdict.FAILED), case_run("3207-4-03", Verdict.OK),
        case_run("3207-4-04", Verdict.OK),
    ))  # fmt: skip
    new = write(tmp_path / "new" / "index.json", record(
        case_run("3207-4-01", Verdict.FAILED), case_run("3207-4-02", Verdict.XFAIL), case_run("3207-4-03", Verdict.OK),
        case_run("3207-4-05", Verdict.OK),
    ))  # fmt: skip
    code = smtplab(["diff", str(old.parent), str(new)])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out == [
        "REGRESSED  3207-4-01[required]@postfix-encrypt: OK -> FAILED -- 3207-4-01 was FAILED",
        "IMPROVED   3207-4-02[required]@postfix-encrypt: FAILED -> XFAIL -- 3207-4-02 was XFAIL",
        "added      3207-4-05[required]@postfix-encrypt: OK -- 3207-4-05 was OK",
        "removed    3207-4-04[required]@postfix-encrypt: was OK",
        "1 regressed, 1 improved, 1 unchanged; 1 added, 1 removed",
    ]


def test_diff_exits_0_without_regressions_and_all_lists_unchanged(tmp_path: Path, smtplab, capsys) -> None:  # type: ignore[no-untyped-def]
    old = write(tmp_path / "a.json", record(case_run("X-1", Verdict.FAILED), case_run("X-2", Verdict.OK)))
    new = write(tmp_path / "b.json", record(case_run("X-1", Verdict.OK), case_run("X-2", Verdict.OK)))
    assert smtplab(["diff", str(old), str(new)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 regressed, 1 improved, 1 unchanged"
    assert smtplab(["diff", "--all", str(old), str(new)]) == 0
    assert "unchanged  X-2[required]@postfix-encrypt: OK -> OK" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "{not json", '{"schema_version": 99}', '{"schema_version": 1}'])
def test_diff_bad_file_is_one_line_and_exit_3(tmp_path: Path, smtplab, capsys, content: str | None) -> None:  # type: ignore[no-untyped-def]
    good = write(tmp_path / "good.json", record(case_run("X-1", Verdict.OK)))
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content, encoding="utf-8")
    assert smtplab(["diff", str(good), str(bad)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"smtplab: {bad}")


def test_diff_duplicate_keys_name_the_file(tmp_path: Path, smtplab, capsys) -> None:  # type: ignore[no-untyped-def]
    good = write(tmp_path / "good.json", record(case_run("X-1", Verdict.OK)))
    twice = write(tmp_path / "twice.json", record(case_run("X-1", Verdict.OK), case_run("X-1", Verdict.OK)))
    assert smtplab(["diff", str(good), str(twice)]) == 3
    assert capsys.readouterr().err.startswith(f"smtplab: {twice}: runs: the new record has two runs")
