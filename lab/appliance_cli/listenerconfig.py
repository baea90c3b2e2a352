"""``listenerconfig``: new / edit / delete / setup, and under edit the listener's own settings, its certificate
and its Host Access Table (``hostaccess``)."""

from __future__ import annotations

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from lab.appliance.config import DEMO, DEMO_LABEL, listener_summary
from lab.appliance.model import Appliance
from lab.appliance_cli import hostaccess
from lab.appliance_cli.checks import check_host, check_name
from lab.appliance_cli.context import Context
from lab.appliance_cli.prompts import ask_choice, ask_item, ask_number, ask_operation, ask_value, ask_yes_no
from lab.names import hostname_problem


def listing(appliance: Appliance) -> list[str]:
    lines = []
    for number, item in enumerate(appliance.listeners, 1):
        interface = appliance.interfaces[item.interface]
        lines.append(
            f"{number}. {item.name} (on {interface.name}, {interface.address}) SMTP TCP Port {item.port} "
            f"{item.type.value.capitalize()}"
        )
    return lines


def run(ctx: Context) -> None:
    while True:
        appliance = ctx.appliance()
        if appliance is None:
            return
        ctx.term.say()
        ctx.term.say("Currently configured listeners:")
        for line in listing(appliance):
            ctx.term.say(line)
        operation = ask_operation(
            ctx.term,
            [
                ("NEW", "Create a new listener."),
                ("EDIT", "Modify a listener."),
                ("DELETE", "Remove a listener."),
                ("SETUP", "Change global settings."),
            ],
        )
        if operation is None:
            return
        {"NEW": new, "EDIT": edit, "DELETE": delete, "SETUP": setup}[operation](ctx, appliance)


def new(ctx: Context, appliance: Appliance) -> None:
    term = ctx.term
    names = [item.name for item in appliance.listeners]
    name = ask_value(term, "Please enter the name for the listener:", "", check_name(names))
    kind = ["public", "private"][ask_choice(term, "Select the listener type:", ["Public", "Private"], 0)]
    interfaces = list(appliance.interfaces.values())
    labels = [item.label() for item in interfaces]
    interface = interfaces[ask_choice(term, "Please choose an IP interface for this Listener.", labels, 0)]
    port = ask_number(term, "Enter the TCP port for this listener.", 25, 1, 65535)
    entry = CommentedMap([("name", name), ("type", kind), ("interface", interface.name), ("port", port)])
    if kind == "public":
        question = (
            "Enter the domains this listener accepts mail for (the Recipient Access Table), separated by commas; "
            "ALL accepts any."
        )
        domains = ask_value(term, question, "", _domains)
        entry["rat"] = CommentedSeq(domains)
    ctx.doc.listeners().append(entry)
    ctx.change(f"listener {name}: created ({kind}, {interface.name} port {port})")
    term.say()
    term.say(f"Listener {name} created with the predefined sender groups of a {kind} listener.")
    term.say("It presents the INSECURE built-in demo certificate until one is assigned (edit > certificate).")


