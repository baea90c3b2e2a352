"""``destconfig``: destination controls, the rules the appliance applies when it delivers to a domain
(docs/outbound.md; ``outbound.default_destination`` and ``outbound.destination_controls`` of the file).

Each question shows the value in force in brackets (for a new entry, what it would inherit from the default);
only an answer that changes it is written, except that a new entry always records its TLS setting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ruamel.yaml.comments import CommentedMap

from lab.appliance.model import Appliance
from lab.appliance_cli.context import Context
from lab.appliance_cli.outbound import destination_lines
from lab.appliance_cli.params import CERTCONFIG_REMINDER
from lab.appliance_cli.prompts import ask_choice, ask_item, ask_number, ask_operation, ask_value, ask_yes_no
from lab.names import hostname_problem
from lab.policy.destinations import DestinationControl, DestinationTLS

TLS_CHOICES = tuple(DestinationTLS)  # No, Preferred, Required, Preferred (Verify), Required (Verify)
OPERATIONS = [
    ("NEW", "Create a new entry."),
    ("EDIT", "Modify an entry."),
    ("DELETE", "Remove an entry."),
    ("DEFAULT", "Change the default."),
    ("LIST", "Display a summary list of all entries."),
]


def run(ctx: Context) -> None:
    while True:
        appliance = ctx.appliance()
        if appliance is None:
            return
        count = len(appliance.outbound.destinations.entries)
        ctx.term.say()
        ctx.term.say(
            f"There {'is' if count == 1 else 'are'} currently {count} entr{'y' if count == 1 else 'ies'} configured."
        )
        operation = ask_operation(ctx.term, OPERATIONS)
        if operation is None:
            return
        {"NEW": new, "EDIT": edit, "DELETE": delete, "DEFAULT": default, "LIST": show}[operation](ctx, appliance)


def show(ctx: Context, appliance: Appliance) -> None:
    ctx.term.say()
    for line in destination_lines(appliance.outbound):
        ctx.term.say(line)


def _key(domain: object) -> str:
    return str(domain).strip().rstrip(".").lower()


def _domain(taken: list[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        name = _key(text)
        bare = name[1:] if name.startswith(".") else name
        if not name or "@" in name or hostname_problem(bare):
            raise ValueError(f"{text[:60]!r} is not a domain (example.com) or .domain (its subdomains)")
        if name in taken:
            raise ValueError(f"{name} already has an entry (use edit)")
        return name

    return check


def new(ctx: Context, appliance: Appliance) -> None:
    entries = appliance.outbound.destinations.entries
    check = _domain(list(entries))
    domain = ask_value(ctx.term, "Enter the domain you wish to configure.", "", check)
    entry = CommentedMap([("domain", domain)])
    inherited = replace(appliance.outbound.destinations.default, domain=domain)
    changed = walk(ctx, appliance, domain, inherited, entry, always_tls=True)
    ctx.doc.outbound_list("destination_controls").append(entry)
    ctx.change(f"destination {domain}: created ({', '.join(changed)})")


def _choose(ctx: Context, appliance: Appliance, verb: str) -> str | None:
    names = list(appliance.outbound.destinations.entries)
    if not names:
        ctx.term.refuse(f"Error: there is no entry to {verb} (the default is changed with default)")
        return None
    chosen = ask_item(ctx.term, f"Enter the domain or number of the entry you wish to {verb}.", names)
    return None if chosen is None else names[chosen]


def _entry(ctx: Context, domain: str) -> tuple[int, CommentedMap]:
    items = ctx.doc.outbound_list("destination_controls")
    position = next(i for i, item in enumerate(items) if _key(item["domain"]) == domain)
    entry: CommentedMap = items[position]
    return position, entry


def edit(ctx: Context, appliance: Appliance) -> None:
    domain = _choose(ctx, appliance, "edit")
    if domain is None:
        return
    _, entry = _entry(ctx, domain)
    changed = walk(ctx, appliance, domain, appliance.outbound.destinations.entries[domain], entry)
    if changed:
        ctx.change(f"destination {domain}: {', '.join(changed)}")


def delete(ctx: Context, appliance: Appliance) -> None:
    domain = _choose(ctx, appliance, "delete")
    if domain is None:
        return
    if ask_yes_no(ctx.term, f"Are you sure you want to delete the entry for {domain}?", False):
        position, _ = _entry(ctx, domain)
        del ctx.doc.outbound_list("destination_controls")[position]
        ctx.change(f"destination {domain}: deleted (the default applies)")


def default(ctx: Context, appliance: Appliance) -> None:
    current = appliance.outbound.destinations.default
    target = ctx.doc.outbound_map("default_destination")
    changed = walk(ctx, appliance, "Default", current, target)
    if changed:
        ctx.change(f"destination Default: {', '.join(changed)}")


def _hourly(text: str) -> int | None:
    if text.strip().lower() in ("none", "unlimited"):
        return None
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000_000:
        raise ValueError("enter a whole number from 1 to 1000000000, or NONE")
    return int(text)


def walk(
    ctx: Context,
    appliance: Appliance,
    label: str,
    current: DestinationControl,
    target: CommentedMap,
    *,
    always_tls: bool = False,
) -> list[str]:
    """TLS, the limits and the bounce profile of one destination, written into ``target``; what changed."""
    term = ctx.term
    changed: list[str] = []

    def put(key: str, value: object, now: object) -> None:
        if value != now:
            target[key] = value
            changed.append(f"{key} {'unlimited' if value is None else value}")

    options = [str(mode) for mode in TLS_CHOICES]
    chosen = ask_choice(term, "Do you wish to configure TLS support?", options, TLS_CHOICES.index(current.tls))
    tls = TLS_CHOICES[chosen]
    if tls != current.tls or always_tls:
        target["tls"] = tls.name.lower().replace("_", "-")
        changed.append(f"TLS {tls}")
    if tls.attempts_tls and not current.tls.attempts_tls:
        term.say()
        term.say(CERTCONFIG_REMINDER)
    if tls.required:
        term.say()
        term.say(
            f"Messages to {label if label != 'Default' else 'every other domain'} are deferred (and an alert "
            f"is sent, see alertconfig) when {'a verified certificate' if tls.verifies else 'TLS'} cannot be "
            "had."
        )
    put(
        "max_concurrency",
        ask_number(term, f'Enter the max concurrency limit for "{label}".', current.max_concurrency, 1, 1000),
        current.max_concurrency,
    )
    put(
        "max_messages_per_connection",
        ask_number(
            term,
            f'Enter the maximum number of messages per connection for "{label}".',
            current.max_messages_per_connection,
            1,
            1000,
        ),
        current.max_messages_per_connection,
    )
    now = current.max_recipients_per_hour
    hourly = ask_value(
        term,
        f'Enter the maximum number of recipients per hour for "{label}", or NONE for no limit.',
        "none" if now is None else str(now),
        _hourly,
    )
    put("max_recipients_per_hour", hourly, now)
    profiles = list(appliance.outbound.bounce_profiles)
    at = profiles.index(current.bounce_profile) if current.bounce_profile in profiles else 0
    profile = profiles[ask_choice(term, "Please choose a bounce profile to use:", profiles, at)]
    put("bounce_profile", profile, current.bounce_profile)
    return changed
