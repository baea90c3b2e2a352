"""External targets for the runner, from ``smtplab run`` flags or from a target profile."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lab.appliance.certs import CertKey, load_pem
from lab.conformance.profile import Profile, default_recipient, load_profile, parse_address
from lab.errors import BadInput
from lab.policy.modes import TLSMode
from lab.scenario.logevents import LOG_DIALECTS, MailLogFile
from lab.scenario.runner import ExternalTarget


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
    args: argparse.Namespace | None,
    *,
    server_ca: bool,
    client_cert: bool,
    maillog: MailLogFile | None = None,
) -> dict[str, Any]:
    """The target facts (lab.scenario.facts) from a profile's ``facts`` and the flags beside it (flags win)."""
    given = vars(args) if args is not None else {}
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
    if facts.get("blocked_client") is not None:
        from lab.peers import check_loopback

        facts["blocked_client"] = check_loopback(str(facts["blocked_client"]), field="--blocked-client")
    facts["server_ca"] = True if server_ca else None
    facts["client_cert"] = True if client_cert else None
    facts["maillog"] = True if maillog is not None else None
    return {k: v for k, v in facts.items() if v is not None}


def maillog_from_args(args: argparse.Namespace | None, profile: Profile | None = None) -> MailLogFile | None:
    """The ``maillog`` fact: ``--maillog FILE --maillog-dialect D`` (flags win) or the profile's ``maillog``."""
    given = vars(args) if args is not None else {}
    path, dialect = given.get("maillog"), given.get("maillog_dialect")
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


def target_from_args(args: argparse.Namespace, policy: str) -> ExternalTarget:
    """``--target HOST:PORT --policy X [--name] [--ehlo] [--from --to] [--ca] [--client-cert --client-key]``
    and the target facts (``--accepted-domain``, ``--max-message-size`` ...)."""
    host, port = parse_address(args.target, field="--target")
    client_cert = _client_cert(args.client_cert, args.client_key, "--client-cert")
    verify = client_cert is not None and bool(getattr(args, "verify_client", False))
    maillog = maillog_from_args(args)
    facts = declared_facts({}, args, server_ca=bool(args.ca), client_cert=verify, maillog=maillog)
    return ExternalTarget(
        name=args.name or f"{host}:{port}",
        host=host,
        port=port,
        policy=TLSMode(policy),
        ehlo=args.ehlo,
        mail_from=args.mail_from,
        rcpt_to=_recipient(args.rcpt_to, facts, default_recipient(host)),
        trust_pems=(_read_pem(args.ca, "--ca"),) if args.ca else (),
        client_cert=client_cert,
        server_name=args.server_name,
        facts=facts,
        maillog=maillog,
    )


def target_from_profile(path: str | Path, args: argparse.Namespace | None = None) -> ExternalTarget:
    """A profile's target; flags given beside ``--profile`` (``--target``, ``--ca``, ``--name`` ...) win."""
    profile: Profile = load_profile(path)
    check_deviation_cases(profile)
    given = vars(args) if args is not None else {}
    if given.get("target"):
        profile = profile.at(given["target"])
    ca = given.get("ca")
    trust = (_read_pem(ca, "--ca"),) if ca else ((_read_pem(profile.ca_file, "ca"),) if profile.ca_file else ())
    cert, key = given.get("client_cert"), given.get("client_key")
    client_cert = (
        _client_cert(cert, key, "--client-cert")
        if cert or key
        else _client_cert(profile.client_cert, profile.client_key, "client_cert")
    )
    verify = profile.verify_client or bool(given.get("verify_client"))
    maillog = maillog_from_args(args, profile)
    verified = client_cert is not None and verify
    facts = declared_facts(profile.facts, args, server_ca=bool(trust), client_cert=verified, maillog=maillog)
    fallback = profile.rcpt_to[0] if profile.rcpt_to else default_recipient(profile.host)
    return ExternalTarget(
        name=given.get("name") or profile.name,
        host=profile.host,
        port=profile.port,
        policy=profile.policy,
        ehlo=given.get("ehlo") or profile.ehlo,
        mail_from=given.get("mail_from") or profile.mail_from,
        rcpt_to=given.get("rcpt_to") or fallback,
        trust_pems=trust,
        client_cert=client_cert,
        server_name=given.get("server_name") or profile.server_name,
        timeout=profile.timeouts.reply,
        concurrency=profile.concurrency,
        deviations=profile.deviations,
        facts=facts,
        maillog=maillog,
    )