def _domains(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("enter at least one domain, .domain or ALL")
    for item in items:
        bare = item[1:] if item.startswith(".") else item
        if item.upper() != "ALL" and (hostname_problem(bare) or "@" in item):
            raise ValueError(f"{item[:60]!r} is not a domain, .domain or ALL")
    return items


def choose(ctx: Context, appliance: Appliance, verb: str) -> int | None:
    names = [item.name for item in appliance.listeners]
    return ask_item(ctx.term, f"Enter the name or number of the listener you wish to {verb}.", names)


def delete(ctx: Context, appliance: Appliance) -> None:
    index = choose(ctx, appliance, "delete")
    if index is None:
        return
    if len(appliance.listeners) == 1:
        ctx.term.refuse("Error: an appliance needs at least one listener")
        return
    name = appliance.listeners[index].name
    if ask_yes_no(ctx.term, f"Are you sure you want to delete the listener {name}?", False):
        del ctx.doc.listeners()[index]
        ctx.change(f"listener {name}: deleted")


def setup(ctx: Context, appliance: Appliance) -> None:
    hostname = ask_value(
        ctx.term, "Enter the appliance's host name (banner, EHLO reply).", appliance.hostname, check_host(False)
    )
    if hostname != appliance.hostname:
        ctx.doc.working["hostname"] = hostname
        ctx.change(f"hostname: {hostname}")


EDIT_OPERATIONS = [
    ("NAME", "Change the name of the listener."),
    ("INTERFACE", "Change the interface and TCP port."),
    ("CERTIFICATE", "Choose the certificate."),
    ("LIMITS", "Change the injection limits."),
    ("SETUP", "Configure general options."),
    ("HOSTACCESS", "Modify the Host Access Table."),
    ("RCPTACCESS", "Modify the Recipient Access Table."),
]


def edit(ctx: Context, appliance: Appliance) -> None:
    index = choose(ctx, appliance, "edit")
    if index is None:
        return
    while True:
        current = ctx.appliance()
        if current is None:
            return
        listener = current.listeners[index]
        ctx.term.say()
        ctx.term.say(listener_summary(current, listener))
        operations = EDIT_OPERATIONS if listener.type.value == "public" else EDIT_OPERATIONS[:-1]
        operation = ask_operation(ctx.term, operations)
        if operation is None:
            return
        handler = {
            "NAME": edit_name,
            "INTERFACE": edit_interface,
            "CERTIFICATE": edit_certificate,
            "LIMITS": edit_limits,
            "SETUP": edit_setup,
            "HOSTACCESS": hostaccess.run,
            "RCPTACCESS": edit_rat,
        }[operation]
        handler(ctx, current, index)


def edit_name(ctx: Context, appliance: Appliance, index: int) -> None:
    old = appliance.listeners[index].name
    others = [item.name for item in appliance.listeners if item.name != old]
    name = ask_value(ctx.term, "Please enter the name for the listener:", old, check_name(others))
    if name != old:
        ctx.doc.listener(index)["name"] = name
        ctx.change(f"listener {old}: renamed {name}")


def edit_interface(ctx: Context, appliance: Appliance, index: int) -> None:
    listener = appliance.listeners[index]
    interfaces = list(appliance.interfaces.values())
    labels = [item.label() for item in interfaces]
    now = [item.name for item in interfaces].index(listener.interface)
    interface = interfaces[ask_choice(ctx.term, "Please choose an IP interface for this Listener.", labels, now)]
    port = ask_number(ctx.term, "Enter the TCP port for this listener.", listener.port, 1, 65535)
    entry = ctx.doc.listener(index)
    if interface.name != listener.interface:
        entry["interface"] = interface.name
    if port != listener.port:
        entry["port"] = port
    if (interface.name, port) != (listener.interface, listener.port):
        ctx.change(f"listener {listener.name}: {interface.name} port {port}")


def edit_limits(ctx: Context, appliance: Appliance, index: int) -> None:
    listener = appliance.listeners[index]
    question = "Enter the maximum number of concurrent connections the listener serves (Max Concurrency)."
    concurrency = ask_number(ctx.term, question, listener.max_concurrency, 1, 65535)
    queue = ask_number(ctx.term, "Enter the TCP listen queue size.", listener.tcp_queue, 1, 65535)
    entry = ctx.doc.listener(index)
    for key, value, now in (
        ("max_concurrency", concurrency, listener.max_concurrency),
        ("tcp_queue", queue, listener.tcp_queue),
    ):
        if value != now:
            entry[key] = value
            ctx.change(f"listener {listener.name}: {key} {value}")


def edit_setup(ctx: Context, appliance: Appliance, index: int) -> None:
    listener = appliance.listeners[index]
    question = "Enter the default domain for email addresses without a fully qualified domain name, or NONE."
    domain = ask_value(ctx.term, question, listener.default_domain or "none", check_host(True))
    domain_map = ask_yes_no(ctx.term, "Would you like to enable the domain map?", listener.domain_map)
    entry = ctx.doc.listener(index)
    if domain != listener.default_domain:
        entry["default_domain"] = domain
        ctx.change(f"listener {listener.name}: default domain {domain or '(none)'}")
    if domain_map != listener.domain_map:
        entry["domain_map"] = domain_map
        ctx.change(f"listener {listener.name}: domain map {'enabled' if domain_map else 'disabled'}")


def edit_certificate(ctx: Context, appliance: Appliance, index: int) -> None:
    listener = appliance.listeners[index]
    names = [DEMO, *(name for name in appliance.certificates if name != DEMO)]
    labels = [DEMO_LABEL, *names[1:]]
    now = names.index(listener.certificate) if listener.certificate in names else 0
    chosen = names[ask_choice(ctx.term, "Please choose a certificate.", labels, now)]
    if chosen == names[now]:
        return
    entry = ctx.doc.listener(index)
    if chosen == DEMO:
        entry.pop("certificate", None)
    else:
        entry["certificate"] = chosen
    ctx.change(f"listener {listener.name}: certificate {chosen}")
    if chosen == DEMO:
        ctx.term.say()
        ctx.term.say("Warning: the demo certificate is INSECURE (its private key ships with smtplab).")


def edit_rat(ctx: Context, appliance: Appliance, index: int) -> None:
    listener = appliance.listeners[index]
    question = (
        "Enter the domains this listener accepts mail for (the Recipient Access Table), separated by commas; "
        "ALL accepts any."
    )
    domains = ask_value(ctx.term, question, ", ".join(listener.rat) or "none", _domains)
    if [d.lower() for d in domains] != list(listener.rat):
        ctx.doc.listener(index)["rat"] = CommentedSeq(domains)
        ctx.change(f"listener {listener.name}: recipient access table {', '.join(domains)}")
