"""External targets for the runner, from ``smtplab run`` flags or from a target profile."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.conformance.profile import Profile, default_recipient, load_profile, parse_address
from lab.errors import BadInput
from lab.names import check_loopback
from lab.policy.modes import TLSMode
from lab.scenario.logevents import LOG_DIALECTS, MailLogFile
from lab.scenario.runner import ExternalTarget
from lab.tls.certs import CertKey, load_pem


@dataclass(frozen=True)
class TargetFlags:
    """What a user says about an external target beside (or instead of) a profile: the ``smtplab run`` flags of
    that name (``--target``, ``--ca``, ``--accepted-domain`` ...), and the plugin's ``--smtplab-*`` equivalents.
    ``None`` is "not given": a profile's value, or the default, applies."""

    target: str | None = None
    name: str | None = None
    ehlo: str | None = None
    mail_from: str | None = None
    rcpt_to: str | None = None
    ca: str | None = None
    server_name: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify_client: bool = False
    accepted_domain: str | None = None
    refused_domain: str | None = None
    max_message_size: int | None = None
    max_recipients: int | None = None
    tls_mandatory_sender: str | None = None
    blocked_client: str | None = None
    maillog: str | None = None
    maillog_dialect: str | None = None

    @classmethod
    def from_namespace(cls, values: object) -> TargetFlags:
        """The flags from an object carrying them as attributes (``smtplab run``'s parsed arguments)."""
        flags: dict[str, Any] = {f.name: getattr(values, f.name, f.default) for f in dataclasses.fields(cls)}
        return cls(**flags)


NO_FLAGS = TargetFlags()


