"""``smtplab netns``: the network namespaces of the netns carrier on this machine (docs/netns.md).

``list`` prints each namespace the lab made with the process that owns it and whether that process still runs,
and the kept set if one is up; ``cleanup`` removes those whose process is gone (every netns run does this itself
before it starts; this is for a machine where no run follows a killed one). ``up`` makes the kept set
(``smtplab-kept-<host>``), which stays until ``down``: a real MTA is started inside it (``ip netns exec
smtplab-kept-esa ...``) and ``smtplab run --carrier netns --target ADDR:PORT`` reaches it there.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from lab.errors import EXIT_OK

HELP = "list the netns carrier's namespaces, remove those a killed run left (cleanup), or keep a set (up, down)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("list", "cleanup", "up", "down"),
        help="list: show them; cleanup: remove the leftovers; up: make the kept set (for a real MTA inside); "
        "down: remove it",
    )
    parser.add_argument("--topology", metavar="FILE", help="up: the topology file (default: the built-in topology)")


def run(args: argparse.Namespace) -> int:
    from lab.net import netns

    if args.action == "cleanup":
        netns.require_netns()
        removed = netns.sweep()
        print(f"removed {len(removed)} namespace(s) of processes that are gone" + "".join(f"\n  {n}" for n in removed))
        return EXIT_OK
    if args.action == "up":
        from lab.net.topology import default_topology, load_topology

        topology = load_topology(args.topology) if args.topology else default_topology()
        made = netns.build_kept(topology)
        appliance = topology.appliance_host()
        print(f"kept {len(made.namespaces)} namespace(s) until smtplab netns down" + _names(made.namespaces.values()))
        print(
            f"start an MTA in the appliance's: ip netns exec {made.namespaces[appliance.name]} ...; "
            f"on {', '.join(appliance.addresses)}"
        )
        return EXIT_OK
    if args.action == "down":
        netns.require_netns()
        removed = netns.remove_kept()
        print(f"removed {len(removed)} kept namespace(s)" + _names(removed))
        return EXIT_OK
    owned = netns.owned_namespaces()
    for name, pid in sorted(owned.items()):
        print(f"{name}  pid {pid} {'running' if netns.alive(pid) else 'gone (smtplab netns cleanup removes it)'}")
    kept = netns.kept_namespaces()
    for name in kept:
        print(f"{name}  kept (smtplab netns down removes it)")
    if not owned and not kept:
        print("no namespace of the lab on this machine")
    return EXIT_OK


def _names(names: Iterable[str]) -> str:
    return "".join(f"\n  {n}" for n in names)
