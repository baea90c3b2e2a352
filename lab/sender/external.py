"""The ``external`` sender kind: a sender the harness starts, feeds and watches as its profile says
(conformance/senders/*.yaml, docs/senders.md).

Every case's receiver is staged on its own loopback address (``receivers.network``, case N at .N) over real TCP,
a relay in front where the case has a middlebox. The harness writes the profile's route files (a Postfix
transport map, a TLS policy map), runs ``start``, hands the sender one message per case (a command with the
message on its standard input, or SMTP to the sender's own listener), then serves the receivers until every case
is settled (a receiver took the message, or the sender's log says deferred or bounced) or ``wait`` seconds have
passed, and runs ``stop``. Placeholders in commands and route lines: ``{domain}``, ``{host}``, ``{port}``,
``{name}`` (the receiver's host name), ``{to}``, ``{from}``, ``{case}``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import smtplib
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.error import CannotListenError

from lab.errors import BadInput, HarnessError
from lab.net.capture import Capture
from lab.net.tcp import TCPCarrier
from lab.policy.modes import DELIVERY_TLS_SPELLINGS, DeliveryTLS, parse_delivery_tls
from lab.sender.cases import SenderCase
from lab.sender.receivers import Staged, middleboxes, receiver_factory
from lab.sender.seam import MAIL_FROM, Delivery
from lab.smtp.transcript import Kind, note
from lab.tls.certs import LabCA
from lab.tls.keylog import KeyLog
from lab.yamlsource import DocumentBuilder, read_yaml

DEFAULT_NETWORK = "127.77.0.0/24"
DEFAULT_PORT = 2525
DEFAULT_WAIT = 30.0
COMMAND_TIMEOUT = 60.0  # seconds a start, stop or submit command may take
POLL = 0.2  # seconds between looks at the receivers and the sender's log while waiting
_STATUS = re.compile(r"\bto=<([^>]*)>.*?\bstatus=(sent|deferred|bounced)\b")


@dataclass(frozen=True)
class Route:
    file: str
    line: str


@dataclass(frozen=True)
class SenderProfile:
    name: str
    policy: DeliveryTLS
    declared: str  # the policy as written (``secure`` is not ``verify``: docs/rules.md §6.6)
    submit_command: tuple[str, ...] = ()
    submit_smtp: str | None = None
    any_exit: bool = False
    network: str = DEFAULT_NETWORK
    port: int = DEFAULT_PORT
    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    maillog: str | None = None
    wait: float = DEFAULT_WAIT
    file: str | None = None


class _ProfileReader(DocumentBuilder):
    SCHEMA = "sender-profile.schema.json"

    def build(self) -> SenderProfile:
        if not isinstance(self.doc, dict):
            raise BadInput("a sender profile is a mapping (name, policy, submit ...)", file=self.file, line=1)
        if self.doc.get("policy") is False:
            self.doc["policy"] = "no"  # YAML 1.1 reads `no` as false
        self.validate()
        doc = self.doc
        policy = parse_delivery_tls(str(doc["policy"]))
        if policy is None:
            raise self.fail(f"{doc['policy']!r} is not one of {DELIVERY_TLS_SPELLINGS}", ["policy"])
        receivers = doc.get("receivers", {})
        network = receivers.get("network", DEFAULT_NETWORK)
        try:
            net = ipaddress.ip_network(network)
        except ValueError:
            raise self.fail(f"{network!r} is not a network (127.x.y.0/24)", ["receivers", "network"]) from None
        if not net.subnet_of(ipaddress.ip_network("127.0.0.0/8")) or net.num_addresses < 32:  # type: ignore[arg-type]
            raise self.fail("receivers stay on loopback: a 127.x.y.z block of at least /27", ["receivers", "network"])
        submit = doc["submit"]
        outcome = doc.get("outcome", {})
        return SenderProfile(
            name=doc["name"],
            policy=policy,
            declared=str(doc["policy"]).lower(),
            submit_command=tuple(submit.get("command", ())),
            submit_smtp=submit.get("smtp"),
            any_exit=bool(submit.get("any_exit", False)),
            network=network,
            port=receivers.get("port", DEFAULT_PORT),
            start=tuple(doc.get("start", ())),
            stop=tuple(doc.get("stop", ())),
            routes=tuple(Route(r["file"], r["line"]) for r in doc.get("routes", ())),
            maillog=outcome.get("maillog"),
            wait=float(doc.get("wait", DEFAULT_WAIT)),
            file=self.file,
        )


def load_sender_profile(path: str | Path) -> SenderProfile:
    doc = read_yaml(path, str(path))
    if doc is None:
        raise BadInput("empty file: a sender profile needs name, policy, submit", file=str(path))
    return _ProfileReader(doc, str(path)).build()


def message(case: SenderCase) -> bytes:
    """The one message a sender delivers for ``case``: the body marker is what the capture looks for."""
    return (
        f"From: <{MAIL_FROM}>\r\nTo: <{case.recipient}>\r\nSubject: smtplab receiver case {case.id}\r\n"
        f"Message-ID: <{case.id.lower()}@smtplab.test>\r\n\r\n{case.marker}\r\n"
    ).encode()


@dataclass
class ExternalSender:
    profile: SenderProfile
    _log_offset: int = field(default=0, init=False)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def address(self) -> str:
        return self.profile.submit_smtp or " ".join(self.profile.submit_command[:1]) or "external"

    @property
    def policy(self) -> DeliveryTLS:
        return self.profile.policy

    @property
    def carrier(self) -> str:
        return "tcp"

    # -- the run

    def deliver(self, cases: Sequence[SenderCase], ca: LabCA) -> list[Delivery]:
        from twisted.internet import reactor

        hosts = list(ipaddress.ip_network(self.profile.network).hosts())
        if len(cases) > len(hosts) - 1:
            raise HarnessError(f"{len(cases)} cases do not fit in {self.profile.network}")
        staged: list[Staged] = []
        nets = []
        try:
            for index, case in enumerate(cases):
                capture, keylog = Capture(), KeyLog()
                net = TCPCarrier(capture=capture, reactor=reactor, connect_timeout=5.0)
                nets.append(net)
                host = str(hosts[index])
                factory = receiver_factory(case, ca, keylog=keylog)
                boxes = middleboxes(case)
                try:
                    net.listen(host, self.profile.port, factory)
                except CannotListenError as exc:  # the address is the harness's problem, not the sender's
                    raise HarnessError(
                        f"cannot stage {case.id}'s receiver on {host}:{self.profile.port}: {exc}"
                    ) from None
                where = (host, self.profile.port)
                if boxes:
                    net.place_relay(host, self.profile.port, boxes)  # in front; the sender is routed to it
                    where = net.ports[(host, self.profile.port)]
                staged.append(Staged(case, factory, capture, keylog, where[0], where[1], boxes))
            self._write_routes(staged)
            self._offset_log()
            begin = time.monotonic()
            if self.profile.start:
                self._command(self.profile.start, "start", None, {})
            try:
                errors = self._submit(staged, reactor)
                outcomes = self._wait(staged, reactor)
            finally:
                if self.profile.stop:
                    self._command(self.profile.stop, "stop", None, {})
            seconds = time.monotonic() - begin
            return [self._delivery(s, outcomes, seconds, errors.get(s.case.id)) for s in staged]
        finally:
            for net in nets:
                with contextlib.suppress(HarnessError):
                    net.run_until(net.close(abort=True), timeout=10)

    def _values(self, s: Staged) -> dict[str, str]:
        case = s.case
        return {
            "domain": case.domain,
            "host": s.host,
            "port": str(s.port),
            "name": case.hostname,
            "to": case.recipient,
            "from": MAIL_FROM,
            "case": case.id,
        }

    def _write_routes(self, staged: Sequence[Staged]) -> None:
        for route in self.profile.routes:
            lines = [_fill(route.line, self._values(s), "routes.line") for s in staged]
            try:
                Path(route.file).write_text("\n".join(lines) + "\n")
            except OSError as exc:
                raise HarnessError(f"cannot write the route file {route.file}: {exc.strerror or exc}") from None

    def _command(
        self, argv: Sequence[str], what: str, stdin: bytes | None, values: dict[str, str], any_exit: bool = False
    ) -> None:
        command = [_fill(part, values, what) for part in argv]
        try:
            done = subprocess.run(command, input=stdin, capture_output=True, timeout=self.profile.wait, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HarnessError(f"the sender's {what} command {command[0]!r} failed: {str(exc)[-120:]}") from None
        if done.returncode != 0 and not any_exit:
            said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
            raise HarnessError(
                f"the sender's {what} command {command[0]!r} exited {done.returncode}"
                + (f": {said[-1]}" if said else "")
            )

    def _submit(self, staged: Sequence[Staged], reactor: Any) -> dict[str, str]:
        """Hand the sender one message per case. A command runs in a thread while the receivers serve (a sender
        such as swaks delivers before it exits)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(s: Staged) -> None:
            if self.profile.submit_smtp:
                host, _, port = self.profile.submit_smtp.rpartition(":")
                try:
                    with smtplib.SMTP(host.strip("[]"), int(port), timeout=COMMAND_TIMEOUT) as smtp:
                        smtp.sendmail(MAIL_FROM, [s.case.recipient], message(s.case))
                except (OSError, ValueError, smtplib.SMTPException) as exc:
                    raise HarnessError(f"submission to {self.profile.submit_smtp} failed: {exc}") from None
            else:
                self._command(
                    self.profile.submit_command, "submit", message(s.case), self._values(s), self.profile.any_exit
                )

        with ThreadPoolExecutor(max_workers=min(32, max(1, len(staged)))) as pool:
            futures = [pool.submit(one, s) for s in staged]
            _until(reactor, lambda: all(f.done() for f in futures), COMMAND_TIMEOUT + 10)
        errors = {}
        for s, future in zip(staged, futures, strict=True):
            exc = future.exception()
            if exc is not None:
                errors[s.case.id] = str(exc) if isinstance(exc, HarnessError) else f"submission failed: {exc}"
        if len(errors) == len(staged) and staged:
            raise HarnessError(next(iter(errors.values())))  # nothing was handed over: the sender is at fault
        return errors

    def _offset_log(self) -> None:
        path = self.profile.maillog
        self._log_offset = Path(path).stat().st_size if path and Path(path).exists() else 0

    def _log_outcomes(self) -> dict[str, str]:
        """``recipient -> sent|deferred|bounced``: the sender's last word on each, from this run's log lines."""
        return {m.group(1): m.group(2) for line in self.log_lines() if (m := _STATUS.search(line))}

    def log_lines(self) -> list[str]:
        """The lines the sender's log gained since the run began."""
        path = self.profile.maillog
        if not path:
            return []
        try:
            with open(path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def _wait(self, staged: Sequence[Staged], reactor: Any) -> dict[str, str]:
        outcomes: dict[str, str] = {}

        def settled() -> bool:
            outcomes.update(self._log_outcomes())
            return all(s.factory.messages or s.case.recipient in outcomes for s in staged)

        # A sender that is its own submit command (swaks) is done once the command exited.
        wait = POLL if self.profile.any_exit else self.profile.wait
        _until(reactor, settled, wait, must=False)  # what did not settle is judged as it stands
        _until(reactor, lambda: False, POLL, must=False)  # let closes in flight land
        outcomes.update(self._log_outcomes())
        return outcomes

    def _delivery(self, s: Staged, outcomes: dict[str, str], seconds: float, failed: str | None) -> Delivery:
        said = outcomes.get(s.case.recipient)
        lines = case_lines(self.log_lines(), s.case.recipient, s.host)
        entries = [note(f"sender log: {line}", Kind.MAILLOG) for line in lines]
        entries += [note(f"middlebox: {text}", Kind.MIDDLEBOX) for text in s.box_notes()]
        outcome = said if said in ("deferred", "bounced") else None
        return Delivery(s, sender_outcome=outcome, entries=entries, seconds=seconds, error=failed)


_QUEUE_ID = re.compile(r"\]: ([0-9A-Za-z]{6,}): ")


def case_lines(lines: Sequence[str], recipient: str, host: str) -> list[str]:
    """The sender's log lines about one case: its message's (by the queue ids of the lines naming its recipient)
    and its receiver's (``[host]``)."""
    ids = {m.group(1) for line in lines if f"<{recipient}>" in line and (m := _QUEUE_ID.search(line))}
    return [
        line
        for line in lines
        if f"[{host}]" in line or ((m := _QUEUE_ID.search(line)) is not None and m.group(1) in ids)
    ]


def _until(reactor: Any, done: Any, timeout: float, *, must: bool = True) -> None:
    """Serve the receivers (drive the reactor) until ``done()`` holds, looking every ``POLL`` seconds; after
    ``timeout`` seconds a ``HarnessError`` when ``must``, else just return."""
    from twisted.internet import defer, task

    from lab.net.carrier import CarrierTimeout, drive

    fired: defer.Deferred[None] = defer.Deferred()

    def look() -> None:
        if not fired.called and done():
            fired.callback(None)

    loop = task.LoopingCall(look)
    loop.clock = reactor
    loop.start(POLL, now=True)
    try:
        drive(reactor, fired, timeout)
    except CarrierTimeout:
        if must:
            raise HarnessError(f"the sender's submissions did not finish within {timeout:g} s") from None
    finally:
        loop.stop()


def _fill(text: str, values: dict[str, str], what: str) -> str:
    try:
        return text.format_map(values)
    except (KeyError, ValueError, IndexError) as exc:
        raise BadInput(
            f"placeholder {exc} in {text!r}: use {', '.join('{' + k + '}' for k in values)}", field=what
        ) from None
