"""``certconfig``: the certificates the appliance can present (docs/config-format.md, Certificate).

A listener presents one with listenerconfig > edit > certificate; until then it presents the built-in demo
certificate, which is insecure (docs/rules.md §1.2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from lab.appliance.config import DEMO
from lab.appliance.model import Appliance
from lab.appliance_cli.checks import check_name
from lab.appliance_cli.context import Context
from lab.appliance_cli.prompts import ask_choice, ask_item, ask_operation, ask_value
from lab.errors import BadInput
from lab.names import hostname_problem


def run(ctx: Context) -> None:
    while True:
        appliance = ctx.appliance()
        if appliance is None:
            return
        show(ctx, appliance)
        operation = ask_operation(
            ctx.term,
            [
                ("NEW", "Create a certificate (issued by the lab CA) or import one (PEM files)."),
                ("DELETE", "Remove a certificate."),
            ],
        )
        if operation is None:
            return
        (new if operation == "NEW" else delete)(ctx, appliance)


def show(ctx: Context, appliance: Appliance) -> None:
    term = ctx.term
    term.say()
    term.say("List of Certificates")
    term.say(f"  {DEMO} (demo): the INSECURE built-in demo certificate")
    for cert in appliance.certificates.values():
        if cert.kind == "lab":
            term.say(f"  {cert.name} (lab): issued by the lab CA for {', '.join(cert.hostnames)}")
        elif cert.kind == "pem":
            term.say(f"  {cert.name} (pem): {cert.cert_file}")
        elif cert.name != DEMO:
            term.say(f"  {cert.name} (demo): the INSECURE built-in demo certificate")
    term.say()
    for item in appliance.listeners:
        term.say(f"Listener {item.name} presents: {item.certificate or DEMO + ' (INSECURE built-in demo certificate)'}")


def _hostnames(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("enter at least one host name")
    for item in items:
        problem = hostname_problem(item, wildcard=True)
        if problem:
            raise ValueError(problem)
    return items


def new(ctx: Context, appliance: Appliance) -> None:
    term = ctx.term
    name = ask_value(term, "Enter a name for this certificate.", "", check_name([DEMO, *appliance.certificates]))
    kind = ask_choice(
        term,
        "How do you want to get the certificate?",
        ["Issue one with the lab CA", "Import a PEM certificate and key"],
        0,
    )
    entry = CommentedMap([("name", name)])
    if kind == 0:
        names = ask_value(
            term, "Enter the host names for the certificate, separated by commas.", appliance.hostname, _hostnames
        )
        entry["kind"] = "lab"
        entry["hostnames"] = CommentedSeq(names)
    else:
        base = ctx.doc.path.parent
        cert_file = ask_value(term, f"Enter the PEM certificate file (relative to {base}).", "", _file(base))
        key_file = ask_value(term, "Enter the PEM private key file (unencrypted).", "", _file(base))
        from lab.tls.certs import load_pem  # cryptography is slow to import; only an import needs it

        try:
            load_pem(str(base / cert_file), str(base / key_file), name)
        except BadInput as exc:
            term.refuse(f"Error: {exc}")
            return
        entry.update([("kind", "pem"), ("cert_file", cert_file), ("key_file", key_file)])
    if not isinstance(ctx.doc.working.get("certificates"), list):
        ctx.doc.working["certificates"] = CommentedSeq()
    ctx.doc.working["certificates"].append(entry)
    ctx.change(f"certificate {name} ({entry['kind']}) created")
    term.say()
    term.say(f"Certificate {name} created. Assign it to a listener with listenerconfig > edit > certificate.")


def _file(base: Path) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not text or not (base / text).is_file():
            raise ValueError(f"no such file: {base / text}")
        return text

    return check


def delete(ctx: Context, appliance: Appliance) -> None:
    names = [name for name in appliance.certificates if name != DEMO]
    if not names:
        ctx.term.refuse("Error: there is no certificate to delete (the demo certificate is built in)")
        return
    chosen = ask_item(ctx.term, "Enter the name or number of the certificate to delete.", names)
    if chosen is None:
        return
    users = [item.name for item in appliance.listeners if item.certificate == names[chosen]]
    if users:
        ctx.term.refuse(f"Error: certificate {names[chosen]} is presented by {', '.join(users)}")
        return
    certificates = ctx.doc.working["certificates"]
    position = next(i for i, item in enumerate(certificates) if item["name"] == names[chosen])
    del certificates[position]
    ctx.change(f"certificate {names[chosen]} deleted")
