"""The topology as Linux network namespaces joined by veth links (docs/netns.md).

Every host of the topology is a namespace ``smtplab-<pid>-<host>`` holding the host's own addresses (IPv4 on
its ``lo`` as /32, IPv6 on each of its links as /128) and one veth end per link; a link is a veth pair created
directly inside the two namespaces (never an address, route or sysctl in the root namespace). Each host gets a
route to every host it can reach: straight over the link to a neighbour, or via the next hop when every host
in between has role ``firewall``; only a firewall forwards (``ip_forward=1`` inside its own namespace).

A kept set (``smtplab netns up``) is named ``smtplab-kept-<host>`` instead: no process owns it, it stays until
``smtplab netns down``, and a run against a real MTA started inside it (``ip netns exec smtplab-kept-esa ...``)
uses it instead of making its own (``attach_kept``).

``<pid>`` is the process that made the set: it removes the set when it ends (``release``, ``atexit``, a
``multiprocessing`` finaliser in a ``-j`` worker, SIGTERM), and every new set first removes the sets whose
process is gone (``sweep``), so a run killed with ``kill -9`` leaves nothing behind after the next one.

A socket belongs to the namespace it was created in: ``inside(ns)`` switches the calling thread into a
namespace (``setns(2)``, through libc: Python 3.11 has no ``os.setns``) for as long as the caller creates a
socket, then back home.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.errors import HarnessError
from lab.net.topology import Host, Topology

PREFIX = "smtplab-"  # every namespace the lab makes is named smtplab-<pid>-<host>
NETNS_DIR = Path("/run/netns")  # where ``ip netns add`` pins a namespace
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
USERNS_ENV = "SMTPLAB_NETNS_USERNS"
FORWARDER = "firewall"  # the role whose namespace forwards between its links
INTERCEPT_TABLE = 100  # a forwarder's routing table that delivers everything locally (docs/netns.md)
IP_TIMEOUT = 30.0  # seconds one ``ip`` batch may take
KEPT = "kept"  # the owner part of a kept set's names: smtplab-kept-<host>
_OWNED = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def namespace_name(pid: int | str, host: str) -> str:
    """``smtplab-<pid>-<host>``, or ``smtplab-kept-<host>`` (a namespace is a file name: other characters
    become ``_``)."""
    return f"{PREFIX}{pid}-{_NAME_CHARS.sub('_', host)}"[:200]


def veth_name(pid: int, link: int, end: str) -> str:
    """An interface name (at most 15 characters): ``sl<pid hex>l<link><a|b>``."""
    return f"sl{pid:x}l{link}{end}"[:15]


def require_netns() -> None:
    """Make sure this process may build and enter namespaces: as root, or else inside an unprivileged user
    namespace of its own (``enter_user_namespace``); where neither works, one clear line (``HarnessError``:
    exit 2). ``SMTPLAB_NETNS_USERNS=1`` takes the user-namespace way as root too (to try it)."""
    if shutil.which("ip") is None:
        raise HarnessError("the netns carrier needs the ip command (iproute2)")
    if os.geteuid() == 0 and os.environ.get(USERNS_ENV) != "1":
        return
    if _in_user_namespace or _user_namespace_of_our_own():
        return
    problem = enter_user_namespace()
    if problem is not None:
        raise HarnessError(
            f"the netns carrier needs root or unprivileged user namespaces ({problem}); "
            "run as root, or use --carrier loopback"
        )


def _user_namespace_of_our_own() -> bool:
    """Inside a user namespace already (a ``-j`` worker of a process that entered one): the initial one maps
    every uid to itself."""
    try:
        return Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def enter_user_namespace() -> str | None:
    """Move this process into a user namespace where it is root, with a mount namespace of its own, a private
    ``/run/netns`` (a tmpfs) and a network namespace of its own as home (``ip netns add`` switches back to its
    home, which must be one this user namespace owns): what ``unshare -rmn`` does, done in place so that the
    run, its ``ip`` commands and its ``-j`` workers all live there. The namespaces made then are this process's
    alone and end with it; the host's network stays out of reach. None, or why it could not be done."""
    global _in_user_namespace
    uid, gid = os.getuid(), os.getgid()
    libc = _lib()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWUSER): {os.strerror(ctypes.get_errno())}"
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    except OSError as exc:
        return f"cannot map the user: {exc.strerror}"
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"cannot make the mounts private: {os.strerror(ctypes.get_errno())}"
    target = NETNS_DIR if NETNS_DIR.is_dir() else NETNS_DIR.parent  # /run/netns, or /run where it does not exist
    if libc.mount(b"smtplab", str(target).encode(), b"tmpfs", 0, None) != 0:
        return f"cannot mount a private {target}: {os.strerror(ctypes.get_errno())}"
    NETNS_DIR.mkdir(exist_ok=True)
    _in_user_namespace = True
    return None


