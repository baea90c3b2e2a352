"""Load an appliance configuration file (docs/config-format.md) into ``lab.appliance.model.Appliance``.

The JSON Schema (``lab/schemas/appliance.schema.json``) checks shapes; this module first forgives the spellings
users expect to work (``tls: No``, ``Preferred``, Postfix's ``may``, ``min_version: 1.2``) and then checks what a
schema cannot: cross-references, HAT member syntax, predefined groups and policies. Every problem is a
``BadInput`` naming ``file:line: field``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lab.appliance.model import (
    ALERT_CLASSES,
    ALERT_SEVERITIES,
    AlertRecipient,
    Appliance,
    Certificate,
    Interface,
    Listener,
    Outbound,
    TLSSettings,
)
from lab.errors import BadInput, excerpt
from lab.names import hostname_problem
from lab.policy.deadlines import Timeouts
from lab.policy.destinations import (
    DESTINATION_TLS_SPELLINGS,
    BounceProfile,
    DestinationControl,
    DestinationControls,
    parse_destination_tls,
)
from lab.policy.hat import HostAccessTable, MemberSyntaxError, SenderGroup, parse_member
from lab.policy.modes import Behaviour, ListenerType, TLSMode, parse_tls_mode
from lab.policy.params import MailFlowPolicy, PolicyParams, predefined_groups, predefined_policies
from lab.yamlsource import DocumentBuilder, FieldPath, parse_yaml, read_yaml

SCHEMA = "appliance.schema.json"
DEMO = "demo"
DEMO_LABEL = "demo (INSECURE built-in demo certificate)"

_SIZE = re.compile(r"^\s*(\d{1,12})\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
MAX_MESSAGE_SIZE = 1024**3  # 1G: a message the lab holds in memory while it spools it


def default_appliance_path() -> Path:
    """The built-in default appliance file (package data)."""
    return Path(str(resources.files("lab").joinpath("defaults", "appliance.yaml")))


def load_appliance(path: str | Path) -> Appliance:
    """Read, check and build an appliance from a YAML file; ``builtin`` names the built-in default."""
    path = default_appliance_path() if str(path) == "builtin" else Path(path)
    return appliance_from_dict(read_yaml(path), str(path))


def appliance_from_text(text: str, file: str) -> Appliance:
    """Check and build an appliance from YAML text not yet on disk (``smtplab cli`` before it commits);
    ``file`` is where it will be written: errors name it, and certificate paths are relative to it."""
    return appliance_from_dict(parse_yaml(text, file), file)


def default_appliance() -> Appliance:
    return load_appliance(default_appliance_path())


def appliance_from_dict(doc: Any, file: str) -> Appliance:
    """Build an appliance from a document of ``lab.yamlsource.parse_yaml``; ``file`` names it in errors."""
    return _Builder(doc, file).build()


# --- leniency: rewrite the spellings users expect, in place, so that line numbers survive -----------------


def _tls_value(value: Any) -> Any:
    if value is False:  # YAML 1.1 reads an unquoted No / no / off as false
        return "no"
    if isinstance(value, str):
        mode = parse_tls_mode(value)
        return value if mode is None else str(mode)
    return value


def _version_value(value: Any) -> Any:
    if isinstance(value, float | int) and not isinstance(value, bool):
        value = f"{float(value):.1f}"
    if isinstance(value, str):
        text = value.strip().lower().replace("tlsv", "").replace("tls", "").strip(" v")
        return text if text in ("1.0", "1.1", "1.2", "1.3") else value
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _normalise_params(params: Any) -> None:
    if not isinstance(params, dict):
        return
    if "tls" in params:
        params["tls"] = _tls_value(params["tls"])
    if "behaviour" in params:
        params["behaviour"] = _lower(params["behaviour"])


def _normalise(builder: _Builder) -> None:
    """Forgive case, Postfix aliases and YAML 1.1 surprises; reject numbers that YAML made of a HAT member."""
    doc = builder.doc
    if not isinstance(doc, dict):
        return
    for cert in doc.get("certificates") or []:
        if isinstance(cert, dict) and "kind" in cert:
            cert["kind"] = _lower(cert["kind"])
    outbound = doc.get("outbound")
    if isinstance(outbound, dict):
        controls = [outbound.get("default_destination"), *(outbound.get("destination_controls") or [])]
        for control in controls:
            if isinstance(control, dict) and control.get("tls") is False:
                control["tls"] = "no"  # YAML 1.1 reads an unquoted No as false
    listeners = doc.get("listeners")
    if not isinstance(listeners, list):
        return
    for index, listener in enumerate(listeners):
        if not isinstance(listener, dict):
            continue
        if "type" in listener:
            listener["type"] = _lower(listener["type"])
        if isinstance(listener.get("rat"), str):
            listener["rat"] = [listener["rat"]]
        tls = listener.get("tls")
        if isinstance(tls, dict):
            for key in ("min_version", "max_version"):
                if key in tls and tls[key] is not None:
                    tls[key] = _version_value(tls[key])
        hat = listener.get("hat")
        if not isinstance(hat, dict):
            continue
        _normalise_params(hat.get("defaults"))
        policies = hat.get("policies")
        if isinstance(policies, dict):
            for policy in policies.values():
                _normalise_params(policy)
        for g, group in enumerate(hat.get("sender_groups") or []):
            members = group.get("members") if isinstance(group, dict) else None
            for m, member in enumerate(members if isinstance(members, list) else []):
                if isinstance(member, int | float) and not isinstance(member, bool):
                    path: FieldPath = ["listeners", index, "hat", "sender_groups", g, "members", m]
                    raise builder.fail(f"YAML read {member!r} as a number; quote the member, e.g. '{member}'", path)


# --- building -----------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """``10485760``, ``10M``, ``512K``, ``1GB`` -> bytes, at most ``MAX_MESSAGE_SIZE``."""
    found = _SIZE.match(str(text))
    if not found or int(found.group(1)) < 1:
        raise ValueError(f"{excerpt(text)} is not a size (bytes, or a number with K, M or G)")
    exponent = " kmg".index(found.group(2).lower() or " ")
    size = int(found.group(1)) * int(1024**exponent)
    if size > MAX_MESSAGE_SIZE:
        raise ValueError(f"{excerpt(text)} is more than the largest size the lab accepts (1G)")
    return size


class _Builder(DocumentBuilder):
    SCHEMA = SCHEMA

    def build(self) -> Appliance:
        _normalise(self)
        self.validate()
        doc = self.doc
        self.hostname(doc["hostname"], ["hostname"])
        interfaces = self.interfaces(doc["interfaces"])
        certificates = self.certificates(doc.get("certificates") or [], doc["hostname"])
        listeners: list[Listener] = []
        seen_names: dict[str, int] = {}
        seen_sockets: dict[tuple[str, int], int] = {}
        for index, item in enumerate(doc["listeners"]):
            path: FieldPath = ["listeners", index]
            listener = self.listener(item, path, interfaces, certificates)
            if listener.name in seen_names:
                raise self.fail(
                    f"duplicate listener name {listener.name!r} (also listeners[{seen_names[listener.name]}])",
                    [*path, "name"],
                )
            seen_names[listener.name] = index
            socket = (listener.interface, listener.port)
            if socket in seen_sockets:
                other = doc["listeners"][seen_sockets[socket]]["name"]
                raise self.fail(
                    f"listener {other!r} already uses interface {listener.interface} port {listener.port}",
                    [*path, "port" if "port" in item else "interface"],
                )
            seen_sockets[socket] = index
            listeners.append(listener)
        outbound = self.outbound(doc.get("outbound") or {}, interfaces, certificates)
        return Appliance(
            doc["hostname"], interfaces, certificates, tuple(listeners), source=self.file, outbound=outbound
        )

    # -- outbound (docs/outbound.md)

    def outbound(self, raw: Any, interfaces: dict[str, Interface], certificates: dict[str, Certificate]) -> Outbound:
        path: FieldPath = ["outbound"]
        interface = raw.get("interface")
        if interface is not None and interface not in interfaces:
            known = ", ".join(interfaces)
            raise self.fail(f"unknown interface {excerpt(interface)} (known: {known})", [*path, "interface"])
        certificate = raw.get("certificate")
        if certificate is not None and certificate not in certificates:
            known = ", ".join(certificates) or "none"
            raise self.fail(f"unknown certificate {excerpt(certificate)} (known: {known})", [*path, "certificate"])
        profiles = self.bounce_profiles(raw.get("bounce_profiles") or [], [*path, "bounce_profiles"])
        default = self.destination(
            raw.get("default_destination") or {}, DestinationControl(), profiles, [*path, "default_destination"]
        )
        entries: dict[str, DestinationControl] = {}
        for index, item in enumerate(raw.get("destination_controls") or []):
            epath: FieldPath = [*path, "destination_controls", index]
            domain = self.destination_domain(item["domain"], [*epath, "domain"])
            if domain in entries:
                raise self.fail(f"duplicate destination {domain}", [*epath, "domain"])
            entries[domain] = self.destination(item, replace(default, domain=domain), profiles, epath)
        alerts = raw.get("alerts") or {}
        recipients = tuple(
            self.alert_recipient(item, [*path, "alerts", "recipients", i])
            for i, item in enumerate(alerts.get("recipients") or [])
        )
        return Outbound(
            interface=interface,
            certificate=certificate,
            destinations=DestinationControls(default, entries),
            bounce_profiles=profiles,
            alerts_enabled=alerts.get("enabled", True),
            alert_recipients=recipients,
        )

    def bounce_profiles(self, items: list[Any], path: FieldPath) -> dict[str, BounceProfile]:
        profiles = {"Default": BounceProfile()}
        seen: set[str] = set()
        for index, item in enumerate(items):
            ppath: FieldPath = [*path, index]
            if item["name"] in seen:
                raise self.fail(f"duplicate bounce profile {item['name']!r}", [*ppath, "name"])
            seen.add(item["name"])
            base = profiles.get(item["name"], BounceProfile())
            values = {
                k: item[k]
                for k in ("initial_wait", "max_wait", "max_retries", "max_time_in_queue", "send_bounces")
                if k in item
            }
            profile = BounceProfile(item["name"], **{**_fields_of(base), **values})
            if profile.max_wait < profile.initial_wait:
                raise self.fail("max_wait is shorter than initial_wait", [*ppath, "max_wait"])
            profiles[item["name"]] = profile
        return profiles

    def destination(
        self, item: Any, base: DestinationControl, profiles: dict[str, BounceProfile], path: FieldPath
    ) -> DestinationControl:
        """An entry's settings over ``base`` (an entry inherits what it leaves out from the default)."""
        values: dict[str, Any] = {}
        if "tls" in item:
            setting = parse_destination_tls(str(item["tls"]))
            if setting is None:
                raise self.fail(
                    f"{excerpt(item['tls'])} is not a TLS setting ({DESTINATION_TLS_SPELLINGS})", [*path, "tls"]
                )
            values["tls"] = setting
        for key in ("max_concurrency", "max_messages_per_connection", "max_recipients_per_hour", "bounce_profile"):
            if key in item:
                values[key] = item[key]
        profile = values.get("bounce_profile", base.bounce_profile)
        if profile not in profiles:
            known = ", ".join(profiles)
            raise self.fail(f"unknown bounce profile {excerpt(profile)} (known: {known})", [*path, "bounce_profile"])
        return replace(base, **values)

    def destination_domain(self, raw: str, path: FieldPath) -> str:
        text = raw.strip().rstrip(".").lower()
        problem = hostname_problem(text[1:] if text.startswith(".") else text)
        if problem is not None or "@" in text:
            raise self.fail(f"{excerpt(raw)} is not a domain or .domain", path)
        return text

    def alert_recipient(self, item: Any, path: FieldPath) -> AlertRecipient:
        chosen: dict[str, tuple[str, ...]] = {}
        for key, known in (("classes", ALERT_CLASSES), ("severities", ALERT_SEVERITIES)):
            words = [str(w).strip().lower() for w in item.get(key, ["all"])]
            for i, word in enumerate(words):
                if word != "all" and word not in known:
                    raise self.fail(f"{excerpt(word)} is not one of {', '.join(known)} or all", [*path, key, i])
            chosen[key] = known if "all" in words else tuple(dict.fromkeys(words))
        domain = item["address"].rpartition("@")[2]
        if hostname_problem(domain.lower()) is not None:
            raise self.fail(f"{excerpt(item['address'])} is not an email address", [*path, "address"])
        return AlertRecipient(item["address"], chosen["classes"], chosen["severities"])

    def hostname(self, name: str, path: FieldPath, *, certificate: bool = False) -> None:
        """RFC 1123 (it reaches the banner, the EHLO reply and certificates); a certificate may name an IP."""
        if certificate and _is_ip(name):
            return
        problem = hostname_problem(name, wildcard=certificate)
        if problem:
            raise self.fail(problem, path)

    def interfaces(self, items: list[Any]) -> dict[str, Interface]:
        out: dict[str, Interface] = {}
        addresses: dict[str, str] = {}
        for index, item in enumerate(items):
            path: FieldPath = ["interfaces", index]
            if item["name"] in out:
                raise self.fail(f"duplicate interface name {excerpt(item['name'])}", [*path, "name"])
            try:
                address = ipaddress.ip_address(item["address"])
            except ValueError:
                raise self.fail(f"{excerpt(item['address'])} is not an IP address", [*path, "address"]) from None
            if "%" in item["address"]:
                raise self.fail("an interface address has no scope (%zone)", [*path, "address"])
            prefix = item.get("prefix", 24 if address.version == 4 else 64)
            if prefix > address.max_prefixlen:
                raise self.fail(f"prefix {prefix} is too long for IPv{address.version}", [*path, "prefix"])
            if str(address) in addresses:
                raise self.fail(
                    f"address {address} is already on interface {addresses[str(address)]}", [*path, "address"]
                )
            addresses[str(address)] = item["name"]
            out[item["name"]] = Interface(item["name"], str(address), prefix)
        return out

    def certificates(self, items: list[Any], hostname: str) -> dict[str, Certificate]:
        out: dict[str, Certificate] = {}
        base = Path(self.file).parent
        for index, item in enumerate(items):
            path: FieldPath = ["certificates", index]
            name, kind = item["name"], item["kind"]
            if name in out:
                raise self.fail(f"duplicate certificate name {name!r}", [*path, "name"])
            if name == DEMO and kind != "demo":
                raise self.fail("the name 'demo' is reserved for the built-in demo certificate", [*path, "name"])
            allowed = {"demo": set(), "lab": {"hostnames"}, "pem": {"cert_file", "key_file"}}[kind]
            extra = sorted(set(item) - {"name", "kind"} - allowed)
            if extra:
                raise self.fail(f"not used by a certificate of kind {kind}", [*path, extra[0]])
            if kind == "pem":
                for key in ("cert_file", "key_file"):
                    if key not in item:
                        raise self.fail(f"a certificate of kind pem needs {key}", path)
                cert_file, key_file = str(base / item["cert_file"]), str(base / item["key_file"])
                self.check_pem(cert_file, key_file, name, path)
                out[name] = Certificate(name, kind, cert_file=cert_file, key_file=key_file)
            elif kind == "lab":
                for i, host in enumerate(item.get("hostnames") or []):
                    self.hostname(host, [*path, "hostnames", i], certificate=True)
                out[name] = Certificate(name, kind, hostnames=tuple(item.get("hostnames") or [hostname]))
            else:
                out[name] = Certificate(name, kind)
        return out

    def check_pem(self, cert_file: str, key_file: str, name: str, path: FieldPath) -> None:
        """Fail at load time, at the YAML line, rather than when the first client connects."""
        from lab.tls.certs import load_pem  # cryptography is slow to import; only pem needs it

        try:
            load_pem(cert_file, key_file, name)
        except BadInput as exc:
            key_problem = exc.file == key_file and (cert_file != key_file or "key" in exc.problem.lower())
            key = "key_file" if key_problem else "cert_file"  # one file for both: the certificate is read first
            raise self.fail(f"{exc.file}: {exc.problem}", [*path, key]) from None

    def listener(
        self, item: Any, path: FieldPath, interfaces: dict[str, Interface], certificates: dict[str, Certificate]
    ) -> Listener:
        kind = ListenerType(item["type"])
        if item["interface"] not in interfaces:
            known = ", ".join(interfaces)
            raise self.fail(f"unknown interface {excerpt(item['interface'])} (known: {known})", [*path, "interface"])
        certificate = item.get("certificate")
        if certificate == DEMO and DEMO not in certificates:
            certificate = None
        elif certificate is not None and certificate not in certificates:
            known = ", ".join([DEMO, *(c for c in certificates if c != DEMO)])
            raise self.fail(f"unknown certificate {excerpt(certificate)} (known: {known})", [*path, "certificate"])
        if "rat" in item and kind is ListenerType.PRIVATE:
            raise self.fail(
                "a private listener has no Recipient Access Table (rat is for public listeners)", [*path, "rat"]
            )
        rat = tuple(self.rat_entry(entry, [*path, "rat", i]) for i, entry in enumerate(item.get("rat", [])))
        tls = item.get("tls") or {}
        if tls:
            self.check_tls(tls, [*path, "tls"])
        if item.get("default_domain"):
            self.hostname(item["default_domain"], [*path, "default_domain"])
        hat, policies, defaults = self.hat(item.get("hat") or {}, kind, [*path, "hat"])
        return Listener(
            name=item["name"],
            type=kind,
            interface=item["interface"],
            port=item.get("port", 25),
            default_domain=item.get("default_domain", ""),
            max_concurrency=item.get("max_concurrency", 1000),
            tcp_queue=item.get("tcp_queue", 50),
            domain_map=item.get("domain_map", False),
            certificate=certificate,
            rat=rat,
            hat=hat,
            policies=policies,
            defaults=defaults,
            tls=TLSSettings(tls.get("min_version", "1.2"), tls.get("max_version"), tls.get("ciphers")),
            timeouts=self.timeouts(item, path),
        )

    def timeouts(self, item: Any, path: FieldPath) -> Timeouts:
        """``timeouts``; the older ``idle_timeout`` is ``timeouts.idle``. NaN passes the schema's bounds."""
        given = {key: (value, [*path, "timeouts", key]) for key, value in (item.get("timeouts") or {}).items()}
        if "idle_timeout" in item:
            if "idle" in given:
                problem = "idle_timeout and timeouts.idle are the same setting: give one"
                raise self.fail(problem, [*path, "idle_timeout"])
            given["idle"] = (item["idle_timeout"], [*path, "idle_timeout"])
        timeouts = Timeouts(**{key: value for key, (value, _) in given.items()})
        for key, problem in timeouts.problems():
            raise self.fail(problem, given[key][1])
        return timeouts

    def check_tls(self, tls: Any, path: FieldPath) -> None:
        """Build the TLS context the listener will use, now: a bad cipher string or version window fails here."""
        from lab.tls.tlsctx import check_tls_settings  # pyOpenSSL is slow to import; only tls needs it

        try:
            check_tls_settings(tls.get("min_version", "1.2"), tls.get("max_version"), tls.get("ciphers"))
        except BadInput as exc:
            raise self.fail(exc.problem, [*path, exc.field or "ciphers"]) from None

    def rat_entry(self, entry: str, path: FieldPath) -> str:
        text = entry.strip()
        if text.upper() == "ALL":
            return "ALL"
        problem = hostname_problem(text[1:] if text.startswith(".") else text)
        if problem is None and "@" not in text:
            return text.lower()
        raise self.fail(f"{excerpt(entry)} is not a domain, .domain or ALL", path)

    def params(self, raw: Any, path: FieldPath) -> PolicyParams:
        values: dict[str, Any] = {}
        known = {f.name for f in fields(PolicyParams)}
        for key, value in raw.items():
            if key not in known:
                continue  # "behaviour"
            if key == "tls":
                value = TLSMode(value)
            elif key == "tls_mandatory_senders":
                value = tuple(v.strip().lower() for v in value)
            elif key == "max_message_size":
                try:
                    value = parse_size(value)
                except ValueError as exc:
                    raise self.fail(str(exc), [*path, key]) from None
            values[key] = value
        return PolicyParams(**values)

    def hat(
        self, raw: Any, kind: ListenerType, path: FieldPath
    ) -> tuple[HostAccessTable, dict[str, MailFlowPolicy], PolicyParams]:
        policies = dict(predefined_policies(kind))
        for name, item in (raw.get("policies") or {}).items():
            ppath = [*path, "policies", name]
            params = self.params(item, ppath)
            if name in policies:
                base = policies[name]
                behaviour = Behaviour(item["behaviour"]) if "behaviour" in item else base.behaviour
                policies[name] = MailFlowPolicy(name, behaviour, _merge(base.params, params))
            elif "behaviour" not in item:
                raise self.fail(f"policy {name!r} is not predefined, so it needs a behaviour", ppath)
            else:
                policies[name] = MailFlowPolicy(name, Behaviour(item["behaviour"]), params)
        defaults = self.params(raw.get("defaults") or {}, [*path, "defaults"])
        groups = self.groups(raw.get("sender_groups"), kind, policies, path)
        return HostAccessTable(tuple(groups)), policies, defaults

    def groups(
        self, raw: list[Any] | None, kind: ListenerType, policies: dict[str, MailFlowPolicy], path: FieldPath
    ) -> list[SenderGroup]:
        predefined = dict(predefined_groups(kind))
        seen: dict[str, int] = {}
        groups: list[SenderGroup] = []
        for index, item in enumerate(raw or []):
            gpath = [*path, "sender_groups", index]
            name = "ALL" if item["name"].upper() == "ALL" else item["name"]
            if name in seen:
                raise self.fail(
                    f"duplicate sender group {excerpt(name)} (also sender_groups[{seen[name]}])", [*gpath, "name"]
                )
            seen[name] = index
            if name == "ALL" and index != len(raw or []) - 1:
                raise self.fail("the ALL group must be the last sender group", [*gpath, "name"])
            policy = item.get("policy", predefined.get(name))
            if policy is None:
                raise self.fail(f"sender group {name!r} is not predefined, so it needs a policy", gpath)
            if policy not in policies:
                known = ", ".join(sorted(policies))
                raise self.fail(f"unknown policy {policy!r} (known: {known})", [*gpath, "policy"])
            members = list(item.get("members", ["ALL"] if name == "ALL" else []))
            if name == "ALL" and [m.strip().upper() for m in members] != ["ALL"]:
                raise self.fail("the ALL group matches every host; its only member is ALL", [*gpath, "members"])
            for m, member in enumerate(members):
                try:
                    parse_member(member)
                except MemberSyntaxError as exc:
                    raise self.fail(f"bad member {excerpt(exc.text)}: {exc.why}", [*gpath, "members", m]) from None
            groups.append(SenderGroup.of(name, members, policy))
        for name, policy in predefined.items():  # predefined groups the file left out keep their place before ALL
            if name not in seen and name != "ALL":
                groups.insert(
                    len(groups) - (1 if groups and groups[-1].name == "ALL" else 0),
                    SenderGroup.of(name, [], policy),
                )
        if not groups or groups[-1].name != "ALL":
            groups.append(SenderGroup.of("ALL", ["ALL"], predefined["ALL"]))
        return groups


