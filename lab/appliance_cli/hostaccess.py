"""``listenerconfig > edit > hostaccess``: the Host Access Table of one listener (docs/rules.md §1.3-§1.5).

new / edit / delete a sender group or a policy, move a group, the default policy parameters, print, and import /
export of the table as YAML (the ``hat`` field of docs/config-format.md).
"""

from __future__ import annotations

import copy
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from lab.appliance.config import hat_summary
from lab.appliance.model import Appliance, Listener
from lab.appliance_cli.checks import check_name
from lab.appliance_cli.context import Context
from lab.appliance_cli.params import ParamWalk, describe, tls_label
from lab.appliance_cli.prompts import ask_choice, ask_item, ask_operation, ask_value, ask_yes_no
from lab.errors import BadInput
from lab.policy.hat import MemberSyntaxError, parse_member
from lab.policy.modes import Behaviour
from lab.policy.params import APPLIANCE_DEFAULTS, predefined_groups, predefined_policies
from lab.yamlsource import read_text

BEHAVIOURS = [Behaviour.ACCEPT, Behaviour.REJECT, Behaviour.TCPREFUSE, Behaviour.RELAY, Behaviour.CONTINUE]
KINDS = [("SENDERGROUP", "a sender group."), ("POLICY", "a policy.")]


def run(ctx: Context, appliance: Appliance, index: int) -> None:
    while True:
        current = ctx.appliance()
        if current is None:
            return
        listener = current.listeners[index]
        term = ctx.term
        term.say()
        term.say("Default Policy Parameters")
        term.say("=========================")
        for line in describe(listener.defaults.over(APPLIANCE_DEFAULTS)):
            term.say(line)
        term.say()
        term.say(f"There are currently {len(listener.policies)} policies defined.")
        term.say(f"There are currently {len(listener.hat.groups)} sender groups.")
        operation = ask_operation(
            term,
            [
                ("NEW", "Create a new entry."),
                ("EDIT", "Modify an entry."),
                ("DELETE", "Remove an entry."),
                ("MOVE", "Move an entry."),
                ("DEFAULT", "Set the defaults."),
                ("PRINT", "Display the table."),
                ("IMPORT", "Import a table from a file."),
                ("EXPORT", "Export the table to a file."),
            ],
        )
        if operation is None:
            return
        handlers = {
            "NEW": new,
            "EDIT": edit,
            "DELETE": delete,
            "MOVE": move,
            "DEFAULT": default,
            "PRINT": show,
            "IMPORT": import_table,
            "EXPORT": export_table,
        }
        handlers[operation](ctx, listener, index)


def _effective(listener: Listener) -> list[tuple[str, str]]:
    return [(group.name, group.policy) for group in listener.hat.groups]


def _position(groups: CommentedSeq, name: str) -> int:
    return next(i for i, item in enumerate(groups) if str(item["name"]).upper() == name.upper())