def ip_batch(commands: list[str], netns: str | None = None) -> None:
    """Run ``ip`` commands in one process (``ip -batch``), inside ``netns`` when given; ``HarnessError`` on failure."""
    if not commands:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    try:
        done = subprocess.run(
            argv, input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"ip -batch failed: {exc}") from None
    if done.returncode != 0:
        where = f" in {netns}" if netns else ""
        raise HarnessError(f"ip{where} failed: {' '.join(done.stderr.split())[:300]}")


def owned_namespaces() -> dict[str, int]:
    """Every namespace the lab made on this machine -> the process that made it."""
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except OSError:
        return {}
    return {name: int(m.group(1)) for name in names if (m := _OWNED.match(name))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Remove the namespaces (and with them their veths) of lab processes that no longer run; the names removed."""
    dead = sorted(name for name, pid in owned_namespaces().items() if not alive(pid))
    delete_namespaces(dead)
    return dead


def delete_namespaces(names: list[str]) -> None:
    """Delete these namespaces (their veth ends go with them, and so the peers' ends)."""
    if names:
        ip_batch([f"netns del {name}" for name in names])


# -- entering a namespace --------------------------------------------------------------------------------------

_libc: Any = None
_home: int | None = None
_lock = threading.Lock()
_in_user_namespace = False


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _setns(fd: int) -> None:
    if _lib().setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise HarnessError(f"setns failed: {os.strerror(errno)}")


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """The calling thread in ``netns`` for the block (sockets made there stay there), then back in its own."""
    global _home
    with _lock:
        if _home is None:
            _home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise HarnessError(f"no network namespace {netns}: {exc.strerror}") from None
        try:
            _setns(fd)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(_home)


# -- one set of namespaces for a topology ----------------------------------------------------------------------


@dataclass
class Port:
    """One end of a link: the interface ``dev`` in ``host``'s namespace, facing ``peer``."""

    host: str
    dev: str
    peer: str


@dataclass
class NamespaceSet:
    """The namespaces of one topology, made by this process; ``close`` removes them."""

    topology: Topology
    pid: int
    namespaces: dict[str, str] = field(default_factory=dict)  # host name -> namespace
    ports: dict[tuple[str, str], Port] = field(default_factory=dict)  # (host, neighbour) -> the host's end
    closed: bool = False
    kept: bool = False  # smtplab-kept-<host>: only ``remove_kept`` (smtplab netns down) removes it

    def namespace_of(self, ip: str) -> str:
        host = self.topology.host_by_address(ip)
        if host is None:
            raise HarnessError(f"{ip} is no host's address in the topology")
        return self.namespaces[host.name]

    def hops(self, src: str, dst: str) -> list[str] | None:
        """The path from host ``src`` to host ``dst`` when it is routed (every host in between forwards)."""
        hops = self.topology.path(src, dst)
        if hops is None or any(self.topology.host(h).role != FORWARDER for h in hops[1:-1]):
            return None
        return hops

    def interceptor(self, src_ip: str, dst_ip: str) -> tuple[str, Port, Port] | None:
        """Where a middlebox on the path from ``src_ip`` to ``dst_ip`` runs: the first forwarding host's
        namespace, with its end facing the client and its end facing the server; None without one."""
        src, dst = self.topology.host_by_address(src_ip), self.topology.host_by_address(dst_ip)
        hops = self.hops(src.name, dst.name) if src is not None and dst is not None else None
        if hops is None or len(hops) < 3:
            return None
        here = hops[1]
        return self.namespaces[here], self.ports[(here, hops[0])], self.ports[(here, hops[2])]

    def close(self) -> None:
        """Remove this set (only in the process that made it: a forked child does not own it)."""
        if self.closed or os.getpid() != self.pid or self.kept:
            return
        self.closed = True
        with contextlib.suppress(HarnessError):
            delete_namespaces([ns for ns in self.namespaces.values() if (NETNS_DIR / ns).exists()])


def build(topology: Topology, pid: int | None = None) -> NamespaceSet:
    """Make the namespaces, links, addresses and routes of ``topology``; on any failure remove what was made."""
    require_netns()
    sweep()
    made = _planned(topology, os.getpid() if pid is None else pid)
    try:
        _build(made)
    except BaseException:
        made.close()
        raise
    return made


def _planned(topology: Topology, pid: int, kept: bool = False) -> NamespaceSet:
    """The set's names: its namespaces and every link's two ends (nothing made yet)."""
    made = NamespaceSet(topology, pid, kept=kept)
    made.namespaces = {h.name: namespace_name(KEPT if kept else pid, h.name) for h in topology.hosts}
    for index, link in enumerate(topology.links):
        a, b = link.between
        made.ports[(a, b)] = Port(a, veth_name(pid, index, "a"), b)
        made.ports[(b, a)] = Port(b, veth_name(pid, index, "b"), a)
    return made


# -- the kept set: namespaces a real MTA is started in, before a run and after it --------------------------------


def kept_namespaces() -> list[str]:
    """The kept set's namespaces on this machine (``smtplab-kept-<host>``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{PREFIX}{KEPT}-"))
    except OSError:
        return []


def build_kept(topology: Topology) -> NamespaceSet:
    """``smtplab netns up``: make the kept set of ``topology``; HarnessError when one is already up."""
    require_netns()
    if os.geteuid() != 0 or os.environ.get(USERNS_ENV) == "1":
        raise HarnessError("a kept namespace set outlives the command that makes it: smtplab netns up needs root")
    if kept_namespaces():
        raise HarnessError("a kept namespace set is already up (smtplab netns down removes it)")
    made = _planned(topology, 0, kept=True)
    try:
        _build(made)
    except BaseException:
        remove_kept()
        raise
    return made


def attach_kept(topology: Topology) -> NamespaceSet:
    """The kept set of ``topology`` for a run (which neither makes nor removes it); HarnessError when a host has
    no kept namespace (no set up, or one made from another topology)."""
    made = _planned(topology, 0, kept=True)
    missing = [ns for ns in made.namespaces.values() if not (NETNS_DIR / ns).exists()]
    if missing:
        raise HarnessError(
            f"no kept namespace {missing[0]}: start one with smtplab netns up (with this run's --topology)"
        )
    return made


def processes_in(namespace: str) -> list[int]:
    """The PIDs of the processes inside ``namespace`` (``ip netns pids``)."""
    done = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def remove_kept() -> list[str]:
    """``smtplab netns down``: remove the kept set; HarnessError, removing nothing, while a process still runs in
    one of its namespaces (deleting the name would leave that namespace alive, unreachable by name)."""
    names = kept_namespaces()
    busy = {ns: pids for ns in names if (pids := processes_in(ns))}
    if busy:
        ns, pids = next(iter(busy.items()))
        raise HarnessError(
            f"{ns} still holds process(es) {', '.join(map(str, pids[:5]))}: stop them first (by PID), "
            "then smtplab netns down"
        )
    delete_namespaces(names)
    return names


def _build(made: NamespaceSet) -> None:
    topology = made.topology
    ip_batch([f"netns add {ns}" for ns in made.namespaces.values()])
    per_ns: dict[str, list[str]] = {h.name: ["link set lo up"] for h in topology.hosts}
    links: list[str] = []
    for link in topology.links:
        a, b = link.between
        dev_a, dev_b = made.ports[(a, b)].dev, made.ports[(b, a)].dev
        ns_a, ns_b = made.namespaces[a], made.namespaces[b]
        links.append(f"link add {dev_a} netns {ns_a} type veth peer name {dev_b} netns {ns_b}")
        per_ns[a] += [f"link set {dev_a} alias {_alias(b)}", f"link set {dev_a} up"]
        per_ns[b] += [f"link set {dev_b} alias {_alias(a)}", f"link set {dev_b} up"]
    ip_batch(links)
    for host in topology.hosts:
        per_ns[host.name] += _addresses(made, host)
        per_ns[host.name] += _routes(made, host)
        if host.role == FORWARDER:  # what an intercept rule sends here is delivered to this host's sockets
            per_ns[host.name] += [f"route add local 0.0.0.0/0 dev lo table {INTERCEPT_TABLE}"]
            per_ns[host.name] += [f"route add local ::/0 dev lo table {INTERCEPT_TABLE}"]
    for host in topology.hosts:
        ip_batch(per_ns[host.name], made.namespaces[host.name])
    for host in topology.hosts:
        if host.role == FORWARDER:
            _forward(made.namespaces[host.name])


def _addresses(made: NamespaceSet, host: Host) -> list[str]:
    """An IPv4 address goes on ``lo`` (the kernel answers ARP for it on every link); an IPv6 one on each link
    (neighbour discovery answers only for an address of the link asked on), without duplicate detection."""
    devs = [port.dev for (name, _), port in made.ports.items() if name == host.name]
    out = []
    for address in host.addresses:
        if ipaddress.ip_address(address).version == 4 or not devs:
            out.append(f"addr add {address}/{_full(address)} dev lo")
        else:
            out += [f"addr add {address}/128 dev {dev} nodad" for dev in devs]
    return out


def _alias(peer: str) -> str:
    return "to-" + _NAME_CHARS.sub("_", peer)


def _full(address: str) -> int:
    return ipaddress.ip_address(address).max_prefixlen


def _routes(made: NamespaceSet, host: Host) -> list[str]:
    """A host route to every address this host reaches: over the link to a neighbour, via the next hop beyond."""
    topology = made.topology
    out: list[str] = []
    for other in topology.hosts:
        if other.name == host.name:
            continue
        hops = made.hops(host.name, other.name)
        if hops is None:
            continue
        port = made.ports[(host.name, hops[1])]
        gateway = topology.host(hops[1])
        for address in other.addresses:
            family = ipaddress.ip_address(address).version
            if other.name == gateway.name:
                out.append(f"route add {address}/{_full(address)} dev {port.dev}")
                continue
            via = _gateway_address(topology, gateway, host, family)
            if via is not None:
                out.append(f"route add {address}/{_full(address)} via {via} dev {port.dev} onlink")
    return out


def _gateway_address(topology: Topology, gateway: Host, host: Host, family: int) -> str | None:
    """The next hop's address as ``host`` knows it: one in a network ``host`` is on, else its first of the family."""
    mine = [n for n in topology.networks if any(n.contains(a) for a in host.addresses)]
    same = [a for a in gateway.addresses if ipaddress.ip_address(a).version == family]
    return next((a for a in same if any(n.contains(a) for n in mine)), same[0] if same else None)


def _forward(netns: str) -> None:
    """``ip_forward=1`` (and IPv6 forwarding) inside ``netns`` only: ``ip netns exec`` runs sysctl there."""
    for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        done = subprocess.run(
            ["ip", "netns", "exec", netns, "sysctl", "-qw", key],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise HarnessError(f"cannot turn forwarding on in {netns}: {' '.join(done.stderr.split())[:200]}")


# -- the one set of this process -------------------------------------------------------------------------------

_sets: dict[int, NamespaceSet] = {}  # id of the topology -> its set, in this process
_hooks_installed = False


def namespaces_for(topology: Topology, kept: bool = False) -> NamespaceSet:
    """This process's set for ``topology``, made on first use and removed when the process ends; with ``kept``,
    the kept set (``smtplab netns up``), neither made nor removed here."""
    if kept:
        return attach_kept(topology)
    found = _sets.get(id(topology))
    if found is not None and not found.closed and found.topology is topology:
        return found
    _install_hooks()
    made = build(topology)
    _sets[id(topology)] = made
    return made


def release() -> None:
    """Remove this process's sets and every set whose process is gone (a ``-j`` worker's, a killed run's)."""
    for made in list(_sets.values()):
        made.close()
    _sets.clear()
    with contextlib.suppress(HarnessError):
        sweep()


def _install_hooks() -> None:
    """Remove the sets however the process ends: normally, by SIGINT (KeyboardInterrupt unwinds to ``atexit``),
    by SIGTERM (made a SystemExit here), or as a ``-j`` worker (which leaves through multiprocessing's
    finalisers, not ``atexit``)."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(release)
    from multiprocessing import util

    util.Finalize(None, release, exitpriority=100)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
