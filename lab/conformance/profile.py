"""Target profiles (``conformance/targets/*.yaml``): one system under test and how to talk to it.

A profile says where a peer MTA listens, which TLS policy it *declares* (the policy its cases are judged
under), how the client presents itself (EHLO name, trust anchor, client certificate, envelope), the limits of
a run (timeouts, concurrency) and the deviations the target is known to have (``lab.conformance.deviations``).
Every error names ``file:line: field`` (``lab.yamlsource``); paths inside a profile are relative to it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.conformance.deviations import Deviation
from lab.errors import BadInput
from lab.policy.modes import TLSMode, parse_tls_mode
from lab.scenario.result import Target
from lab.smtp.steps import DEFAULT_EHLO
from lab.yamlsource import DocumentBuilder, FieldPath, read_yaml

SCHEMA = "profile.schema.json"
DEFAULT_FROM = "probe@smtplab.invalid"
DEFAULT_DOMAIN = "example.com"


@dataclass(frozen=True)
class Timeouts:
    """Seconds: to connect, to wait for one reply, for one whole case (every wait is bounded)."""

    connect: float = 10.0
    reply: float = 30.0
    case: float = 120.0


@dataclass(frozen=True)
class Profile:
    name: str
    host: str
    port: int
    policy: TLSMode
    verify_client: bool = False
    description: str = ""
    allow_remote: bool = False
    ehlo: str = DEFAULT_EHLO
    server_name: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    mail_from: str = DEFAULT_FROM
    rcpt_to: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    concurrency: int = 1
    deviations: tuple[Deviation, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)  # the profile's ``facts`` mapping, as written
    maillog: tuple[Path, str] | None = None  # the target's mail log (file, dialect): the ``maillog`` fact
    file: str | None = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def target(self) -> Target:
        """The result record's view of this profile."""
        return Target(name=self.name, address=self.address, policy=self.policy)

    def at(self, address: str, *, field: str = "address", allow_remote: bool = False) -> Profile:
        """The same profile at another ``HOST:PORT`` (tests put a placeholder profile on a fresh port);
        ``allow_remote``: the caller vouches for the address (netns: a topology host's, in the lab's namespaces)."""
        host, port = parse_address(address, field=field, allow_remote=self.allow_remote or allow_remote)
        return dataclasses.replace(self, host=host, port=port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(
    text: str, *, field: str = "address", allow_remote: bool = False, file: str | None = None, line: int | None = None
) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); a host off this machine is refused unless ``allow_remote``.

    ``localhost`` means 127.0.0.1. Without ``allow_remote`` the host must be a loopback IP literal, so no
    name lookup can send the lab's traffic elsewhere.
    """

    def bad(problem: str) -> BadInput:
        return BadInput(problem, file=file, line=line, field=field)

    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise bad(f"{text!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise bad(f"{text!r} is not HOST:PORT")
        host = host[1:-1]
    elif ":" in host:
        raise bad(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not allow_remote:
            raise bad(f"{host!r} is not a loopback IP address (a host name needs allow_remote)") from None
        if not re.fullmatch(
            r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?", host
        ):
            raise bad(f"{host!r} is not a host name") from None
        return host, int(port_text)
    if not address.is_loopback and not allow_remote:
        raise bad(f"{host} is not a loopback address; smtplab talks to 127.0.0.0/8 or ::1 unless told otherwise")
    return str(address), int(port_text)


def default_recipient(host: str) -> str:
    """``postmaster@`` the target's domain, or example.com when the target is an IP literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        domain = host.rstrip(".").partition(".")[2] or host
        return f"postmaster@{domain.lower()}"
    return f"postmaster@{DEFAULT_DOMAIN}"


def _forgive_policy(mapping: Any) -> None:
    """YAML 1.1 reads an unquoted ``no`` as false, and ESA spells ``Preferred``: accept both before the schema."""
    if not isinstance(mapping, dict) or "policy" not in mapping:
        return
    value = mapping["policy"]
    if value is False:
        mapping["policy"] = "no"
    elif isinstance(value, str) and parse_tls_mode(value) is not None:
        mapping["policy"] = str(parse_tls_mode(value))  # the schema lists the canonical names only


