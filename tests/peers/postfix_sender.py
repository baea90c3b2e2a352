"""A throwaway Postfix instance as a SENDER: its smtp(8) client at one smtp_tls_security_level, routed to the
lab's receivers by a transport map, trusting the lab CA; stopped by PID like the receiving peer.

The instance is a ``PostfixPeer`` (its own config, queue and log under the work directory) with the outbound
settings added: ``transport_maps`` and ``smtp_tls_policy_maps`` are texthash files the harness writes from the
sender profile (one line per receiver case: ``[host]:port LEVEL match=NAME`` so verify and secure check the
receiver's name), short client timeouts so a stalled receiver ends within seconds, and no retries within a run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from lab.errors import BadInput
from peers.postfix import PostfixPeer

SenderLevel = Literal["none", "may", "encrypt", "verify", "secure"]
SENDER_LEVELS = ("none", "may", "encrypt", "verify", "secure")


class PostfixSender(PostfixPeer):
    """``smtp_tls_security_level = level``; mail goes where ``routes`` (a texthash transport map) says."""

    kind = "postfix-sender"

    def __init__(
        self, workdir: Path, address: str, *, level: SenderLevel, ca_file: Path, port: int | None = None
    ) -> None:
        super().__init__(workdir, address, port, "none", hostname="sender.peer.test", accept_domain="sender.peer.test")
        if level not in SENDER_LEVELS:
            raise BadInput(f"{level!r} is not one of {', '.join(SENDER_LEVELS)}", field="level")
        self.level = level
        self.ca_file = ca_file.resolve()

    @property
    def routes_path(self) -> Path:
        return self.config_dir / "transport"

    @property
    def policy_path(self) -> Path:
        return self.config_dir / "tls_policy"

    def main_cf(self) -> str:
        text = super().main_cf()
        for dropped in ("smtp_tls_security_level", "default_transport", "relay_transport"):
            text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith(dropped + " "))
        return text + "\n".join(
            [
                f"smtp_tls_security_level = {self.level}",
                f"smtp_tls_CAfile = {self.ca_file}",
                "smtp_tls_loglevel = 1",
                f"transport_maps = texthash:{self.routes_path}",
                f"smtp_tls_policy_maps = texthash:{self.policy_path}",
                "default_transport = smtp",
                "relay_transport = smtp",
                "smtp_connect_timeout = 5s",
                "smtp_helo_timeout = 10s",
                "smtp_starttls_timeout = 5s",
                "smtp_tls_connection_reuse = no",
                "smtp_connection_cache_on_demand = no",
                "minimal_backoff_time = 3600s",
                "maximal_backoff_time = 3600s",
                "queue_run_delay = 3600s",
                "default_destination_concurrency_limit = 50",
                "initial_destination_concurrency = 50",
                "default_process_limit = 100",
                "smtp_address_preference = ipv4",
                "",
            ]
        )

    @staticmethod
    def _postfix_path() -> str:
        return shutil.which("postfix") or "/usr/sbin/postfix"

    def master_cf(self) -> str:
        return super().master_cf() + "smtp      unix  -       -       n       -       -       smtp\n"

    def write_config(self) -> Path:
        conf = super().write_config()
        for path in (self.routes_path, self.policy_path):
            if not path.exists():
                path.write_text("")
        return conf

    def profile_yaml(self, name: str, declared: str, network: str, port: int = 2525, wait: float = 30) -> str:
        """A sender profile (conformance/senders format) for this running instance."""
        match = {"secure": " match={domain}", "verify": " match={name}"}.get(self.level, "")
        level = self.level
        return "\n".join(
            [
                f"name: {name}",
                f"description: Postfix smtp client at smtp_tls_security_level={self.level} (tests/peers)",
                f"policy: {declared}",
                f"receivers: {{network: {network}, port: {port}}}",
                "routes:",
                f"  - {{file: {self.routes_path}, line: '{{domain}} smtp:[{{host}}]:{{port}}'}}",
                f"  - {{file: {self.policy_path}, line: '[{{host}}]:{{port}} {level}{match}'}}",
                # routes change per run: reload, so that no daemon keeps an older transport map (texthash)
                f"start: [{self._postfix_path()}, -c, {self.config_dir}, reload]",
                f"submit: {{command: [/usr/sbin/sendmail, -C, {self.config_dir}, -f, '{{from}}', '{{to}}']}}",
                f"outcome: {{maillog: {self.maillog_path}, dialect: postfix}}",
                f"wait: {wait}",
                "",
            ]
        )
