"""``tlsverify DOMAIN``: test the TLS connection to a domain the way the appliance would deliver to it.

The domain's MX hosts come from the virtual DNS of the built-in topology (or ``smtplab cli --topology``); the
lab serves them with its receiving MTA (``lab.appliance_cli.delivery``) and the real delivery engine sends one
test message under the domain's destination control in the pending configuration. The output reads like the
appliance's (connecting, STARTTLS, TLS established or failed, the certificate check) and ends with the verdict
under the destination control and the mail-log lines of the delivery.
"""

from __future__ import annotations

from lab.appliance_cli.context import Context
from lab.appliance_cli.delivery import DeliveryReport, deliver
from lab.appliance_cli.prompts import ask_value
from lab.names import hostname_problem
from lab.outbound.attempt import DeliveryAttempt, Outcome
from lab.policy.destinations import DestinationTLS


def _domain(text: str) -> str:
    name = text.strip().rstrip(".").lower()
    if not name or hostname_problem(name):
        raise ValueError(f"{text[:60]!r} is not a domain")
    return name


def run(ctx: Context, argument: str = "") -> None:
    appliance = ctx.appliance()
    if appliance is None:
        return
    term = ctx.term
    if argument:
        try:
            domain = _domain(argument)
        except ValueError as exc:
            term.refuse(f"Error: {exc}")
            return
    else:
        domain = ask_value(term, "Enter the TLS domain to verify against:", "", _domain)
    report = deliver(appliance, ctx.topology, domain, overrides=ctx.receivers)
    term.say()
    for line in lines(report, ctx.topology_label):
        term.say(line)


def _entry(report: DeliveryReport) -> str:
    where = report.control.domain
    if where == "default":
        return "the default destination"
    return "its own entry" if where == report.domain else f"the {where} entry"


def lines(report: DeliveryReport, topology: str) -> list[str]:
    """What ``tlsverify`` prints for one delivery."""
    setting = report.control.tls
    out = [f"Destination control for {report.domain}: TLS {setting} ({_entry(report)})"]
    if not report.receivers:
        out.append(f"No MX or address for {report.domain} in the virtual DNS of {topology}: nothing to connect to.")
    for served in report.receivers:
        mx = served.mx
        out.append(
            f"MX {mx.exchange} (preference {mx.preference}) [{', '.join(mx.addresses)}] in the virtual DNS "
            f"of {topology}"
        )
        out.append(f"  served by the lab's receiving MTA (lab.smtp.remote_mta), which {served.describe()}")
    if report.receivers:
        out.append(f"Sending a test message to postmaster@{report.domain}.")
    for attempt in report.attempts:
        out += _connection(attempt, setting)
    out.append(f"Verdict under {setting}: {_verdict(report)}")
    out.append("Mail log:")
    out += [f"  {line}" for line in report.log]
    out.append("TLS verification completed.")
    return out


def _connection(attempt: DeliveryAttempt, setting: DestinationTLS) -> list[str]:
    ip = attempt.receiving_ip
    out = [
        f"Connecting to {attempt.mx_host} [{ip}] on port 25.",
        f"Connected to {ip} from interface {attempt.sending_ip}.",
    ]
    if setting is DestinationTLS.NO:
        return [*out, "TLS not attempted: the destination control says No (STARTTLS is never sent)."]
    out.append("Checking TLS connection.")
    if not attempt.tls:
        reason = attempt.failure_reason or attempt.result_type or "unknown"
        return [*out, f"TLS connection to {ip} failed: {reason} ({attempt.result_type})."]
    out.append(f"TLS connection established: protocol {attempt.tls_version}, cipher {attempt.cipher}.")
    if attempt.certificate_verified is None:
        out.append(f"Certificate not checked: {setting} does not verify it.")
    elif attempt.certificate_verified:
        out += ["Verifying peer certificate.", f"TLS certificate verified for {attempt.mx_host}."]
    else:
        out += ["Verifying peer certificate.", f"TLS certificate not verified: {attempt.result_type}."]
    out.append(f"TLS connection to {ip} succeeded.")
    return out


def _verdict(report: DeliveryReport) -> str:
    setting = report.control.tls
    if report.state == "delivered":
        sent = next((a for a in report.attempts if a.outcome is Outcome.DELIVERED), None)
        if sent is not None and sent.tls:
            return "the test message was delivered over TLS."
        if setting is DestinationTLS.NO:
            return "the test message was delivered in the clear (TLS is never attempted)."
        return (
            "the test message was delivered in the clear: STARTTLS was not to be had, and a Preferred "
            "setting falls back to plaintext."
        )
    if report.state == "bounced":
        return "the test message was bounced (no host to deliver to)."
    needs = "TLS with a verified certificate" if setting is DestinationTLS.REQUIRED_VERIFY else "TLS"
    alerted = (
        f"; an alert went to {', '.join(sorted({box for box, _ in report.alert_messages}))}"
        if report.alert_messages
        else ""
    )
    if setting.required:
        return (
            f"deferred: {setting} demands {needs}, so nothing was sent (the message stays queued for a retry{alerted})."
        )
    return (
        "deferred: TLS failed after the receiver's 220 to STARTTLS, which leaves the connection unusable "
        "for plaintext (the message stays queued for a retry)."
    )
