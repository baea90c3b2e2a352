"""Mail flow policies and parameter inheritance (docs/rules.md §1).

A parameter a policy leaves unset (``None``) takes the listener's default policy parameters, which in turn
fall back to the appliance defaults below. Out of the box every listener's TLS setting is ``No``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from lab.policy.modes import Behaviour, ListenerType, TLSMode


@dataclass(frozen=True)
class PolicyParams:
    """Parameters of one policy; ``None`` means "inherit"."""

    max_msgs_per_connection: int | None = None
    max_rcpts_per_msg: int | None = None
    max_message_size: int | None = None
    max_concurrency_per_ip: int | None = None
    banner_code: int | None = None
    banner_text: str | None = None
    reject_banner_code: int | None = None
    reject_banner_text: str | None = None
    tls: TLSMode | None = None
    verify_client: bool | None = None
    tls_mandatory_senders: tuple[str, ...] | None = None
    max_rcpts_per_hour: int | None = None

    def over(self, base: EffectiveParams) -> EffectiveParams:
        """These parameters with every unset one taken from ``base``."""
        changes = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(base, **changes)


@dataclass(frozen=True)
class EffectiveParams:
    """Every parameter resolved; what a session is run with."""

    max_msgs_per_connection: int = 10
    max_rcpts_per_msg: int = 1000
    max_message_size: int = 10 * 1024 * 1024
    max_concurrency_per_ip: int = 10
    banner_code: int = 220
    banner_text: str = ""
    reject_banner_code: int = 554
    reject_banner_text: str = "Access denied"
    tls: TLSMode = TLSMode.NO
    verify_client: bool = False
    tls_mandatory_senders: tuple[str, ...] = ()
    max_rcpts_per_hour: int | None = None


APPLIANCE_DEFAULTS = EffectiveParams()


@dataclass(frozen=True)
class MailFlowPolicy:
    """A named behaviour plus parameters."""

    name: str
    behaviour: Behaviour
    params: PolicyParams = field(default_factory=PolicyParams)

    def effective(self, listener_defaults: PolicyParams) -> EffectiveParams:
        """Policy over listener defaults over appliance defaults."""
        return self.params.over(listener_defaults.over(APPLIANCE_DEFAULTS))


def predefined_groups(kind: ListenerType) -> list[tuple[str, str]]:
    """The sender groups a new listener starts with, in HAT order: (group, policy)."""
    if kind is ListenerType.PUBLIC:
        return [
            ("WHITELIST", "TRUSTED"),
            ("BLACKLIST", "BLOCKED"),
            ("SUSPECTLIST", "THROTTLED"),
            ("UNKNOWNLIST", "ACCEPTED"),
            ("ALL", "ACCEPTED"),
        ]
    return [("RELAYLIST", "RELAYED"), ("ALL", "BLOCKED")]


def predefined_policies(kind: ListenerType) -> dict[str, MailFlowPolicy]:
    """The mail flow policies a new listener starts with (after the appliance's factory settings)."""
    blocked = MailFlowPolicy("BLOCKED", Behaviour.REJECT)
    if kind is ListenerType.PRIVATE:
        relayed = MailFlowPolicy("RELAYED", Behaviour.RELAY, PolicyParams(max_msgs_per_connection=1000))
        return {"RELAYED": relayed, "BLOCKED": blocked}
    return {
        "TRUSTED": MailFlowPolicy(
            "TRUSTED", Behaviour.ACCEPT, PolicyParams(max_msgs_per_connection=1000, max_concurrency_per_ip=600)
        ),
        "BLOCKED": blocked,
        "THROTTLED": MailFlowPolicy(
            "THROTTLED",
            Behaviour.ACCEPT,
            PolicyParams(max_msgs_per_connection=1, max_rcpts_per_msg=25, max_concurrency_per_ip=1),
        ),
        "ACCEPTED": MailFlowPolicy("ACCEPTED", Behaviour.ACCEPT),
    }