def _fields_of(profile: BounceProfile) -> dict[str, Any]:
    return {f.name: getattr(profile, f.name) for f in fields(BounceProfile) if f.name != "name"}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _merge(base: PolicyParams, override: PolicyParams) -> PolicyParams:
    """``override``'s set fields over ``base``'s (a user entry for a predefined policy changes only what it names)."""
    values = {f.name: getattr(base, f.name) for f in fields(PolicyParams)}
    values.update(
        {f.name: getattr(override, f.name) for f in fields(PolicyParams) if getattr(override, f.name) is not None}
    )
    return PolicyParams(**values)


# --- a one-listener appliance for tests and ``smtplab serve`` -----------------------------------------------


def quick_appliance(
    address: str, port: int, tls: TLSMode, verify_client: bool = False, certificate: Certificate | None = None
) -> Appliance:
    """One public listener "Inboundmail" on "PublicNet" at ``address``: predefined HAT, ALL -> ``tls``, RAT ALL."""
    ip = ipaddress.ip_address(address)
    interface = Interface("PublicNet", str(ip), 24 if ip.version == 4 else 64)
    params = PolicyParams(tls=tls, verify_client=verify_client)
    policies = dict(predefined_policies(ListenerType.PUBLIC))
    groups = [
        SenderGroup.of(name, ["ALL"] if name == "ALL" else [], pol)
        for name, pol in predefined_groups(ListenerType.PUBLIC)
    ]
    all_policy = groups[-1].policy
    policies[all_policy] = MailFlowPolicy(
        all_policy, policies[all_policy].behaviour, _merge(policies[all_policy].params, params)
    )
    certificates: dict[str, Certificate] = {}
    cert_name: str | None = None
    if certificate is not None and not (certificate.kind == "demo" and certificate.name == DEMO):
        certificates[certificate.name] = certificate
        cert_name = certificate.name
    listener = Listener(
        name="Inboundmail",
        type=ListenerType.PUBLIC,
        interface=interface.name,
        port=port,
        certificate=cert_name,
        rat=("ALL",),
        hat=HostAccessTable(tuple(groups)),
        policies=policies,
        defaults=params,
    )
    return Appliance("esa.lab.example", {interface.name: interface}, certificates, (listener,))


