"""``smtplab demo``: narrated lessons for a classroom (docs/classroom.md).

A lesson is data (a YAML file, ``lab/lessons/*.yaml`` or a teacher's own, checked against
``lab/schemas/lesson.schema.json``): steps of narration, the ``smtplab cli`` answers that make the change, then
either a catalogue case and the policy it runs under (the appliance receiving) or a delivery to a domain (the
appliance sending), what the lesson expects and what to notice. Nothing here re-implements the lab: the answers
go through the real CLI (``lab.appliance_cli``) on the lesson's own copy of the built-in appliance, the case
through ``lab.pipeline`` on the memory carrier, the delivery through the delivery engine
(``lab.appliance_cli.delivery``, as ``tlsverify`` does), the picture through ``lab.report.ladder``. A step may
instead run one virtual day of the built-in lab's outbound mail (``day: outbound``, ``lab.outbound.labday``:
MTA-STS applied, retries, the TLS-RPT report at midnight) and show its mail log.
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from lab.appliance.config import default_appliance_path, load_appliance
from lab.appliance_cli.context import Context
from lab.appliance_cli.delivery import DeliveryReport, deliver
from lab.appliance_cli.document import ConfigDocument
from lab.appliance_cli.shell import Shell
from lab.appliance_cli.terminal import Terminal
from lab.errors import BadInput
from lab.net.topology import default_topology
from lab.pipeline import RunRequest, execute, make_plan
from lab.report import ladder, visible
from lab.report.terminal import LINE_STYLES, print_ladder
from lab.scenario.loader import load_cases
from lab.scenario.result import CaseRun
from lab.scenario.verdict import Verdict
from lab.yamlsource import DocumentBuilder, read_yaml

SUFFIX = ".yaml"


@dataclass(frozen=True)
class Delivery:
    """The appliance sends one message to ``postmaster@DOMAIN``; ``receivers``: what the lab serves at an MX
    host (``lab.appliance_cli.delivery.RECEIVER_MODES``); ``expect``: delivered, deferred or bounced."""

    domain: str
    receivers: dict[str, str]
    expect: str | None = None


@dataclass(frozen=True)
class Step:
    narration: str
    notice: str
    case: str | None = None
    policy: str | None = None
    cli: tuple[str, ...] = ()
    show: tuple[str, ...] = ()
    expect: Verdict | None = None
    delivery: Delivery | None = None
    day: str | None = None  # "outbound": the step runs lab.outbound.labday


@dataclass(frozen=True)
class Lesson:
    id: str
    title: str
    intro: str
    steps: tuple[Step, ...]
    file: str


class _LessonBuilder(DocumentBuilder):
    SCHEMA = "lesson.schema.json"

    def build(self, known_cases: set[str]) -> Lesson:
        self.validate()
        doc: dict[str, Any] = self.doc
        steps = []
        for i, raw in enumerate(doc["steps"]):
            runs_case = "case" in raw or "policy" in raw or "expect" in raw
            if [runs_case, "delivery" in raw, "day" in raw].count(True) != 1:
                raise self.fail("a step runs one of a case (case, policy), a delivery or a day", ["steps", i])
            if runs_case and ("case" not in raw or "policy" not in raw):
                raise self.fail("a step that runs a case gives both case and policy", ["steps", i])
            if runs_case and raw["case"] not in known_cases:
                raise self.fail(f"no case {raw['case']!r} in the catalogue (see `smtplab list`)", ["steps", i, "case"])
            delivery = None
            if "delivery" in raw:
                item = raw["delivery"]
                receivers = {str(host).lower().rstrip("."): mode for host, mode in item.get("receivers", {}).items()}
                delivery = Delivery(item["domain"].lower().rstrip("."), receivers, item.get("expect"))
            steps.append(
                Step(
                    narration=raw["narration"].strip(),
                    notice=raw["notice"].strip(),
                    case=raw.get("case"),
                    policy=raw.get("policy"),
                    cli=tuple(str(answer) for answer in raw.get("cli", [])),
                    show=tuple(raw.get("show", [])),
                    expect=Verdict(raw["expect"]) if "expect" in raw else None,
                    delivery=delivery,
                    day=raw.get("day"),
                )
            )
        return Lesson(doc["id"], doc["title"], doc["intro"].strip(), tuple(steps), self.file)


def load_lesson(path: str | Path, known_cases: set[str] | None = None) -> Lesson:
    """One lesson file; any problem is one ``BadInput`` line naming ``FILE:LINE: field``."""
    if known_cases is None:
        known_cases = {case.id for case in load_cases()}
    return _LessonBuilder(read_yaml(path), str(path)).build(known_cases)


def builtin_lessons() -> list[Lesson]:
    """The lessons shipped in ``lab/lessons``, in file-name order."""
    known = {case.id for case in load_cases()}
    folder = resources.files("lab").joinpath("lessons")
    files = sorted((entry for entry in folder.iterdir() if entry.name.endswith(SUFFIX)), key=lambda e: e.name)
    return [load_lesson(Path(str(entry)), known) for entry in files]


def cli_session(config: Path, answers: Sequence[str]) -> tuple[int, list[str]]:
    """Run ``answers`` through ``smtplab cli`` on ``config``; its exit code and transcript lines."""
    out = io.StringIO()
    term = Terminal([*answers, "quit"], out)
    doc = ConfigDocument(config)
    code = Shell(Context(term, doc)).run()
    return code, out.getvalue().replace(str(config), config.name).splitlines()


def run_step(step: Step) -> CaseRun:
    """The step's case under its policy: the real runner on the memory carrier."""
    assert step.case is not None and step.policy is not None  # the loader makes sure
    plan = make_plan(RunRequest(selectors=(step.case,), policies=(step.policy,), timestamps=False))
    result = execute(plan, plan.targets[0], [(step.case, step.policy)])
    if not result.runs:
        raise BadInput(f"the case {step.case} does not run under {step.policy}")
    return result.runs[0]