class _Builder(DocumentBuilder):
    """Turns a profile document into a ``Profile``, naming the line of anything wrong."""

    SCHEMA = SCHEMA

    def __init__(self, doc: Any, path: Path) -> None:
        super().__init__(doc, str(path))
        self.path = path

    def normalise(self) -> None:
        doc = self.doc
        _forgive_policy(doc)
        if isinstance(doc, dict) and isinstance(doc.get("deviations"), list):
            for item in doc["deviations"]:
                _forgive_policy(item)

    def file_path(self, value: str, where: FieldPath) -> Path:
        resolved = (self.path.parent / value).resolve()
        if not resolved.is_file():
            raise self.fail(f"no such file: {value} (paths are relative to the profile)", where)
        return resolved

    def deviation(self, item: Any, index: int) -> Deviation:
        where: FieldPath = ["deviations", index]
        pattern = None
        if "match" in item:
            try:
                pattern = re.compile(item["match"])
            except re.error as exc:
                raise self.fail(f"not a regular expression: {exc}", [*where, "match"]) from None
        policy = TLSMode(item["policy"]) if "policy" in item else None
        return Deviation(item["case"], item["reason"], policy, pattern, self.line(where))

    def default_recipient(self, host: str) -> str:
        """Without ``envelope.to``: postmaster@ the declared accepted domain, else of the server name or host."""
        domain = self.doc.get("facts", {}).get("accepted_domain")
        return f"postmaster@{domain}" if domain else default_recipient(self.doc.get("server_name") or host)

    def build(self) -> Profile:
        self.normalise()
        self.validate()
        doc = self.doc
        allow_remote = bool(doc.get("allow_remote", False))
        host, port = parse_address(
            doc["address"], allow_remote=allow_remote, file=self.file, line=self.line(["address"])
        )
        ca_file = self.file_path(doc["ca_file"], ["ca_file"]) if "ca_file" in doc else None
        cert = key = None
        if "client_cert" in doc:
            cert = self.file_path(doc["client_cert"]["cert_file"], ["client_cert", "cert_file"])
            key = self.file_path(doc["client_cert"]["key_file"], ["client_cert", "key_file"])
        envelope = doc.get("envelope", {})
        to = envelope.get("to", [])
        rcpt_to = tuple([to] if isinstance(to, str) else to)
        for i, address in enumerate(rcpt_to):
            if "@" not in address:
                where: FieldPath = ["envelope", "to"] if isinstance(to, str) else ["envelope", "to", i]
                raise self.fail(f"{address!r} is not a mail address", where)
        mail_from = envelope.get("from", DEFAULT_FROM)
        if mail_from and "@" not in mail_from:
            raise self.fail(f'{mail_from!r} is not a mail address (use "" for the null sender)', ["envelope", "from"])
        timeouts = Timeouts(**{k: float(v) for k, v in doc.get("timeouts", {}).items()})
        if timeouts.reply > timeouts.case:
            raise self.fail("the reply timeout is longer than the case timeout", ["timeouts", "reply"])
        deviations = tuple(self.deviation(item, i) for i, item in enumerate(doc.get("deviations", [])))
        maillog = None
        if "maillog" in doc:  # the file may not exist yet (a log is created on first write): read at run time
            maillog = ((self.path.parent / doc["maillog"]["file"]).resolve(), doc["maillog"]["dialect"])
        return Profile(
            name=doc["name"],
            host=host,
            port=port,
            policy=TLSMode(doc["policy"]),
            verify_client=bool(doc.get("verify_client", False)),
            description=doc.get("description", ""),
            allow_remote=allow_remote,
            ehlo=doc.get("ehlo", DEFAULT_EHLO),
            server_name=doc.get("server_name"),
            ca_file=ca_file,
            client_cert=cert,
            client_key=key,
            mail_from=mail_from,
            rcpt_to=rcpt_to or (self.default_recipient(host),),
            timeouts=timeouts,
            concurrency=int(doc.get("concurrency", 1)),
            deviations=deviations,
            facts=dict(doc.get("facts", {})),
            maillog=maillog,
            file=self.file,
        )


def load_profile(path: str | Path) -> Profile:
    """Read, validate and build a target profile; every problem is a ``BadInput`` with file and line."""
    path = Path(path)
    return _Builder(read_yaml(path), path).build()


def load_profiles(paths: Iterable[str | Path]) -> dict[str, Profile]:
    """Several profiles (e.g. ``conformance/targets/*.yaml``) by name; two with one name is an error."""
    out: dict[str, Profile] = {}
    for path in sorted(Path(p) for p in paths):
        profile = load_profile(path)
        if profile.name in out:
            raise BadInput(
                f"target name {profile.name!r} is also used by {out[profile.name].file}", file=str(path), field="name"
            )
        out[profile.name] = profile
    return out
