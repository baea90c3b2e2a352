"""Declared target facts: what a case needs to know about a target that the lab cannot find out by itself.

Against the lab's own listener the facts are the lab's configuration (each case writes the lab's values in its
``facts:`` mapping). Against an external target they come from its profile or from ``smtplab run`` flags; a case
whose facts are not all declared is UNIMPLEMENTED and names the missing ones (docs/scenario-format.md,
"Target facts"). Values reach the case through ``${name}`` placeholders in its file (``substitute``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fact:
    what: str  # how an UNIMPLEMENTED reason names it
    profile: str  # the profile field that declares it
    flag: str  # the `smtplab run` flag that declares it


FACTS: dict[str, Fact] = {
    "accepted_domain": Fact("a recipient domain the target accepts", "facts.accepted_domain", "--accepted-domain"),
    "refused_domain": Fact("a recipient domain the target must refuse", "facts.refused_domain", "--refused-domain"),
    "max_message_size": Fact("the target's maximum message size", "facts.max_message_size", "--max-message-size"),
    "max_recipients": Fact("the target's maximum recipients per message", "facts.max_recipients", "--max-recipients"),
    "tls_mandatory_sender": Fact(
        "a sender for whom the target makes TLS mandatory", "facts.tls_mandatory_senders", "--tls-mandatory-sender"
    ),
    "blocked_client": Fact(
        "a loopback address the target refuses at connect (the client connects from it)",
        "facts.blocked_client",
        "--blocked-client",
    ),
    "server_ca": Fact("the CA (trust anchor) of the target's certificate", "ca_file", "--ca"),
    "client_cert": Fact(
        "a client certificate the target verifies (and that it verifies client certificates)",
        "client_cert + verify_client: true",
        "--client-cert/--client-key --verify-client",
    ),
    "maillog": Fact(
        "the target's mail log file and its dialect (lab.scenario.logevents)",
        "maillog: {file, dialect}",
        "--maillog FILE --maillog-dialect postfix|exim|smtplab",
    ),
}

_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)(?:([+*-])(\d+))?\}")


def describe_missing(names: list[str]) -> str:
    """``needs the target fact max_recipients (profile facts.max_recipients, flag --max-recipients)``."""
    parts = [f"{FACTS[n].what} ({n}: profile {FACTS[n].profile}, flag {FACTS[n].flag})" for n in names]
    return "needs a declared target fact: " + "; ".join(parts)


def _value(match: re.Match[str], values: Mapping[str, Any]) -> Any:
    name, op, operand = match.group(1), match.group(2), match.group(3)
    if name not in values:
        raise KeyError(name)
    value = values[name]
    if op is None:
        return value
    number = int(operand)
    return {"+": value + number, "-": value - number, "*": value * number}[op]


def substitute(node: Any, values: Mapping[str, Any]) -> Any:
    """``node`` with every ``${name}`` (or ``${name+N}``, ``-N``, ``*N``) replaced, in place where it can be so that
    line numbers survive. A string that is one placeholder takes the value's type; ``{repeat: N, item: TEXT}``
    becomes a list of N strings with ``{n}`` in TEXT numbered from 1. An unknown name raises ``KeyError``."""
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            return _value(whole, values)
        return _PLACEHOLDER.sub(lambda m: str(_value(m, values)), node)
    if isinstance(node, list):
        node[:] = [substitute(item, values) for item in node]
        return node
    if isinstance(node, dict):
        if set(node) == {"repeat", "item"}:
            count, item = substitute(node["repeat"], values), substitute(node["item"], values)
            return [str(item).replace("{n}", str(n)) for n in range(1, int(count) + 1)]
        lines = getattr(node, "key_lines", None)
        for key in list(node):
            new_key = substitute(key, values) if isinstance(key, str) else key
            value = substitute(node.pop(key), values)
            node[new_key] = value
            if lines is not None and new_key != key and str(key) in lines:
                lines[str(new_key)] = lines.pop(str(key))
        return node
    return node
