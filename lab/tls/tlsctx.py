"""TLS connection creators for Twisted's ``startTLS``, built directly on pyOpenSSL.

Neither side lets certificate checks abort the handshake: the server accepts any client certificate and the
client any server certificate, and each records what it saw. The SMTP layer then decides (RFC 3207 4.1: a server
answers 554 after an unhappy handshake; a ``require-verify`` client quits), which is what the lab must observe.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509 import verification
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from lab.errors import BadInput, excerpt
from lab.policy.modes import ClientCert
from lab.tls.certs import CertKey, LabCA, default_state_dir

KeyLog = Callable[[bytes], None]

VERSIONS: dict[str, int] = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}
LEGACY = {"1.0", "1.1"}


@dataclass(frozen=True)
class TLSFacts:
    """What a completed handshake negotiated, as the mail log and the Received header print it."""

    version: str  # "TLSv1.3"
    cipher: str  # OpenSSL name, e.g. "TLS_AES_256_GCM_SHA384"
    bits: int
    peer_subject: str | None  # RFC 4514 subject of the peer's certificate, None if it sent none


def tls_facts(conn: SSL.Connection) -> TLSFacts:
    peer = conn.get_peer_certificate(as_cryptography=True)
    return TLSFacts(
        version=conn.get_protocol_version_name(),
        cipher=conn.get_cipher_name() or "",
        bits=conn.get_cipher_bits() or 0,
        peer_subject=peer.subject.rfc4514_string() if peer is not None else None,
    )


def tls_error_reason(error: BaseException) -> str:
    """A short reason for a failed handshake (``no shared cipher``, ``unsupported protocol``...) from an SSL.Error."""
    reasons: list[str] = []
    args = error.args[0] if error.args and isinstance(error.args[0], list) else []
    for entry in args:
        if isinstance(entry, tuple) and len(entry) == 3 and entry[2]:
            reasons.append(str(entry[2]))
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    return str(error) or type(error).__name__


def _version(value: str | None, field: str) -> int | None:
    if value is None:
        return None
    try:
        return VERSIONS[str(value)]
    except KeyError:
        raise BadInput(f"unknown TLS version {value!r} (use one of {', '.join(VERSIONS)})", field=field) from None


def _context(
    *,
    min_version: str | None,
    max_version: str | None,
    ciphers: str | None,
    keylog: KeyLog | None,
) -> SSL.Context:
    """A context with the version window and cipher list; legacy versions get ``@SECLEVEL=0`` so they can work.

    OpenSSL 3's default security level refuses TLS 1.0/1.1 outright; a server configured to accept them, or a
    client made to offer only them, must lower it explicitly, or the handshake never reaches the peer's policy.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    low, high = _version(min_version, "min_version"), _version(max_version, "max_version")
    if low is not None and high is not None and low > high:
        raise BadInput(f"min_version {min_version} is above max_version {max_version}", field="min_version")
    if low is not None:
        ctx.set_min_proto_version(low)
    else:
        ctx.set_min_proto_version(0)
    if high is not None:
        ctx.set_max_proto_version(high)
    legacy = (min_version in LEGACY) or (min_version is None and max_version in LEGACY)
    cipher_list = ciphers
    if legacy and (cipher_list is None or "@SECLEVEL" not in cipher_list.upper()):
        cipher_list = f"{cipher_list or 'DEFAULT'}:@SECLEVEL=0"
    if cipher_list is not None:
        try:
            ctx.set_cipher_list(cipher_list.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError) as exc:
            raise BadInput(f"no usable cipher in {excerpt(ciphers)} (an OpenSSL cipher list)", field="ciphers") from exc
    if keylog is not None:
        ctx.set_keylog_callback(lambda _conn, line: keylog(line))
    return ctx


def check_tls_settings(min_version: str | None, max_version: str | None, ciphers: str | None) -> None:
    """Build the context a listener with these settings would use; ``BadInput`` (with ``field``) if OpenSSL refuses.

    The appliance loader calls this so that a file ``smtplab listeners`` accepts is one ``smtplab serve`` can serve.
    """
    _context(min_version=min_version, max_version=max_version, ciphers=ciphers, keylog=None)


def _load_pems(pems: Sequence[bytes], field: str) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for pem in pems:
        try:
            certs.extend(x509.load_pem_x509_certificates(pem))
        except ValueError as exc:
            raise BadInput(f"not a PEM certificate ({exc})", field=field) from exc
    return certs


def _peer_chain(conn: SSL.Connection) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """The peer's leaf and the intermediates it sent (the server side's chain omits the leaf, the client's not)."""
    leaf = conn.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return None, []
    chain = conn.get_peer_cert_chain(as_cryptography=True) or []
    return leaf, [c for c in chain if c != leaf]


