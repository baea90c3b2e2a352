"""What every dialog works with: the terminal and the document, and the pending configuration as the loader
builds it (the summaries and the values in brackets come from there, so they are what ``serve`` would run);
for ``tlsverify``, the topology whose virtual DNS names the MX hosts and what the lab serves at them."""

from __future__ import annotations

from dataclasses import dataclass, field

from lab.appliance.model import Appliance
from lab.appliance_cli.document import ConfigDocument
from lab.appliance_cli.terminal import Terminal
from lab.errors import BadInput
from lab.net.topology import Topology, default_topology


@dataclass
class Context:
    term: Terminal
    doc: ConfigDocument
    topology: Topology = field(default_factory=default_topology)
    topology_label: str = "the built-in topology"
    receivers: dict[str, str] = field(default_factory=dict)  # MX host -> receiver mode (``--receiver``)

    def appliance(self) -> Appliance | None:
        """The pending configuration built by the loader; None (and its one line said) if it would be refused."""
        try:
            return self.doc.appliance()
        except BadInput as exc:
            self.term.say()
            self.term.say(f"Error: the pending changes do not load: {exc}")
            self.term.say("Change them back, or use 'clear' to drop every pending change.")
            return None

    def change(self, what: str) -> None:
        self.doc.note(what)
