"""The top-level prompt: the appliance commands, ``commit`` and ``clear``."""

from __future__ import annotations

from collections.abc import Callable

from lab.appliance_cli import alertconfig, certconfig, destconfig, listenerconfig, tlsverify
from lab.appliance_cli.context import Context
from lab.appliance_cli.prompts import ask_yes_no
from lab.appliance_cli.terminal import EndOfInput
from lab.errors import EXIT_BAD_INPUT, EXIT_OK, BadInput

HELP = [
    ("listenerconfig", "Configure mail listeners (and their Host Access Tables, under edit > hostaccess)."),
    ("certconfig", "Configure security certificates."),
    ("destconfig", "Configure destination controls (TLS, limits, bounce profile per domain)."),
    ("alertconfig", "Configure email alerts (who gets which classes and severities)."),
    ("tlsverify", "Test the TLS connection to a domain: tlsverify DOMAIN (a delivery through the lab)."),
    ("commit", "Commit the pending changes to the appliance file."),
    ("clear", "Clear the pending changes."),
    ("help", "This list."),
    ("quit", "Leave the CLI (also exit, or Ctrl-D)."),
]


class Shell:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.commit_refused = False
        self.commands: dict[str, Callable[[], None]] = {
            "listenerconfig": lambda: listenerconfig.run(self.ctx),
            "certconfig": lambda: certconfig.run(self.ctx),
            "destconfig": lambda: destconfig.run(self.ctx),
            "alertconfig": lambda: alertconfig.run(self.ctx),
            "commit": self.commit,
            "clear": self.clear,
            "help": self.help,
        }

    def prompt(self) -> str:
        hostname = self.ctx.doc.working.get("hostname")
        return f"{hostname if isinstance(hostname, str) else 'smtplab'}> "

    def run(self) -> int:
        """Read commands until quit or the end of the answers; the exit code (docs/cli.md)."""
        term = self.ctx.term
        words = [name for name, _ in HELP] + ["exit"]
        try:
            while True:
                term.say()
                command, _, argument = term.ask(self.prompt(), words).partition(" ")
                command, argument = command.lower(), argument.strip()
                if not command:
                    continue
                if command in ("quit", "exit", "q"):
                    if self.leave():
                        break
                elif command == "tlsverify":
                    tlsverify.run(self.ctx, argument)
                elif argument and command in self.commands:
                    term.refuse(f"Error: {command} takes no argument (its dialog asks)")
                elif command in self.commands:
                    self.commands[command]()
                else:
                    term.refuse(f"Unknown command or missing feature: {command!r} (help lists the commands)")
        except EndOfInput:
            pending = len(self.ctx.doc.changes)
            if pending:
                term.say(f"{pending} uncommitted change(s) discarded (not written).")
                if term.scripted:
                    term.refused += 1
        if term.scripted and (term.refused or self.commit_refused):
            return EXIT_BAD_INPUT
        return EXIT_OK

    def leave(self) -> bool:
        pending = len(self.ctx.doc.changes)
        if not pending:
            return True
        question = f"You have {pending} uncommitted change(s). Do you want to exit without committing them?"
        return ask_yes_no(self.ctx.term, question, False)

    def commit(self) -> None:
        term, doc = self.ctx.term, self.ctx.doc
        term.say()
        if not doc.changes:
            term.say("no data to commit")
            return
        try:
            doc.commit()
        except BadInput as exc:
            self.commit_refused = True
            term.say(f"Error: commit refused: {exc}")
            term.say(f"Nothing was written to {doc.path}; the changes are still pending ('clear' drops them).")
            return
        term.say(f"Changes committed to {doc.path}.")

    def clear(self) -> None:
        term, doc = self.ctx.term, self.ctx.doc
        if not doc.changes:
            term.say()
            term.say("no data to clear")
            return
        term.say()
        term.say("Pending changes:")
        for change in doc.changes:
            term.say(f"  {change}")
        if ask_yes_no(term, "Are you sure you want to clear all changes since the last commit?", True):
            count = doc.clear()
            term.say()
            term.say(f"Changes cleared ({count}).")

    def help(self) -> None:
        self.ctx.term.say()
        width = max(len(name) for name, _ in HELP)
        for name, what in HELP:
            self.ctx.term.say(f"{name.ljust(width)}  {what}")
