"""``smtplab listeners``: show each listener and its Host Access Table as the appliance would, then the outbound
side (destination controls, bounce profiles, alert recipients)."""

from __future__ import annotations

import argparse

from lab.appliance.config import default_appliance_path, hat_summary, listener_summary, load_appliance
from lab.appliance_cli.outbound import outbound_summary
from lab.errors import EXIT_OK

HELP = "print each listener's summary and its Host Access Table, then the outbound destination controls and alerts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="appliance configuration (YAML); default: the built-in default appliance",
    )


def run(args: argparse.Namespace) -> int:
    appliance = load_appliance(args.config or default_appliance_path())
    blocks = [f"{listener_summary(appliance, item)}\n\n{hat_summary(item)}" for item in appliance.listeners]
    print(f"Appliance: {appliance.hostname}\n")
    print("\n\n".join([*blocks, outbound_summary(appliance)]))
    return EXIT_OK