def _read_pem(path: str | Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read: {exc.strerror or exc}", file=str(path), field=field) from None


def _client_cert(cert: str | Path | None, key: str | Path | None, field: str) -> CertKey | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise BadInput("a client certificate needs both the certificate and its key", field=field)
    return load_pem(cert, key, "client")


def declared_facts(
    written: dict[str, Any],
    flags: TargetFlags,
    *,
    server_ca: bool,
    client_cert: bool,
    maillog: MailLogFile | None = None,
    in_namespace: bool = False,
) -> dict[str, Any]:
    """The target facts (lab.scenario.facts) from a profile's ``facts`` and the flags beside it (flags win);
    ``in_namespace``: the refused client may be a topology address (``lab.pipeline`` checks it is a host's)."""
    given = dataclasses.asdict(flags)
    facts: dict[str, Any] = {k: v for k, v in written.items() if k != "tls_mandatory_senders"}
    if written.get("tls_mandatory_senders"):
        facts["tls_mandatory_sender"] = written["tls_mandatory_senders"][0]
    names = ("accepted_domain", "refused_domain", "max_message_size", "max_recipients", "tls_mandatory_sender")
    for name in (*names, "blocked_client"):
        if given.get(name) is not None:
            facts[name] = given[name]
    for name in ("max_message_size", "max_recipients"):
        if name in facts and int(facts[name]) < 1:
            raise BadInput("must be at least 1", field=f"--{name.replace('_', '-')}")
    if facts.get("blocked_client") is not None and not in_namespace:
        facts["blocked_client"] = check_loopback(str(facts["blocked_client"]), field="--blocked-client")
    facts["server_ca"] = True if server_ca else None
    facts["client_cert"] = True if client_cert else None
    facts["maillog"] = True if maillog is not None else None
    return {k: v for k, v in facts.items() if v is not None}


def maillog_from_flags(flags: TargetFlags, profile: Profile | None = None) -> MailLogFile | None:
    """The ``maillog`` fact: ``--maillog FILE --maillog-dialect D`` (flags win) or the profile's ``maillog``."""
    path, dialect = flags.maillog, flags.maillog_dialect
    if path is None and dialect is not None:
        raise BadInput("names the dialect of a log file: give --maillog FILE too", field="--maillog-dialect")
    if path is not None:
        if dialect is None:
            raise BadInput(f"give its dialect: --maillog-dialect {'|'.join(LOG_DIALECTS)}", field="--maillog")
        return MailLogFile(Path(path), dialect)
    if profile is not None and profile.maillog is not None:
        return MailLogFile(*profile.maillog)
    return None


def _recipient(explicit: str | None, facts: dict[str, Any], fallback: str) -> str:
    if explicit:
        return explicit
    return f"postmaster@{facts['accepted_domain']}" if "accepted_domain" in facts else fallback


def check_deviation_cases(profile: Profile) -> None:
    """A deviation that covers no case of the catalogue is a typo or a renamed case: bad input, never ignored."""
    from lab.conformance.deviations import unknown_deviations
    from lab.scenario.loader import load_cases

    unknown = unknown_deviations(profile.deviations, (case.id for case in load_cases(None)))
    if unknown:
        first = unknown[0]
        raise BadInput(
            f"{first.case!r} names no case of the catalogue (smtplab list shows them)",
            file=profile.file,
            line=first.line,
            field="deviations.case",
        )


def target_from_flags(flags: TargetFlags, policy: str, *, in_namespace: bool = False) -> ExternalTarget:
    """``--target HOST:PORT --policy X [--name] [--ehlo] [--from --to] [--ca] [--client-cert --client-key]``
    and the target facts (``--accepted-domain``, ``--max-message-size`` ...). ``in_namespace``: the target
    serves inside the lab's namespaces (``--carrier netns``), so a non-loopback address is not refused here
    (``lab.pipeline`` checks it is a topology host's)."""
    if flags.target is None:
        raise BadInput("names no target", field="--target")
    host, port = parse_address(flags.target, field="--target", allow_remote=in_namespace)
    client_cert = _client_cert(flags.client_cert, flags.client_key, "--client-cert")
    verify = client_cert is not None and flags.verify_client
    maillog = maillog_from_flags(flags)
    facts = declared_facts(
        {}, flags, server_ca=bool(flags.ca), client_cert=verify, maillog=maillog, in_namespace=in_namespace
    )
    return ExternalTarget(
        name=flags.name or f"{host}:{port}",
        host=host,
        port=port,
        policy=TLSMode(policy),
        ehlo=flags.ehlo,
        mail_from=flags.mail_from,
        rcpt_to=_recipient(flags.rcpt_to, facts, default_recipient(host)),
        trust_pems=(_read_pem(flags.ca, "--ca"),) if flags.ca else (),
        client_cert=client_cert,
        server_name=flags.server_name,
        facts=facts,
        maillog=maillog,
    )


def target_from_profile(
    path: str | Path, flags: TargetFlags = NO_FLAGS, *, in_namespace: bool = False
) -> ExternalTarget:
    """A profile's target; flags given beside ``--profile`` (``--target``, ``--ca``, ``--name`` ...) win
    (``in_namespace`` as ``target_from_flags``)."""
    profile: Profile = load_profile(path)
    check_deviation_cases(profile)
    if flags.target:
        profile = profile.at(flags.target, field="--target", allow_remote=in_namespace)
    ca = flags.ca
    trust = (_read_pem(ca, "--ca"),) if ca else ((_read_pem(profile.ca_file, "ca"),) if profile.ca_file else ())
    cert, key = flags.client_cert, flags.client_key
    client_cert = (
        _client_cert(cert, key, "--client-cert")
        if cert or key
        else _client_cert(profile.client_cert, profile.client_key, "client_cert")
    )
    verify = profile.verify_client or flags.verify_client
    maillog = maillog_from_flags(flags, profile)
    verified = client_cert is not None and verify
    facts = declared_facts(
        profile.facts, flags, server_ca=bool(trust), client_cert=verified, maillog=maillog, in_namespace=in_namespace
    )
    fallback = profile.rcpt_to[0] if profile.rcpt_to else default_recipient(profile.host)
    return ExternalTarget(
        name=flags.name or profile.name,
        host=profile.host,
        port=profile.port,
        policy=profile.policy,
        ehlo=flags.ehlo or profile.ehlo,
        mail_from=flags.mail_from or profile.mail_from,
        rcpt_to=flags.rcpt_to or fallback,
        trust_pems=trust,
        client_cert=client_cert,
        server_name=flags.server_name or profile.server_name,
        timeout=profile.timeouts.reply,
        concurrency=profile.concurrency,
        deviations=profile.deviations,
        facts=facts,
        maillog=maillog,
    )
