"""``smtplab netns``: the network namespaces of the netns carrier on this machine (docs/netns.md).

``list`` prints each namespace the lab made with the process that owns it and whether that process still runs;
``cleanup`` removes those whose process is gone (every netns run does this itself before it starts; this is
for a machine where no run follows a killed one).
"""

from __future__ import annotations

import argparse

from lab.errors import EXIT_OK

HELP = "list the netns carrier's namespaces, or remove those a killed run left (cleanup)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "cleanup"), help="list: show them; cleanup: remove the leftovers")


def run(args: argparse.Namespace) -> int:
    from lab.net import netns

    if args.action == "cleanup":
        netns.require_netns()
        removed = netns.sweep()
        print(f"removed {len(removed)} namespace(s) of processes that are gone" + "".join(f"\n  {n}" for n in removed))
        return EXIT_OK
    owned = netns.owned_namespaces()
    for name, pid in sorted(owned.items()):
        print(f"{name}  pid {pid} {'running' if netns.alive(pid) else 'gone (smtplab netns cleanup removes it)'}")
    if not owned:
        print("no namespace of the lab on this machine")
    return EXIT_OK
