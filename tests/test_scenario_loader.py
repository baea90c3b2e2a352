"""The scenario loader: exact ``FILE:LINE: field: problem`` errors, selection by path and id prefix, smtplab list."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from lab.commands import list as list_command
from lab.errors import BadInput
from lab.scenario.loader import load_case_file, load_cases
from lab.scenario.model import CodeClass, Equals, Level, OneOf
from lab.scenario.verdict import Verdict
from lab.smtp.steps import Ehlo, StartTLS

GOOD = """\
id: 3207-4-90
title: a small case
refs:
  - {ref: RFC 3207 4, level: MUST, text: something at stake}
description: d
expectation: e
client:
  host: mta-skip
  behaviour: skip
expect:
  no:
    - verdict: OK
      label: fine
      when: {delivered: true}
  any:
    - {verdict: INFORMATIONAL, label: refused, when: {replies.MAIL: "5xx"}}
"""


def write(tmp_path: Path, text: str, name: str = "case.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(BadInput) as info:
        load_case_file(path)
    return str(info.value)


def test_a_good_file_loads_into_the_model(tmp_path: Path) -> None:
    case = load_case_file(write(tmp_path, GOOD))
    assert case.id == "3207-4-90"
    assert case.section == "RFC 3207 4"  # derived from the id
    assert case.refs[0].level is Level.MUST
    assert case.policies == ("no", "preferred", "required")
    assert case.client.behaviour == "skip"
    assert case.line == 1
    # "no:" is a YAML 1.1 boolean; the loader gives the policy its name back
    (alt,) = case.expect.by_policy["no"]
    assert (alt.verdict, alt.label, alt.when[0].key, alt.when[0].test) == (
        Verdict.OK,
        "fine",
        "delivered",
        Equals(True),
    )
    assert case.expect.for_policy("no")[1].when[0].test == CodeClass("5xx")
    assert [a.label for a in case.expect.for_policy("required")] == ["refused"]


def test_malformed_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("text: something at stake}", "text: something at stake"))
    assert error_of(path) == f"{path}:5: YAML syntax error: expected ',' or '}}', but got ':'"


def test_unknown_behaviour(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("behaviour: skip", "behaviour: skipp"))
    message = error_of(path)
    assert message.startswith(f"{path}:9: client.behaviour: unknown behaviour 'skipp' (known: fail-abort-handshake, ")
    assert "prefer-strict" in message


def test_bad_verdict_name(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("verdict: OK", "verdict: PASS"))
    assert error_of(path) == (
        f"{path}:12: expect.no[0].verdict: 'PASS' is not one of OK, NON-STRICT, FAILED, INFORMATIONAL, UNIMPLEMENTED"
    )


def test_bad_level(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("level: MUST", "level: MAY"))
    assert error_of(path) == f"{path}:4: refs[0].level: 'MAY' is not one of MUST, SHOULD, local-policy"


def test_unknown_field_points_at_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("description: d", "colour: red\ndescription: d"))
    message = error_of(path)
    assert message.startswith(f"{path}:5: colour: unknown field 'colour' (known: id, title, section, refs, ")


def test_bad_id(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("3207-4-90", "rfc3207-1"))
    assert error_of(path) == (
        f"{path}:1: id: 'rfc3207-1' is not a case id (RFC-SECTION-NN like 3207-4.2-01, POL-WORD-NN, ATK-WORD-NN)"
    )


def test_section_must_match_the_id(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("title: a small case", "title: a small case\nsection: RFC 3207 4.2"))
    assert error_of(path) == (
        f"{path}:3: section: section 'RFC 3207 4.2' does not match the id (expected 'RFC 3207 4')"
    )


def test_misspelt_observation_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("{delivered: true}", "{deliverd: true}"))
    assert (
        error_of(path)
        == f"{path}:14: expect.no[0].when.deliverd: unknown observation key 'deliverd' (did you mean 'delivered'?)"
    )


@pytest.mark.parametrize(
    ("when", "problem"),
    [
        (
            '{replies.MAIL: "5xy"}',
            'expect.no[0].when.replies.MAIL: \'5xy\' is not a reply code or class (250, "5xx", "4xx|5xx")',
        ),
        ("{tls: 'yes'}", "expect.no[0].when.tls: tls is true or false, not 'yes'"),
        ("{connections: two}", "expect.no[0].when.connections: connections is a number, not 'two'"),
        ("{server_log: x}", "expect.no[0].when.server_log: server_log is a list of lines: use {has: REGEX}"),
        (
            "{tls_version: {has: x}}",
            "expect.no[0].when.tls_version.has: has is for lists of lines (server_log); tls_version is a string",
        ),
        (
            "{server_log: {has: '(unclosed'}}",
            "expect.no[0].when.server_log.has: bad regular expression:"
            " missing ), unterminated subpattern at position 0",
        ),
        ("{banner: {match: '2..'}}", "expect.no[0].when.banner.match: match is for strings; banner is a reply code"),
        ("{tls: {absent: maybe}}", "expect.no[0].when.tls.absent: absent takes true or false"),
        ("{tls: {nope: true}}", "expect.no[0].when.tls.nope: unknown operator 'nope' (use not, match, has or absent)"),
        (
            "{replies: 250}",
            "expect.no[0].when.replies: replies is a mapping: name one entry with a dotted key, e.g. replies.MAIL",
        ),
        (
            "{plaintext_exposure.headers: true}",
            "expect.no[0].when.plaintext_exposure.headers: plaintext_exposure has envelope and body, not 'headers'",
        ),
        ("{tls.version: x}", "expect.no[0].when.tls.version: tls is not a mapping: drop '.version'"),
        ("{tls: []}", "expect.no[0].when.tls: an empty list matches nothing; give the values it may take"),
        ("{tls: null}", "expect.no[0].when.tls: null is not a value to compare; use {absent: true}"),
    ],
)
def test_bad_conditions(tmp_path: Path, when: str, problem: str) -> None:
    path = write(tmp_path, GOOD.replace("{delivered: true}", when))
    assert error_of(path) == f"{path}:14: {problem}"


def test_condition_forms_parse(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("{delivered: true}", '{starttls_reply: [502, "4xx"]}'))
    test = load_case_file(path).expect.by_policy["no"][0].when[0].test
    assert test == OneOf((Equals(502), CodeClass("4xx")))


def test_client_needs_exactly_one_of_behaviour_and_steps(tmp_path: Path) -> None:
    both = write(
        tmp_path, GOOD.replace("  behaviour: skip", "  behaviour: skip\n  steps: [{ehlo: x.example}]"), "both.yaml"
    )
    assert error_of(both) == f"{both}:8: client: give exactly one of behaviour or steps"
    neither = write(tmp_path, GOOD.replace("  behaviour: skip\n", ""), "neither.yaml")
    assert error_of(neither) == f"{neither}:8: client: give exactly one of behaviour or steps"


def test_steps_are_parsed_and_their_errors_name_the_step(tmp_path: Path) -> None:
    steps = '  steps:\n    - ehlo: a.example\n    - starttls: {inject: "MAIL FROM:<x>\\r\\n"}\n'
    case = load_case_file(write(tmp_path, GOOD.replace("  behaviour: skip\n", steps)))
    assert case.client.steps is not None
    first, second = case.client.steps
    assert isinstance(first, Ehlo) and first.name == "a.example"
    assert isinstance(second, StartTLS) and second.inject == b"MAIL FROM:<x>\r\n"
    bad = "  steps:\n    - ehlo: a.example\n    - starttls: {tls: {client_cert: maybe}}\n"
    path = write(tmp_path, GOOD.replace("  behaviour: skip\n", bad), "bad.yaml")
    assert (
        error_of(path)
        == f"{path}:11: client.steps[1].starttls.tls.client_cert: 'maybe' is not one of none, lab, untrusted"
    )


def test_every_policy_needs_alternatives(tmp_path: Path) -> None:
    text = GOOD.replace('  any:\n    - {verdict: INFORMATIONAL, label: refused, when: {replies.MAIL: "5xx"}}\n', "")
    path = write(tmp_path, text)
    assert (
        error_of(path)
        == f"{path}:11: expect: no alternatives for policy 'preferred' (give expect.preferred or expect.any)"
    )


def test_expectations_only_for_the_cases_policies(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("expect:\n", "policies: [preferred, required]\nexpect:\n"))
    assert (
        error_of(path) == f"{path}:13: expect.no: policy 'no' is not among this case's policies (preferred, required)"
    )


def test_derived_lab_only_requirements(tmp_path: Path) -> None:
    text = GOOD.replace(
        "expect:\n",
        "middlebox: {kind: starttls-strip, answer_starttls: 454}\nverify_client: true\n"
        "policy_params: {max_rcpts_per_msg: 3}\nexpect:\n",
    ).replace('{replies.MAIL: "5xx"}', "{spooled: 0}")
    case = load_case_file(write(tmp_path, text))
    assert case.requires == ("client-cert-ca", "middlebox", "policy-config", "spool")
    assert case.middlebox is not None and case.middlebox.answer_starttls == 454
    assert case.lab_only_reason() is not None and "a middlebox on the link" in case.lab_only_reason()


def test_duplicate_ids_name_both_files(tmp_path: Path) -> None:
    first = write(tmp_path, GOOD, "a/one.yaml")
    second = write(tmp_path, GOOD, "b/two.yaml")
    with pytest.raises(BadInput) as info:
        load_cases([tmp_path])
    assert str(info.value) == f"{second}:1: id: duplicate id '3207-4-90' (also in {first}:1)"


def test_selection_by_directory_file_and_id_prefix(tmp_path: Path) -> None:
    one = write(tmp_path, GOOD, "one.yaml")
    write(tmp_path, GOOD.replace("3207-4-90", "3207-4.2-90"), "sub/two.yaml")
    assert [c.id for c in load_cases([tmp_path])] == ["3207-4-90", "3207-4.2-90"]
    assert [c.id for c in load_cases([one])] == ["3207-4-90"]
    assert [c.id for c in load_cases([one, one])] == ["3207-4-90"]
    # id prefixes select from the catalogue, h2spec style: 3207-4.2 is inside 3207-4
    inside = {c.id for c in load_cases(["3207-4.2"])}
    assert inside and all(i.startswith("3207-4.2-") for i in inside)
    wider = {c.id for c in load_cases(["3207-4"])}
    assert inside < wider and "3207-4-01" in wider and not any(i.startswith("3207-6") for i in wider)
    assert [c.id for c in load_cases(["atk-strip-01"])] == ["ATK-STRIP-01"]
    mixed = [c.id for c in load_cases([one, "3207-6"])]
    assert mixed == ["3207-4-90", "3207-6-01"]


def test_selection_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInput) as info:
        load_cases(["9999-1"])
    assert str(info.value) == "selection: no case id starts with '9999-1' (smtplab list shows them)"
    with pytest.raises(BadInput) as info:
        load_cases([str(tmp_path / "missing.yaml")])
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: no such file or directory"


def test_cases_come_out_in_spec_order(tmp_path: Path) -> None:
    for name, case_id in [
        ("a", "ATK-X-01"),
        ("b", "POL-X-01"),
        ("c", "3207-4.10-01"),
        ("d", "3207-4.2-01"),
        ("e", "2920-3.1-01"),
    ]:
        write(tmp_path, GOOD.replace("3207-4-90", case_id), f"{name}.yaml")
    ids = [c.id for c in load_cases([tmp_path])]
    assert ids == ["2920-3.1-01", "3207-4.2-01", "3207-4.10-01", "POL-X-01", "ATK-X-01"]


def test_list_command_prints_ids_refs_and_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path, GOOD.replace("expect:\n", "policies: [no, required]\nexpect:\n").replace("  any:", "  required:")
    )
    parser = argparse.ArgumentParser()
    list_command.add_arguments(parser)
    assert list_command.run(parser.parse_args([str(path)])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3207-4-90  a small case"
    assert out[1] == "    RFC 3207 4 (MUST)"
    assert out[2] == "    policies: no, required   client: skip from mta-skip"
    assert out[-1] == "1 cases, 2 runs (case x policy)"
    assert list_command.run(parser.parse_args(["--ids", "POL-HAT"])) == 0
    assert capsys.readouterr().out.split() == ["POL-HAT-01", "POL-HAT-02", "POL-HAT-03"]


def test_list_command_on_a_bad_file_raises_bad_input(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("verdict: OK", "verdict: PASS"))
    parser = argparse.ArgumentParser()
    list_command.add_arguments(parser)
    with pytest.raises(BadInput):
        list_command.run(parser.parse_args([str(path)]))


def test_smtplab_list_exits_3_with_one_line(tmp_path: Path) -> None:
    """Through the real command line (needs ``list`` registered in lab/cli.py)."""
    from lab.cli import COMMANDS

    if "list" not in COMMANDS:
        pytest.fail("register 'list': 'list' in lab/cli.py COMMANDS")
    path = write(tmp_path, GOOD.replace("verdict: OK", "verdict: PASS"))
    done = subprocess.run([sys.executable, "-m", "lab", "list", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [
        f"smtplab: {path}:12: expect.no[0].verdict: 'PASS' is not one of"
        " OK, NON-STRICT, FAILED, INFORMATIONAL, UNIMPLEMENTED"
    ]


def test_envelope_addresses_and_markers_for_exposure_checks(tmp_path: Path) -> None:
    behaviour = load_case_file(write(tmp_path, GOOD, "behaviour.yaml"))
    assert behaviour.envelope_addresses() == ("alice@example.net", "bob@example.com")
    assert behaviour.markers() == ("SMTPLAB-MARKER-3207-4-90",)
    steps = (
        "  steps:\n"
        "    - send: 'MAIL FROM:<eve@a.example>'\n"
        '    - starttls: {inject: "RCPT TO:<inj@b.example>\\r\\n"}\n'
        "    - if: {capability: STARTTLS, then: [{mail: {from: x@c.example, to: [y@d.example], marker: M-1}}]}\n"
    )
    scripted = load_case_file(write(tmp_path, GOOD.replace("  behaviour: skip\n", steps), "steps.yaml"))
    assert scripted.envelope_addresses() == ("eve@a.example", "inj@b.example", "x@c.example", "y@d.example")
    assert scripted.markers() == ("M-1",)


def test_an_unknown_client_host_names_its_host_line(tmp_path: Path) -> None:
    from lab.scenario.loader import check_client_hosts

    path = write(tmp_path, GOOD.replace("host: mta-skip", "host: mta-skp"))
    cases = load_cases([path])
    check_client_hosts(load_cases([write(tmp_path, GOOD, "good.yaml")]), {"mta-skip"})
    with pytest.raises(BadInput) as info:
        check_client_hosts(cases, {"mta-skip", "esa"})
    assert str(info.value) == f"{path}:8: client.host: unknown host 'mta-skp' (known: esa, mta-skip)"


def test_smtplab_run_refuses_an_unknown_client_host_before_running(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("host: mta-skip", "host: nobody"))
    done = subprocess.run(
        [sys.executable, "-m", "lab", "run", str(path), "--report-dir", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    [line] = done.stderr.splitlines()
    assert line.startswith(f"smtplab: {path}:8: client.host: unknown host 'nobody' (known: attacker, esa, ")
    assert not (tmp_path / "report" / "index.json").exists()


def test_a_long_hostile_value_is_quoted_as_an_excerpt(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("when: {delivered: true}", f"when: {{delivered: {'y' * 5000}}}"))
    message = error_of(path)
    assert message.endswith("expect.no[0].when.delivered: delivered is true or false, not " + repr("y" * 60) + "...")