def _use_certkey(ctx: SSL.Context, certkey: CertKey) -> None:
    ctx.use_certificate(certkey.certificate)
    ctx.use_privatekey(certkey.private_key)  # type: ignore[arg-type]  # load_pem admits only TLS key types
    for extra in certkey.chain:
        ctx.add_extra_chain_cert(extra)
    ctx.check_privatekey()


def _accept_any(_conn: SSL.Connection, _cert: crypto.X509, _errno: int, _depth: int, _ok: int) -> bool:
    return True


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The listener's side: one shared context, one ``SSL.Connection`` per STARTTLS."""

    def __init__(
        self,
        certkey: CertKey,
        *,
        min_version: str | None = "1.2",
        max_version: str | None = None,
        ciphers: str | None = None,
        request_client_cert: bool = False,
        client_ca_pems: Sequence[bytes] = (),
        keylog: KeyLog | None = None,
    ) -> None:
        self.certkey = certkey
        self.request_client_cert = request_client_cert
        self._client_cas = _load_pems(client_ca_pems, "client_ca_pems")
        ctx = _context(min_version=min_version, max_version=max_version, ciphers=ciphers, keylog=keylog)
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.set_session_id(b"smtplab")  # needed once peer verification is on, harmless otherwise
        _use_certkey(ctx, certkey)
        if request_client_cert:
            ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
            for ca in self._client_cas:  # named in the CertificateRequest, so a client can pick a certificate
                ctx.add_client_ca(ca)
        self.context = ctx

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        return conn

    def client_cert_state(self, conn: SSL.Connection) -> ClientCert:
        """NONE (no certificate), VERIFIED (chains to ``client_ca_pems`` for clientAuth) or UNVERIFIED."""
        leaf, intermediates = _peer_chain(conn)
        if leaf is None:
            return ClientCert.NONE
        if not self._client_cas:
            return ClientCert.UNVERIFIED
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(self._client_cas))
            .time(dt.datetime.now(dt.UTC))
            .build_client_verifier()
        )
        try:
            verifier.verify(leaf, intermediates)
        except verification.VerificationError:
            return ClientCert.UNVERIFIED
        return ClientCert.VERIFIED


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """The scripted client's side. ``verify`` says whether this client *requires* a verified server certificate;
    the handshake never depends on it, the engine reads ``server_cert_verified`` and decides.
    """

    def __init__(
        self,
        *,
        server_name: str | None = None,
        verify: bool = False,
        trust_pems: Sequence[bytes] = (),
        min_version: str | None = None,
        max_version: str | None = None,
        ciphers: str | None = None,
        client_cert: CertKey | None = None,
        keylog: KeyLog | None = None,
    ) -> None:
        self.server_name = server_name
        self.verify = verify
        self.client_cert = client_cert
        self._trust = _load_pems(trust_pems, "trust_pems")
        ctx = _context(min_version=min_version, max_version=max_version, ciphers=ciphers, keylog=keylog)
        ctx.set_verify(SSL.VERIFY_PEER, _accept_any)  # look at the certificate, never abort on it
        if client_cert is not None:
            _use_certkey(ctx, client_cert)
        self.context = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        if self.server_name and _ip(self.server_name) is None:
            conn.set_tlsext_host_name(self.server_name.rstrip(".").encode("idna"))
        conn.set_connect_state()
        return conn

    def server_cert_verified(self, conn: SSL.Connection) -> bool:
        """True when the server's chain leads to a trust anchor and its certificate names ``server_name``.

        Without a ``server_name`` or trust anchors there is nothing to verify against, so the answer is False.
        """
        leaf, intermediates = _peer_chain(conn)
        if leaf is None or not self._trust or not self.server_name:
            return False
        ip = _ip(self.server_name)
        subject: verification.Subject = (
            x509.IPAddress(ip) if ip is not None else x509.DNSName(self.server_name.rstrip(".").lower())
        )
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(self._trust))
            .time(dt.datetime.now(dt.UTC))
            .build_server_verifier(subject)
        )
        try:
            verifier.verify(leaf, intermediates)
        except verification.VerificationError:
            return False
        return True


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


class TLSChoice(Protocol):
    """What a client step asks of its TLS side (``lab.smtp.steps.TLSOptions`` is one)."""

    @property
    def min_version(self) -> str | None: ...
    @property
    def max_version(self) -> str | None: ...
    @property
    def ciphers(self) -> str | None: ...
    @property
    def verify(self) -> bool: ...
    @property
    def server_name(self) -> str | None: ...
    @property
    def client_cert(self) -> str: ...