# --- what an operator reads -----------------------------------------------------------------------------------


def _tls_label(mode: TLSMode, verify: bool) -> str:
    return mode.value.capitalize() + (" (verify client certificate)" if verify else "")


def certificate_label(appliance: Appliance, listener: Listener) -> str:
    """The certificate's name, flagged when it is the insecure demo certificate."""
    if listener.certificate is None:
        return DEMO_LABEL
    cert = appliance.certificates.get(listener.certificate)
    if cert is not None and cert.kind == "demo":
        return f"{cert.name} (INSECURE built-in demo certificate)"
    return listener.certificate


def listener_summary(appliance: Appliance, listener: Listener) -> str:
    """The listener as the appliance prints it (docs/rules.md §1), plus the certificate it presents."""
    interface = appliance.interfaces[listener.interface]
    domain = f" {listener.default_domain}" if listener.default_domain else ""
    lines = [
        f"Name: {listener.name}",
        f"Type: {listener.type.value.capitalize()}",
        f"Interface: {interface.label()} TCP Port {listener.port}",
        "Protocol: SMTP",
        f"Default Domain:{domain}",
        f"Max Concurrency: {listener.max_concurrency} (TCP Queue: {listener.tcp_queue})",
        f"Domain map: {'enabled' if listener.domain_map else 'disabled'}",
        f"TLS: {_tls_label(listener.tls_summary(), False)}",
        f"Certificate: {certificate_label(appliance, listener)}",
    ]
    return "\n".join(lines)


def hat_summary(listener: Listener) -> str:
    """The HAT top to bottom: each group's members, its policy, the policy's behaviour and effective TLS."""
    header = ("Sender group", "Policy", "Behaviour", "TLS", "Members")
    rows = [header]
    for group in listener.hat.groups:
        policy = listener.policies[group.policy]
        effective = policy.effective(listener.defaults)
        members = ", ".join(m.text for m in group.members) or "(none)"
        rows.append(
            (
                group.name,
                policy.name,
                policy.behaviour.value.upper(),
                _tls_label(effective.tls, effective.verify_client),
                members,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [f"Host Access Table of {listener.name} (first match wins):"]
    for row in rows:
        lines.append(
            "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        )
    return "\n".join(line.rstrip() for line in lines)