def _members(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item.upper() == "ALL":
            raise ValueError("ALL is the catch-all group's member; use the ALL group instead")
        try:
            parse_member(item)
        except MemberSyntaxError as exc:
            raise ValueError(f"bad member {exc.text[:60]!r}: {exc.why}") from None
    return items


# --- new


def new(ctx: Context, listener: Listener, index: int) -> None:
    kind = ask_operation(ctx.term, [(name, f"Create {what}") for name, what in KINDS])
    if kind == "SENDERGROUP":
        new_group(ctx, listener, index)
    elif kind == "POLICY":
        new_policy(ctx, listener, index)


def new_group(ctx: Context, listener: Listener, index: int) -> None:
    term = ctx.term
    names = [group.name for group in listener.hat.groups]
    name = ask_value(term, "Enter the name for this sender group.", "", check_name(names))
    policies = sorted(listener.policies)
    policy = policies[ask_choice(term, "Select a policy for this sender group.", policies, 0)]
    question = "Enter the senders to add to this sender group, separated by commas (IP, range, CIDR, host, .domain)."
    members = ask_value(term, question, "", _members)
    groups = ctx.doc.groups(index, _effective(listener))
    entry = CommentedMap([("name", name), ("members", CommentedSeq(members)), ("policy", policy)])
    groups.insert(_position(groups, "ALL"), entry)
    ctx.change(f"{listener.name} HAT: sender group {name} -> {policy} created")


def new_policy(ctx: Context, listener: Listener, index: int) -> None:
    term = ctx.term
    name = ask_value(term, "Enter the name for this policy.", "", check_name(list(listener.policies)))
    labels = [b.value.upper() for b in BEHAVIOURS]
    behaviour = BEHAVIOURS[ask_choice(term, "Choose the behaviour for this policy.", labels, 0)]
    entry = ctx.doc.policy(index, name)
    entry["behaviour"] = behaviour.value
    changed: list[str] = []
    if ask_yes_no(term, "Would you like to change the policy parameters?", False):
        defaults = listener.defaults.over(APPLIANCE_DEFAULTS)
        changed = ParamWalk(term, entry, defaults, defaults.tls).run()
    ctx.change(f"{listener.name} HAT: policy {name} ({behaviour.value}) created" + "".join(f"; {c}" for c in changed))


# --- edit


def edit(ctx: Context, listener: Listener, index: int) -> None:
    kind = ask_operation(ctx.term, [(name, f"Modify {what}") for name, what in KINDS])
    if kind == "SENDERGROUP":
        edit_group(ctx, listener, index)
    elif kind == "POLICY":
        edit_policy(ctx, listener, index)


def _list_groups(ctx: Context, listener: Listener) -> None:
    ctx.term.say()
    for number, group in enumerate(listener.hat.groups, 1):
        ctx.term.say(f"{number}. {group.name} ({group.policy})")


def edit_group(ctx: Context, listener: Listener, index: int) -> None:
    _list_groups(ctx, listener)
    names = [group.name for group in listener.hat.groups]
    chosen = ask_item(ctx.term, "Enter the sender group number or name you wish to edit.", names)
    if chosen is None:
        return
    group = listener.hat.groups[chosen]
    operations = [("POLICY", "Change the policy settings and options.")]
    if group.name != "ALL":
        operations = [("NEW", "Add a new sender."), ("DELETE", "Remove a sender."), *operations]
    ctx.term.say()
    ctx.term.say(f"Sender group {group.name}: {', '.join(m.text for m in group.members) or '(no members)'}")
    operation = ask_operation(ctx.term, operations)
    if operation is None:
        return
    groups = ctx.doc.groups(index, _effective(listener))
    entry = groups[_position(groups, group.name)]
    if operation == "NEW":
        question = "Enter the senders to add, separated by commas (IP, range, CIDR, host, .domain)."
        added = ask_value(ctx.term, question, "", _members)
        if not isinstance(entry.get("members"), list):
            entry["members"] = CommentedSeq()
        entry["members"].extend(added)
        ctx.change(f"{listener.name} HAT: {group.name} += {', '.join(added)}")
    elif operation == "DELETE":
        members = [m.text for m in group.members]
        if not members:
            ctx.term.refuse(f"Error: {group.name} has no senders to remove")
            return
        which = ask_item(ctx.term, "Enter the number or the sender to remove.", members)
        if which is not None:
            entry["members"] = CommentedSeq([m for i, m in enumerate(entry.get("members") or []) if i != which])
            ctx.change(f"{listener.name} HAT: {group.name} -= {members[which]}")
    else:
        policies = sorted(listener.policies)
        policy = policies[
            ask_choice(ctx.term, "Select a policy for this sender group.", policies, policies.index(group.policy))
        ]
        if policy != group.policy:
            entry["policy"] = policy
            ctx.change(f"{listener.name} HAT: {group.name} -> {policy}")


def edit_policy(ctx: Context, listener: Listener, index: int) -> None:
    names = sorted(listener.policies)
    ctx.term.say()
    for number, name in enumerate(names, 1):
        policy = listener.policies[name]
        tls = tls_label(policy.effective(listener.defaults).tls)
        ctx.term.say(f"{number}. {name} ({policy.behaviour.value.upper()}, TLS {tls})")
    chosen = ask_item(ctx.term, "Enter the policy number or name you wish to edit.", names)
    if chosen is None:
        return
    policy = listener.policies[names[chosen]]
    labels = [b.value.upper() for b in BEHAVIOURS]
    behaviour = BEHAVIOURS[
        ask_choice(ctx.term, "Choose the behaviour for this policy.", labels, BEHAVIOURS.index(policy.behaviour))
    ]
    entry = ctx.doc.policy(index, policy.name)
    changed: list[str] = []
    if behaviour != policy.behaviour:
        entry["behaviour"] = behaviour.value
        changed.append(f"behaviour: {behaviour.value}")
    defaults = listener.defaults.over(APPLIANCE_DEFAULTS)
    walk = ParamWalk(ctx.term, entry, policy.effective(listener.defaults), defaults.tls)
    changed += walk.run()
    if not entry:  # nothing written for a predefined policy: leave the file as it was
        ctx.doc.section(index, "policies").pop(policy.name)
    if changed:
        ctx.change(f"{listener.name} HAT: policy {policy.name}: {'; '.join(changed)}")
    _remind(ctx, listener, walk.tls_enabled)


# --- delete, move


def delete(ctx: Context, listener: Listener, index: int) -> None:
    kind = ask_operation(ctx.term, [(name, f"Remove {what}") for name, what in KINDS])
    if kind == "SENDERGROUP":
        _list_groups(ctx, listener)
        predefined = {name for name, _ in predefined_groups(listener.type)}
        names = [group.name for group in listener.hat.groups]
        chosen = ask_item(ctx.term, "Enter the sender group number or name you wish to delete.", names)
        if chosen is None:
            return
        if names[chosen] in predefined:
            ctx.term.refuse(f"Error: {names[chosen]} is a predefined sender group; remove its senders with edit")
            return
        groups = ctx.doc.groups(index, _effective(listener))
        del groups[_position(groups, names[chosen])]
        ctx.change(f"{listener.name} HAT: sender group {names[chosen]} deleted")
    elif kind == "POLICY":
        predefined = set(predefined_policies(listener.type))
        names = sorted(name for name in listener.policies if name not in predefined)
        if not names:
            ctx.term.refuse("Error: there are only predefined policies, which cannot be deleted")
            return
        chosen = ask_item(ctx.term, "Enter the policy number or name you wish to delete.", names)
        if chosen is None:
            return
        users = [group.name for group in listener.hat.groups if group.policy == names[chosen]]
        if users:
            ctx.term.refuse(f"Error: policy {names[chosen]} is used by {', '.join(users)}")
            return
        ctx.doc.section(index, "policies").pop(names[chosen])
        ctx.change(f"{listener.name} HAT: policy {names[chosen]} deleted")


def move(ctx: Context, listener: Listener, index: int) -> None:
    _list_groups(ctx, listener)
    names = [group.name for group in listener.hat.groups]
    chosen = ask_item(ctx.term, "Enter the sender group number or name you wish to move.", names[:-1])
    if chosen is None:
        return
    before = ask_item(ctx.term, "Enter the sender group number or name to insert it before.", names)
    if before is None or before == chosen:
        return
    groups = ctx.doc.groups(index, _effective(listener))
    entry = groups.pop(_position(groups, names[chosen]))
    groups.insert(_position(groups, names[before]), entry)
    ctx.change(f"{listener.name} HAT: {names[chosen]} moved before {names[before]}")


# --- default, print, import, export


def default(ctx: Context, listener: Listener, index: int) -> None:
    defaults = ctx.doc.section(index, "defaults")
    walk = ParamWalk(ctx.term, defaults, listener.defaults.over(APPLIANCE_DEFAULTS), None)
    changed = walk.run()
    if changed:
        ctx.change(f"{listener.name} default policy parameters: {'; '.join(changed)}")
    _remind(ctx, listener, walk.tls_enabled)


def _remind(ctx: Context, listener: Listener, tls_enabled: bool) -> None:
    """TLS just turned on while the listener presents the demo certificate: say how to assign a real one."""
    appliance = ctx.appliance()
    if not tls_enabled or appliance is None:
        return
    current = next(item for item in appliance.listeners if item.name == listener.name)
    cert = appliance.certificates.get(current.certificate or "")
    if current.certificate is None or (cert is not None and cert.kind == "demo"):
        ctx.term.say(
            f"Listener {listener.name} presents the INSECURE built-in demo certificate: create one with "
            "'certconfig' and assign it with listenerconfig > edit > certificate."
        )


def show(ctx: Context, listener: Listener, index: int) -> None:
    ctx.term.say()
    ctx.term.say(hat_summary(listener))


def _path(ctx: Context, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else ctx.doc.path.parent / path


def import_table(ctx: Context, listener: Listener, index: int) -> None:
    question = "Enter the name of the file to import (YAML: the hat field of docs/config-format.md)."
    name = ask_value(ctx.term, question, "", _filename)
    path = _path(ctx, name)
    try:
        loaded = YAML(typ="rt").load(read_text(path))
    except (BadInput, OSError, YAMLError) as exc:
        ctx.term.refuse(f"Error: {path}: {str(exc).splitlines()[0] if str(exc) else exc}")
        return
    table = loaded.get("hat", loaded) if isinstance(loaded, dict) else None
    if not isinstance(table, dict):
        ctx.term.refuse(f"Error: {path}: not a Host Access Table (a mapping with sender_groups, policies, defaults)")
        return
    entry = ctx.doc.listener(index)
    before = copy.deepcopy(entry.get("hat"))
    entry["hat"] = table
    try:
        ctx.doc.appliance()
    except BadInput as exc:
        entry["hat"] = before
        if before is None:
            entry.pop("hat")
        ctx.term.refuse(f"Error: import refused: {exc}")
        return
    ctx.change(f"{listener.name} HAT: imported from {path}")


def export_table(ctx: Context, listener: Listener, index: int) -> None:
    name = ask_value(ctx.term, "Enter a name for the exported file.", f"{listener.name}-hat.yaml", _filename)
    path = _path(ctx, name)
    table = ctx.doc.listener(index).get("hat") or CommentedMap()
    with path.open("w", encoding="utf-8") as out:
        yaml = YAML(typ="rt")
        yaml.indent(mapping=2, sequence=4, offset=2)
        yaml.dump(CommentedMap([("hat", table)]), out)
    ctx.term.say()
    ctx.term.say(f"The Host Access Table of {listener.name} was exported to {path}.")


def _filename(text: str) -> str:
    if not text or any(not c.isprintable() for c in text):
        raise ValueError("enter a file name")
    return text