#: ``none`` / ``lab`` / ``untrusted`` -> the certificate a client presents for that choice (or None).
CertSource = Callable[[str], CertKey | None]


def no_client_cert(_kind: str) -> None:
    return None


class ClientCerts:
    """Client certificates by kind: ``lab`` is the one given (or issued by the lab CA in ``state_dir``),
    ``untrusted`` one issued by a CA nobody trusts (``state_dir/untrusted``); each made once, on first use."""

    def __init__(self, state_dir: Path | None, client_name: str, *, lab: CertKey | None = None, issue_lab: bool = True):
        self.state_dir, self.client_name = state_dir, client_name
        self._given, self._issue_lab = lab, issue_lab
        self._made: dict[str, CertKey | None] = {}

    def __call__(self, kind: str) -> CertKey | None:
        if kind == "none":
            return None
        if kind not in self._made:
            self._made[kind] = self._make(kind)
        return self._made[kind]

    def _make(self, kind: str) -> CertKey | None:
        if kind == "lab" and (self._given is not None or not self._issue_lab):
            return self._given
        where = self.state_dir or default_state_dir()
        ca = LabCA(where) if kind == "lab" else LabCA.untrusted(where)
        return ca.issue(f"client-{kind}-{self.client_name}", [self.client_name], client=True)


@implementer(IOpenSSLClientConnectionCreator)
class _Watched(ClientTLS):
    """A ``ClientTLS`` whose handshakes report a CertificateRequest (and its CA names) to ``seen``."""

    def __init__(self, seen: Callable[[list[str]], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen, self._told = seen, False
        self.context.set_info_callback(self._info)

    def _info(self, conn: SSL.Connection, _where: int, _ret: int) -> None:
        if not self._told and b"certificate request" in conn.get_state_string():
            self._told = True
            self._seen([_dn(name) for name in conn.get_client_ca_list()])


def _dn(name: Any) -> str:
    parts = name.get_components()
    return ",".join(f"{k.decode('ascii', 'replace')}={v.decode('utf-8', 'replace')}" for k, v in parts)


class ClientTLSFactory:
    """``TLSChoice -> ClientTLS``: the one client-side TLS factory (lab runs, external targets, the probe).

    A step's own ``server_name`` wins over the factory's; ``certs`` says which certificate each client-certificate
    choice presents. ``cache`` keeps one context per choice (the runner reuses them across runs; their key-log
    lines go where ``keylog`` says at the time). ``watch`` notes a CertificateRequest in ``cert_requested`` and
    ``ca_names`` (the probe's question: does the server ask for a client certificate?).
    """

    def __init__(
        self,
        *,
        server_name: str | None = None,
        trust_pems: Sequence[bytes] = (),
        certs: CertSource = no_client_cert,
        keylog: KeyLog | None = None,
        cache: bool = False,
        watch: bool = False,
    ) -> None:
        self.server_name, self.trust_pems = server_name, tuple(trust_pems)
        self.certs, self.keylog = certs, keylog
        self.watch = watch
        self.cert_requested = False
        self.ca_names: list[str] = []
        self._cache: dict[Hashable, ClientTLS] | None = {} if cache else None

    def __call__(self, options: TLSChoice) -> ClientTLS:
        if self._cache is None:
            return self._make(options)
        key: tuple[Hashable, ...] = (options.min_version, options.max_version, options.ciphers, options.verify)
        key += (options.server_name, options.client_cert)
        if key not in self._cache:
            self._cache[key] = self._make(options)
        return self._cache[key]

    def _make(self, options: TLSChoice) -> ClientTLS:
        settings: dict[str, Any] = {
            "server_name": options.server_name or self.server_name,
            "verify": options.verify,
            "trust_pems": self.trust_pems,
            "min_version": options.min_version,
            "max_version": options.max_version,
            "ciphers": options.ciphers,
            "client_cert": self.certs(options.client_cert),
            "keylog": self.keylog,
        }
        return _Watched(self._requested, **settings) if self.watch else ClientTLS(**settings)

    def _requested(self, ca_names: list[str]) -> None:
        if not self.cert_requested:
            self.cert_requested, self.ca_names = True, ca_names


def lab_client_tls(
    *,
    server_name: str | None = None,
    trust_pems: Sequence[bytes] = (),
    state_dir: Path | None = None,
    client_name: str = "client.example.net",
    keylog: KeyLog | None = None,
    cache: bool = False,
) -> ClientTLSFactory:
    """The lab client's factory: client certificates issued for ``client_name`` by the lab CA or an untrusted one."""
    certs = ClientCerts(state_dir, client_name)
    return ClientTLSFactory(server_name=server_name, trust_pems=trust_pems, certs=certs, keylog=keylog, cache=cache)