class Teacher:
    """Runs lessons on a console; ``wait`` is called between steps (Enter, or nothing under ``--no-pause``);
    ``log`` gets the mail log of every ``day`` step."""

    def __init__(self, console: Console, wait: Callable[[], None], log: TextIO | None = None) -> None:
        self.console = console
        self.wait = wait
        self.log = log

    def say(self, text: str = "") -> None:
        self.console.print(text, soft_wrap=True)

    def lesson(self, lesson: Lesson) -> bool:
        """Every step of ``lesson``; True when each step's verdict was the one it expects."""
        self.say(f"=== Lesson {lesson.id}: {lesson.title}")
        self.say(lesson.intro)
        self.say()
        good = True
        with tempfile.TemporaryDirectory(prefix="smtplab-demo-") as scratch:
            config = Path(scratch) / "appliance.yaml"  # the built-in appliance until the first commit
            for number, step in enumerate(lesson.steps, 1):
                good = self.step(lesson, number, step, config) and good
        return good

    def step(self, lesson: Lesson, number: int, step: Step, config: Path) -> bool:
        self.say(f"--- {lesson.id}, step {number} of {len(lesson.steps)}")
        self.say(step.narration)
        good = True
        if step.cli:
            code, lines = cli_session(config, step.cli)
            shown = [line for line in lines if not step.show or any(text in line for text in step.show)]
            self.say()
            self.say(f"$ smtplab cli --config appliance.yaml   ({len(step.cli)} answers)")
            for line in shown:
                self.say(f"  {line}")
            if len(shown) < len(lines):
                self.say(f"  ({len(lines) - len(shown)} more lines of the session not shown)")
            if code != 0:
                self.say(f"! smtplab cli exited {code}: the lesson's answers were refused")
                good = False
        if step.delivery is not None:
            good = self.delivery(step.delivery, config) and good
        elif step.day is not None:
            good = self.day() and good
        else:
            good = self.case(step) and good
        self.say(f"What to notice: {step.notice}")
        self.say()
        self.wait()
        return good

    def case(self, step: Step) -> bool:
        """The step's case: its ladder, mail log and verdict."""
        good = True
        self.say()
        self.say(f"$ smtplab run --policy {step.policy} {step.case}")
        run = run_step(step)
        print_ladder(run, self.console)
        log = run.observed.server_log or []
        self.say(f"mail log ({len(log)} lines):")
        for record in log:
            self.say(f"  {visible(str(record.get('line', '')))}")
        self.say()
        if step.expect is not None and run.verdict != step.expect:
            self.say(f"! verdict {run.verdict}, the lesson expects {step.expect}: {run.reason}")
            good = False
        else:
            self.say(f"verdict: {run.verdict}: {run.reason}")
        return good

    def delivery(self, step: Delivery, config: Path) -> bool:
        """One delivery under the lesson's appliance: each connection's ladder, the mail log, the alert mailbox."""
        appliance = load_appliance(config if config.exists() else default_appliance_path())
        self.say()
        flags = "".join(f" --receiver {host}={mode}" for host, mode in step.receivers.items())
        self.say(f"$ smtplab cli --config appliance.yaml{flags}")
        self.say(f"  tlsverify {step.domain}")
        report = deliver(appliance, default_topology(), step.domain, overrides=step.receivers)
        self.say(f"destination control for {step.domain}: TLS {report.control.tls}")
        for served in report.receivers:
            self.say(f"the lab serves {served.mx.exchange} [{', '.join(served.mx.addresses)}]: it {served.describe()}")
        for attempt in report.attempts:
            self.say()
            self.say(
                f"DCID {attempt.dcid}: the appliance ({attempt.sending_ip}) to {attempt.mx_host} "
                f"({attempt.receiving_ip}), TLS {attempt.tls_setting}"
            )
            picture = ladder.build(
                report.transcripts.get(attempt.dcid, []),
                client="appliance (sending)",
                server=f"receiver {attempt.mx_host}",
            )
            for line, style in ladder.text_lines(picture, self.console.width):
                self.console.print(Text(line, LINE_STYLES.get(style, "bold")), soft_wrap=True)
        self.say()
        self.say(f"mail log ({len(report.log)} lines):")
        for line in report.log:
            self.say(f"  {visible(line)}")
        self.alert_mailbox(report)
        self.say()
        if step.expect is not None and report.state != step.expect:
            self.say(f"! the message was {report.state}, the lesson expects {step.expect}")
            return False
        how = (
            "over TLS"
            if report.tls and report.state == "delivered"
            else "in the clear"
            if report.state == "delivered"
            else "nothing sent"
        )
        self.say(f"result: {report.state} ({how})")
        return True

    def day(self) -> bool:
        """One virtual day of the built-in lab's outbound mail: its mail log, what the MX hosts received, the
        TLS-RPT report; as expected when the report reached its rua address."""
        from lab.outbound.labday import outbound_day

        self.say()
        with tempfile.TemporaryDirectory(prefix="smtplab-day-") as scratch:
            result = outbound_day(Path(scratch), self.log)
            self.say(f"mail log ({len(result.log)} lines):")
            for line in result.log:
                self.say(f"  {visible(line)}")
            self.say()
            for host, messages in result.received.items():
                rcpts = ", ".join(r for m in messages for r in m.rcpt_to)
                self.say(f"{host} received {len(messages)} message(s): {rcpts}")
            for sent in result.reports:
                self.say(f"TLS-RPT report {sent.path.name} to {', '.join(sent.rua)}:")
                for line in json.dumps(json.loads(gzip.decompress(sent.path.read_bytes())), indent=2).splitlines():
                    self.say(f"  {line}")
            delivered = {r for m in result.received.get("mx.secure.example", []) for r in m.rcpt_to}
        if "tlsrpt@secure.example" not in delivered:
            self.say("! the TLS-RPT report did not reach tlsrpt@secure.example")
            return False
        return True

    def alert_mailbox(self, report: DeliveryReport) -> None:
        if not report.alert_messages:
            return
        self.say()
        for box, message in report.alert_messages:
            self.say(f"alert mailbox {box} (state/alerts/{box}/new/), one message:")
            head, _, body = message.decode("ascii", "replace").partition("\r\n\r\n")
            for line in head.splitlines():
                if line.split(":")[0] in ("From", "To", "Subject"):
                    self.say(f"  {visible(line)}")
            for line in body.splitlines()[:3]:  # "The Warning message is:", a blank line, the alert's text
                self.say(f"  {visible(line)}".rstrip())
