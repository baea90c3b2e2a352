"""The walk through mail flow policy parameters (hostaccess > default, and a policy's parameters).

Each question shows the value in force in brackets; only an answer that changes it is written to the file, so a
walk that takes every default leaves the file as it was. The checks are the loader's (docs/config-format.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from lab.appliance.config import parse_size
from lab.appliance_cli.prompts import ask_choice, ask_number, ask_value, ask_yes_no
from lab.appliance_cli.terminal import Terminal
from lab.policy.modes import TLSMode
from lab.policy.params import EffectiveParams

TLS_CHOICES = (TLSMode.NO, TLSMode.PREFERRED, TLSMode.REQUIRED)
CERTCONFIG_REMINDER = (
    "You have chosen to enable TLS. Please use the 'certconfig' command to ensure that there is a valid "
    "certificate configured."
)


def size_label(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def tls_label(mode: TLSMode) -> str:
    return mode.value.capitalize()


def _text(limit: int) -> Callable[[str], str]:
    def check(text: str) -> str:
        if len(text) > limit or any(not " " <= c <= "~" for c in text):
            raise ValueError(f"printable ASCII, at most {limit} characters")
        return text

    return check


def _senders(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    for item in items:
        if len(item) > 320 or any(c.isspace() or not c.isprintable() for c in item):
            raise ValueError(f"{item[:60]!r}: a sender is a@example.com, example.com or .example.com")
    return items


def describe(params: EffectiveParams) -> list[str]:
    """The default policy parameters as ``hostaccess`` lists them."""
    senders = ", ".join(params.tls_mandatory_senders) or "(none)"
    return [
        f"Maximum Message Size: {size_label(params.max_message_size)}",
        f"Maximum Number Of Concurrent Connections From A Single IP: {params.max_concurrency_per_ip}",
        f"Maximum Number Of Messages Per Connection: {params.max_msgs_per_connection}",
        f"Maximum Number Of Recipients Per Message: {params.max_rcpts_per_msg}",
        f"SMTP Banner Code: {params.banner_code}",
        f"SMTP Banner Text: {params.banner_text or '(the lab default)'}",
        f"SMTP Reject Banner Code: {params.reject_banner_code}",
        f"SMTP Reject Banner Text: {params.reject_banner_text}",
        f"Max Recipients Per Hour: {params.max_rcpts_per_hour or 'unlimited'}",
        f"Use TLS: {tls_label(params.tls)}",
        f"Verify Client Certificate: {'Yes' if params.verify_client else 'No'}",
        f"TLS Mandatory Senders: {senders}",
    ]


class ParamWalk:
    """One walk: asks, writes the changed answers into ``target`` and lists what changed."""

    def __init__(self, term: Terminal, target: CommentedMap, current: EffectiveParams, inherited: TLSMode | None):
        """``inherited``: for a policy, the listener default its TLS falls back to (offered as "Use Default")."""
        self.term, self.target, self.current, self.inherited = term, target, current, inherited
        self.changed: list[str] = []
        self.tls_enabled = False

    def set(self, key: str, value: Any, now: Any, shown: Any = None) -> None:
        if value != now:
            self.target[key] = value
            self.changed.append(f"{key}: {shown if shown is not None else value}")

    def run(self) -> list[str]:
        cur, term = self.current, self.term
        size = ask_value(
            term,
            "Enter the maximum message size. Add a trailing K for kilobytes, M for megabytes, or no letter for bytes.",
            size_label(cur.max_message_size),
            lambda text: (text.strip(), parse_size(text)),
        )
        if size[1] != cur.max_message_size:
            self.target["max_message_size"] = size[0]
            self.changed.append(f"max_message_size: {size[0]}")
        question = "Enter the maximum number of concurrent connections allowed from a single IP address."
        self.set(
            "max_concurrency_per_ip",
            ask_number(term, question, cur.max_concurrency_per_ip, 1, 65535),
            cur.max_concurrency_per_ip,
        )
        question = "Enter the maximum number of messages per connection."
        self.set(
            "max_msgs_per_connection",
            ask_number(term, question, cur.max_msgs_per_connection, 1, 1_000_000),
            cur.max_msgs_per_connection,
        )
        question = "Enter the maximum number of recipients per message."
        self.set(
            "max_rcpts_per_msg", ask_number(term, question, cur.max_rcpts_per_msg, 1, 100_000), cur.max_rcpts_per_msg
        )
        self.banners()
        custom = cur.max_rcpts_per_hour is not None
        if ask_yes_no(term, "Do you want to enable rate limiting per host?", custom):
            question = "Enter the maximum number of recipients per hour from a remote host."
            rate = ask_number(term, question, cur.max_rcpts_per_hour or 1000, 1, 1_000_000_000)
            self.set("max_rcpts_per_hour", rate, cur.max_rcpts_per_hour)
        elif custom:
            self.target.pop("max_rcpts_per_hour", None)
            self.changed.append("max_rcpts_per_hour: unlimited")
        self.tls()
        return self.changed

    def banners(self) -> None:
        cur, term = self.current, self.term
        custom = cur.banner_code != 220 or bool(cur.banner_text)
        if ask_yes_no(term, "Would you like to specify a custom SMTP acceptance response?", custom):
            code = ask_number(
                term, "Enter the SMTP code to use in the response. 220 is the standard code.", cur.banner_code, 200, 299
            )
            self.set("banner_code", code, cur.banner_code)
            text = ask_value(term, "Enter your custom SMTP acceptance response.", cur.banner_text, _text(200))
            self.set("banner_text", text, cur.banner_text)
        custom = cur.reject_banner_code != 554 or cur.reject_banner_text != "Access denied"
        if ask_yes_no(term, "Would you like to specify a custom SMTP rejection response?", custom):
            code = ask_number(
                term,
                "Enter the SMTP code to use in the response. 554 is the standard code.",
                cur.reject_banner_code,
                400,
                599,
            )
            self.set("reject_banner_code", code, cur.reject_banner_code)
            text = ask_value(term, "Enter your custom SMTP rejection response.", cur.reject_banner_text, _text(200))
            self.set("reject_banner_text", text, cur.reject_banner_text)

    def tls(self) -> None:
        cur, term = self.current, self.term
        options = [tls_label(mode) for mode in TLS_CHOICES]
        set_here = "tls" in self.target
        if self.inherited is not None:  # a policy: it may take the listener's default
            options.insert(0, f"Use Default ({tls_label(self.inherited)})")
            default = TLS_CHOICES.index(cur.tls) + 1 if set_here else 0
        else:
            default = TLS_CHOICES.index(cur.tls)
        index = ask_choice(term, "Do you want to allow encrypted TLS connections?", options, default)
        if self.inherited is not None and index == 0:
            mode = self.inherited
            if set_here:
                self.target.pop("tls")
                self.changed.append(f"tls: use default ({tls_label(mode)})")
        else:
            mode = TLS_CHOICES[index - (1 if self.inherited is not None else 0)]
            if mode != cur.tls or (self.inherited is not None and not set_here):
                self.target["tls"] = mode.value
                self.changed.append(f"tls: {tls_label(mode)}")
        if mode is not TLSMode.NO and cur.tls is TLSMode.NO:
            self.tls_enabled = True
            term.say()
            term.say(CERTCONFIG_REMINDER)
        if mode is TLSMode.NO:
            return
        verify = ask_yes_no(term, "Would you like to verify client certificates?", cur.verify_client)
        self.set("verify_client", verify, cur.verify_client)
        if mode is TLSMode.PREFERRED:
            question = (
                "Enter the envelope senders for whom TLS is mandatory, separated by commas "
                "(a@example.com, example.com, .example.com), or NONE."
            )
            now = list(cur.tls_mandatory_senders)
            senders = ask_value(term, question, ", ".join(now) or "none", _senders)
            if senders != now:
                self.target["tls_mandatory_senders"] = CommentedSeq(senders)
                self.changed.append(f"tls_mandatory_senders: {', '.join(senders) or '(none)'}")
