"""A throwaway Postfix instance (smtpd_tls_security_level none / may / encrypt) on one loopback address and port,
or (``netns``) on a topology address inside one of the lab's network namespaces (docs/netns.md).

The instance is independent of the system's Postfix: its own config directory, queue and data directories under
the work directory, its own log file (``maillog_file``). We run the master directly with ``-c DIR`` in the
foreground as our child (as root, Postfix needs no ``alternate_config_directories`` entry for that, and
``/etc/postfix/main.cf`` is never read or touched), so several instances can run side by side and the default
instance is never started. Mail for ``accept_domain`` goes to a Maildir under the work directory through the
virtual(8) agent; everything else is refused (``reject_unauth_destination``) and nothing is ever relayed
(``default_transport = error``).

With ``netns`` the master is started as ``ip netns exec NS master -c DIR -d`` (``ip netns exec`` execs it: the
PID we hold is the master's, the one in its pid file), binds the address there (port 25 too: the namespace's
ports are nobody else's), and is stopped as on loopback, by that PID.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from lab.errors import BadInput, HarnessError
from peers import (
    MAX_PROBES,
    POLL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Peer,
    check_loopback,
    check_searchable,
    child_pids,
    pid_running,
    process_group,
    tail,
    wait_gone,
    write_file,
)

TLSLevel = Literal["none", "may", "encrypt"]
TLS_LEVELS: tuple[str, ...] = get_args(TLSLevel)

MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
DELIVERY_USER = "nobody"  # owns the Maildir; virtual(8) never delivers as root
MIN_VERSION = (3, 4)  # maillog_file appeared in Postfix 3.4
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")

# Every service the instance needs, none chrooted (the queue is not laid out for a chroot). The smtpd line is
# prepended with the peer's own address:port.
_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.access(p, os.X_OK)), None)


def unavailable_reason() -> str | None:
    """Why a Postfix peer cannot run here (missing binaries, not root, too old), or None when it can."""
    postfix, postconf = _tool("postfix"), _tool("postconf")
    if not postfix or not postconf:
        return "postfix/postconf not found (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a Postfix master must be started as root"
    for user in (MAIL_OWNER, DELIVERY_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"user {user!r} does not exist"
    try:
        grp.getgrnam(SETGID_GROUP)
    except KeyError:
        return f"group {SETGID_GROUP!r} does not exist"
    version = postfix_version()
    if version is None:
        return "cannot read mail_version from postconf"
    if version < MIN_VERSION:
        return f"Postfix {'.'.join(map(str, version))} is older than 3.4 (no maillog_file)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def postfix_version() -> tuple[int, ...] | None:
    """The installed Postfix version from ``postconf -d`` (compiled-in defaults; needs no main.cf)."""
    postconf = _tool("postconf")
    if not postconf:
        return None
    try:
        out = subprocess.run(
            [postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def _check_name(value: str, field: str) -> str:
    if not _NAME.match(value) or len(value) > 253:
        raise BadInput(f"{value!r} is not a usable host or domain name", field=field)
    return value


class PostfixPeer(Peer):
    """One Postfix instance with ``smtpd_tls_security_level = tls_level`` on ``address:port``."""

    kind = "postfix"

    def __init__(
        self,
        workdir: Path,
        address: str = "127.0.0.25",
        port: int | None = None,
        tls_level: TLSLevel = "may",
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        *,
        hostname: str = "postfix.peer.test",
        accept_domain: str = "example.com",
        verify_client: bool = False,
        client_ca_pem: bytes | None = None,
        relay_for_mynetworks: bool = False,
        tls_mandatory_senders: Sequence[str] = (),
        blocked_clients: Sequence[str] = (),
        start_timeout: float = START_TIMEOUT,
        netns: str | None = None,
    ) -> None:
        # In a namespace the address is the topology's and any port is free; on loopback, Peer's checks.
        super().__init__(workdir, "127.0.0.1" if netns else address, 2525 if netns else port, start_timeout)
        if netns is not None:
            self.address, self.port = _check_netns_address(address, netns), 25 if port is None else port
        self.netns = netns
        if tls_level not in TLS_LEVELS:
            raise BadInput(f"{tls_level!r} is not one of {', '.join(TLS_LEVELS)}", field="tls_level")
        if (cert_pem is None) != (key_pem is None):
            raise BadInput("give both cert_pem and key_pem, or neither", field="cert_pem")
        if tls_level != "none" and cert_pem is None:
            raise BadInput(f"tls_level {tls_level} needs a certificate (cert_pem, key_pem)", field="cert_pem")
        if verify_client and client_ca_pem is None:
            raise BadInput(
                "verify_client needs client_ca_pem, the CA that signs client certificates", field="client_ca_pem"
            )
        if verify_client and tls_level == "none":
            raise BadInput("verify_client needs TLS (tls_level may or encrypt)", field="verify_client")
        self.tls_level: TLSLevel = tls_level
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self.hostname = _check_name(hostname, "hostname")
        self.accept_domain = _check_name(accept_domain, "accept_domain")
        self.verify_client = verify_client
        self.client_ca_pem = client_ca_pem
        self.relay_for_mynetworks = relay_for_mynetworks
        for sender in tls_mandatory_senders:
            if not re.fullmatch(r"[^@\s=,{}]+@[^@\s=,{}]+", sender):
                raise BadInput(f"{sender!r} is not a mail address", field="tls_mandatory_senders")
        self.tls_mandatory_senders = tuple(tls_mandatory_senders)
        check = check_loopback if netns is None else (lambda a, field: _check_netns_address(a, netns))
        self.blocked_clients = tuple(check(a, "blocked_clients") for a in blocked_clients)
        self._children: list[int] = []

    # -- layout -------------------------------------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.workdir / "conf"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "queue"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def maillog_path(self) -> Path:
        """Postfix's own log (``maillog_file``): every daemon of this instance writes here, and only here."""
        return self.workdir / "maillog"

    @property
    def master_log_path(self) -> Path:
        """The master's stdout/stderr (normally empty; fatal start-up errors land here)."""
        return self.workdir / "master.out"

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- configuration ------------------------------------------------------------------------------------------

    def main_cf(self) -> str:
        """The instance's main.cf: isolated directories, loopback only, deliver locally or refuse, never relay."""
        conf, mail_uid, mail_gid = self.config_dir, *_delivery_ids()
        mydomain = self.hostname.partition(".")[2] or self.hostname
        relay_rule = "reject_unauth_destination"
        if self.relay_for_mynetworks:
            relay_rule = "permit_mynetworks, defer_unauth_destination"
        lines = [
            "# Written by smtplab (peers.postfix): a throwaway Postfix peer for interop tests.",
            "compatibility_level = 3.6",
            f"config_directory = {conf}",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            f"mail_owner = {MAIL_OWNER}",
            f"setgid_group = {SETGID_GROUP}",
            f"myhostname = {self.hostname}",
            f"mydomain = {mydomain}",
            "myorigin = $myhostname",
            "mydestination =",
            "# smtpd binds the address in master.cf; inet_interfaces only has to name a local address.",
            f"inet_interfaces = {self.address if self.netns else '127.0.0.1'}",
            "inet_protocols = ipv4",
            # relay_for_mynetworks: Debian's stock mynetworks and relay rule, so loopback clients may relay (the
            # relay transport still refuses to deliver anywhere: the mail bounces, it never leaves the machine).
            f"mynetworks = {'127.0.0.0/8' if self.relay_for_mynetworks else '127.0.0.1/32'}",
            "relayhost =",
            "relay_domains =",
            "default_transport = error:5.7.1 this smtplab peer relays nothing",
            "relay_transport = error:5.7.1 this smtplab peer relays nothing",
            "local_transport = error:5.7.1 this smtplab peer has no local users",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "notify_classes =",
            "biff = no",
            "append_dot_mydomain = no",
            "smtpd_peername_lookup = no",
            f"smtpd_relay_restrictions = {relay_rule}",
            "smtpd_recipient_restrictions =",
            f"smtpd_banner = $myhostname ESMTP Postfix (smtplab peer, smtpd_tls_security_level={self.tls_level})",
            f"virtual_mailbox_domains = {self.accept_domain}",
            f"virtual_mailbox_base = {self.workdir}",
            "virtual_mailbox_maps = static:Maildir/",
            f"virtual_uid_maps = static:{mail_uid}",
            f"virtual_gid_maps = static:{mail_gid}",
            "virtual_minimum_uid = 1",
            f"maillog_file = {self.maillog_path}",
            f"maillog_file_prefixes = {self.workdir}",
            f"smtpd_tls_security_level = {self.tls_level}",
            "smtpd_tls_loglevel = 1",
            "smtpd_tls_received_header = yes",
            "smtp_tls_security_level = none",
        ]
        if self.cert_pem is not None:
            lines += [f"smtpd_tls_cert_file = {conf / 'cert.pem'}", f"smtpd_tls_key_file = {conf / 'key.pem'}"]
        if self.verify_client:
            lines += ["smtpd_tls_ask_ccert = yes", f"smtpd_tls_CAfile = {conf / 'client-ca.pem'}"]
            if self.tls_level == "encrypt":
                lines.append("smtpd_tls_req_ccert = yes")
        if self.blocked_clients or self.tls_mandatory_senders:
            # Restrictions act at the command they are about (the client at connect: a 554 greeting), as the
            # appliance's HAT and mail flow policies do, not all deferred to RCPT.
            lines.append("smtpd_delay_reject = no")
        if self.blocked_clients:
            table = ", ".join(f"{address}=REJECT" for address in self.blocked_clients)
            lines.append(f"smtpd_client_restrictions = check_client_access inline:{{{table}}}")
        if self.tls_mandatory_senders:
            # TLS-mandatory senders (ESA: Preferred with a list of senders for whom TLS is mandatory).
            table = ", ".join(f"{sender}=smtplab_tls_only" for sender in self.tls_mandatory_senders)
            lines += [
                "smtpd_restriction_classes = smtplab_tls_only",
                "smtplab_tls_only = reject_plaintext_session",
                f"smtpd_sender_restrictions = check_sender_access inline:{{{table}}}",
            ]
        return "\n".join(lines) + "\n"

    def master_cf(self) -> str:
        return f"{self.address}:{self.port} inet n - n - - smtpd\n{_SERVICES}"

    def write_config(self) -> Path:
        """Create the instance's directories and write main.cf, master.cf and the TLS files; returns config_dir."""
        owner = pwd.getpwnam(MAIL_OWNER)
        mail_uid, mail_gid = _delivery_ids()
        for path in (self.workdir, self.config_dir, self.queue_dir):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        check_searchable(self.workdir)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        for sub in ("", "tmp", "new", "cur"):
            box = self.maildir / sub
            box.mkdir(mode=0o700, exist_ok=True)
            os.chown(box, mail_uid, mail_gid)
        if self.cert_pem is not None and self.key_pem is not None:
            write_file(self.config_dir / "cert.pem", self.cert_pem, 0o644)
            write_file(self.config_dir / "key.pem", self.key_pem, 0o600)  # smtpd reads it as root, before dropping
        if self.client_ca_pem is not None:
            write_file(self.config_dir / "client-ca.pem", self.client_ca_pem, 0o644)
        past = time.time() - 5  # Postfix re-reads a main.cf younger than a couple of seconds until it settles
        for name, text in (("main.cf", self.main_cf()), ("master.cf", self.master_cf())):
            write_file(self.config_dir / name, text.encode(), 0o644)
            os.utime(self.config_dir / name, (past, past))
        return self.config_dir

    def check(self) -> None:
        """``postfix -c DIR check``: validates the configuration and creates the queue directories as Postfix wants."""
        result = self._postfix("check", timeout=60)
        if result.returncode != 0:
            raise HarnessError(
                f"postfix -c {self.config_dir} check failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"{tail(self.maillog_path)}"
            )

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start the master (our child, its own process group) and wait for the 220."""
        if self.running:
            return
        reason = unavailable_reason()
        if reason:
            raise HarnessError(f"cannot start a Postfix peer: {reason}")
        self.write_config()
        self.check()
        master = Path(self._postconf("daemon_directory")) / "master"
        # -d: stay in the foreground as our child, so we hold its PID and reap it; -c: this instance only.
        self._spawn(self._inside([str(master), "-c", str(self.config_dir), "-d"]), self.master_log_path, _clean_env())
        self._await_banner([self.master_log_path, self.maillog_path])

    def _inside(self, argv: list[str]) -> list[str]:
        """``argv`` run in this peer's namespace (``ip netns exec`` execs it: the PID stays the command's)."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _await_banner(self, logs: Sequence[Path]) -> None:
        if self.netns is None:
            super()._await_banner(logs)
            return
        from lab.net import netns

        with netns.inside(self.netns):  # the probe's socket in the namespace, where the address is
            super()._await_banner(logs)

    @property
    def master_pid_file(self) -> Path:
        """Where the master writes its PID (``$queue_directory/pid/master.pid``)."""
        return self.queue_dir / "pid" / "master.pid"

    def pids(self) -> list[int]:
        """The master's PID followed by the daemons it runs now (smtpd, qmgr, ...)."""
        pid = self.pid
        return [] if pid is None else [pid, *child_pids(pid)]

    def stop(self) -> None:
        """``postfix -c DIR stop``, then end the master we started if it is still there, then any daemon it left.

        Only PIDs this peer started (the master) or that the master spawned (its children, in its process group)
        are ever signalled.
        """
        proc = self._proc
        if proc is None:
            return
        master = proc.pid
        children = child_pids(master) if proc.poll() is None else []
        if proc.poll() is None:
            self._postfix("stop", timeout=STOP_TIMEOUT + 5)
        self._reap()  # SIGTERM, then SIGKILL, the master if `postfix stop` did not end it
        left = wait_gone(children, timeout=STOP_TIMEOUT)
        for pid in left:
            if process_group(pid) == master:  # still one of ours (the master leads the group)
                os.kill(pid, signal.SIGKILL)
        left = wait_gone(left, timeout=STOP_TIMEOUT)
        if left or pid_running(master):
            raise HarnessError(f"Postfix peer {self.address}:{self.port} left processes running: {left or [master]}")

    # -- helpers ------------------------------------------------------------------------------------------------

    def _postfix(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        postfix = _tool("postfix")
        if postfix is None:
            raise HarnessError("postfix not found")
        try:
            return subprocess.run(
                self._inside([postfix, "-c", str(self.config_dir), command]),
                capture_output=True, text=True, timeout=timeout, env=_clean_env(), check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"postfix -c {self.config_dir} {command} took longer than {timeout:g} s") from exc

    def _postconf(self, parameter: str) -> str:
        postconf = _tool("postconf")
        if postconf is None:
            raise HarnessError("postconf not found")
        result = subprocess.run(
            [postconf, "-c", str(self.config_dir), "-h", parameter],
            capture_output=True, text=True, timeout=30, env=_clean_env(), check=False,
        )  # fmt: skip
        if result.returncode != 0 or not result.stdout.strip():
            raise HarnessError(f"postconf -c {self.config_dir} -h {parameter} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def wait_for_log(self, text: str, timeout: float = 10.0) -> bool:
        """Wait (bounded) until ``text`` appears in the maillog; Postfix logs through postlogd, asynchronously."""
        deadline = time.monotonic() + timeout
        for _ in range(MAX_PROBES):
            if text in self.maillog():
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(POLL)
        return False


def _check_netns_address(address: str, namespace: str) -> str:
    """An IPv4 address, in one of the lab's own namespaces (``smtplab-...``: never anybody else's)."""
    from lab.net.netns import PREFIX

    if not namespace.startswith(PREFIX):
        raise BadInput(f"{namespace!r} is not one of the lab's namespaces ({PREFIX}...)", field="netns")
    try:
        if ipaddress.ip_address(address).version == 4:
            return address
    except ValueError:
        pass
    raise BadInput(f"{address!r} is not an IPv4 address", field="address")


def _delivery_ids() -> tuple[int, int]:
    user = pwd.getpwnam(DELIVERY_USER)
    return user.pw_uid, user.pw_gid


def _clean_env() -> dict[str, str]:
    """The caller's environment minus Postfix's own variables (MAIL_CONFIG would point at another instance)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env
