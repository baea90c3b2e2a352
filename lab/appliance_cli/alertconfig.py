"""``alertconfig``: who gets the appliance's alert messages, of which classes and severities
(``outbound.alerts`` of the file; docs/outbound.md). A delivery that required TLS and could not have it raises a
Warning of class System."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from lab.appliance.model import ALERT_CLASSES, ALERT_SEVERITIES, Appliance
from lab.appliance_cli.context import Context
from lab.appliance_cli.outbound import alert_lines
from lab.appliance_cli.prompts import ask_item, ask_operation, ask_several, ask_value, ask_yes_no
from lab.names import hostname_problem

OPERATIONS = [
    ("NEW", "Add a new email address to send alerts."),
    ("EDIT", "Modify an email address."),
    ("DELETE", "Remove an email address."),
    ("SETUP", "Enable or disable alert messages."),
]
FORBIDDEN = set(" \t<>") | {chr(c) for c in range(32)} | {"\x7f"}


def run(ctx: Context) -> None:
    while True:
        appliance = ctx.appliance()
        if appliance is None:
            return
        ctx.term.say()
        for line in alert_lines(appliance.outbound):
            ctx.term.say(line)
        operation = ask_operation(ctx.term, OPERATIONS)
        if operation is None:
            return
        {"NEW": new, "EDIT": edit, "DELETE": delete, "SETUP": setup}[operation](ctx, appliance)


def _address(taken: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        local, at, domain = text.rpartition("@")
        if (
            not at
            or not local
            or "@" in local
            or len(text) > 320
            or any(c in FORBIDDEN for c in text)
            or hostname_problem(domain.lower())
        ):
            raise ValueError(f"{text[:60]!r} is not an email address (administrator@example.com)")
        if text.lower() in (t.lower() for t in taken):
            raise ValueError(f"{text} already receives alerts (use edit)")
        return text

    return check


def _recipients(ctx: Context) -> CommentedSeq:
    return ctx.doc.outbound_list("recipients", parent=ctx.doc.outbound_map("alerts"))


def _pick(ctx: Context, question: str, every: tuple[str, ...], now: tuple[str, ...]) -> list[str]:
    options = ["All", *(word.capitalize() for word in every)]
    default = [0] if set(now) == set(every) else [every.index(word) + 1 for word in now]
    chosen = ask_several(ctx.term, question, options, default)
    return ["all"] if 0 in chosen or len(chosen) == len(every) else [every[i - 1] for i in chosen]


def _classes_and_severities(
    ctx: Context, entry: CommentedMap, classes: tuple[str, ...], severities: tuple[str, ...], *, new: bool = False
) -> list[str]:
    """Ask both; write (and list) what changed, or everything for a ``new`` entry."""
    changed = []
    for key, question, every, now in (
        ("classes", "Choose the Alert Class for this email address.", ALERT_CLASSES, classes),
        ("severities", "Select a Severity Level for this email address.", ALERT_SEVERITIES, severities),
    ):
        words = _pick(ctx, question, every, now)
        effective = every if words == ["all"] else tuple(words)
        if set(effective) != set(now) or new:
            seq = CommentedSeq(words)
            seq.fa.set_flow_style()
            entry[key] = seq
            changed.append(f"{key} {', '.join(words)}")
    return changed


def new(ctx: Context, appliance: Appliance) -> None:
    taken = [r.address for r in appliance.outbound.alert_recipients]
    address = ask_value(
        ctx.term,
        'Please enter a new email address to send alerts. (Ex: "administrator@example.com")',
        "",
        _address(taken),
    )
    entry = CommentedMap([("address", address)])
    changed = _classes_and_severities(ctx, entry, ALERT_CLASSES, ALERT_SEVERITIES, new=True)
    _recipients(ctx).append(entry)
    ctx.change(f"alert recipient {address}: added ({'; '.join(changed)})")


def _choose(ctx: Context, appliance: Appliance, verb: str) -> int | None:
    names = [r.address for r in appliance.outbound.alert_recipients]
    if not names:
        ctx.term.refuse(f"Error: there is no alert recipient to {verb}")
        return None
    return ask_item(ctx.term, f"Enter the address or number of the alert recipient you wish to {verb}.", names)


def edit(ctx: Context, appliance: Appliance) -> None:
    index = _choose(ctx, appliance, "edit")
    if index is None:
        return
    recipient = appliance.outbound.alert_recipients[index]
    others = [r.address for i, r in enumerate(appliance.outbound.alert_recipients) if i != index]
    entry: CommentedMap = _recipients(ctx)[index]
    address = ask_value(ctx.term, "Enter the email address to send alerts to.", recipient.address, _address(others))
    changed = []
    if address != recipient.address:
        entry["address"] = address
        changed.append(f"address {address}")
    changed += _classes_and_severities(ctx, entry, recipient.classes, recipient.severities)
    if changed:
        ctx.change(f"alert recipient {recipient.address}: {'; '.join(changed)}")


def delete(ctx: Context, appliance: Appliance) -> None:
    index = _choose(ctx, appliance, "delete")
    if index is None:
        return
    address = appliance.outbound.alert_recipients[index].address
    if ask_yes_no(ctx.term, f"Are you sure you want to stop sending alerts to {address}?", False):
        del _recipients(ctx)[index]
        ctx.change(f"alert recipient {address}: deleted")


def setup(ctx: Context, appliance: Appliance) -> None:
    now = appliance.outbound.alerts_enabled
    enabled = ask_yes_no(ctx.term, "Do you want to send alert messages? (No: the mail log still has every alert)", now)
    if enabled != now:
        ctx.doc.outbound_map("alerts")["enabled"] = enabled
        ctx.change(f"alerts {'enabled' if enabled else 'disabled'}")
