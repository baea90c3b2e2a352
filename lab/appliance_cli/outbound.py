"""The outbound side as the appliance lists it: destination controls and alert recipients (docs/outbound.md).

Shared by ``smtplab listeners`` (after the listeners), ``destconfig`` and ``alertconfig``; built from the loaded
configuration, so what it shows is what the delivery engine applies.
"""

from __future__ import annotations

from collections.abc import Sequence

from lab.appliance.model import ALERT_CLASSES, ALERT_SEVERITIES, Appliance, Outbound
from lab.policy.destinations import DestinationControl


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        ("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]).rstrip()
        for row in rows
    ]


def control_row(label: str, control: DestinationControl) -> tuple[str, ...]:
    hourly = control.max_recipients_per_hour
    return (
        label,
        str(control.tls),
        str(control.max_concurrency),
        str(control.max_messages_per_connection),
        "unlimited" if hourly is None else str(hourly),
        control.bounce_profile,
    )


def destination_lines(outbound: Outbound) -> list[str]:
    """The default destination and every entry: TLS setting, limits, bounce profile."""
    rows = [
        ("Destination", "TLS", "Max Conns", "Msgs/Conn", "Rcpts/Hour", "Bounce Profile"),
        control_row("Default", outbound.destinations.default),
    ]
    rows += [control_row(domain, control) for domain, control in outbound.destinations.entries.items()]
    return _table(rows)


def _words(chosen: tuple[str, ...], every: tuple[str, ...]) -> str:
    return "All" if set(chosen) == set(every) else ", ".join(word.capitalize() for word in chosen)


def alert_lines(outbound: Outbound) -> list[str]:
    """``Alerts: enabled`` and each recipient with its classes and severities."""
    lines = [f"Alerts: {'enabled' if outbound.alerts_enabled else 'disabled (logged only)'}"]
    if not outbound.alert_recipients:
        return [*lines, "  (no alert recipients)"]
    rows = [("Recipient", "Classes", "Severities")]
    rows += [
        (r.address, _words(r.classes, ALERT_CLASSES), _words(r.severities, ALERT_SEVERITIES))
        for r in outbound.alert_recipients
    ]
    return lines + _table(rows)


def outbound_summary(appliance: Appliance) -> str:
    """What ``smtplab listeners`` prints after the listeners."""
    outbound = appliance.outbound
    interface = appliance.outbound_interface()
    lines = [
        "Outbound delivery",
        f"Interface: {interface.label()}",
        f"Certificate: {outbound.certificate or 'none (no client certificate is presented)'}",
        "Destination controls (an entry inherits what it leaves out from Default):",
        *destination_lines(outbound),
        "Bounce profiles:",
    ]
    for profile in outbound.bounce_profiles.values():
        lines.append(
            f"  {profile.name}: first retry after {profile.initial_wait:g}s, waits up to {profile.max_wait:g}s, "
            f"{profile.max_retries} retries, at most {profile.max_time_in_queue:g}s in queue, "
            f"DSN {'sent' if profile.send_bounces else 'not sent'}"
        )
    lines += alert_lines(outbound)
    return "\n".join(lines)
