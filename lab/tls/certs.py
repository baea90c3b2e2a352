"""Certificates the lab presents and trusts: a lab CA, host certificates it issues, the demo certificate, imports.

The lab CA lives on disk so that a trust anchor handed to an external client (swaks, Postfix) stays valid across
runs. Keys are EC P-256: issuing must be fast, because tests and scenarios issue several certificates.
Certificates follow the web PKI profile (SKI/AKI, critical basic constraints and key usage, SAN) so that the strict
verifier in ``cryptography.x509.verification`` accepts them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lab.errors import BadInput, HarnessError

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=397)
TLS_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
RENEW_BEFORE = dt.timedelta(days=30)  # reissue a cached certificate this long before it expires
BACKDATE = dt.timedelta(hours=1)  # tolerate small clock skew between the lab and an external peer


@dataclass(frozen=True)
class CertKey:
    """A certificate, its private key and optional intermediates, all PEM; what a TLS endpoint presents."""

    name: str
    cert_pem: bytes
    key_pem: bytes
    chain_pem: bytes = b""
    insecure_demo: bool = False

    @cached_property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @cached_property
    def private_key(self) -> PrivateKeyTypes:
        return serialization.load_pem_private_key(self.key_pem, password=None)

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_pem) if self.chain_pem.strip() else []

    @property
    def subject_cn(self) -> str | None:
        attrs = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else None

    @property
    def fingerprint_sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def hostnames(self) -> tuple[str, ...]:
        """The SAN names (DNS and IP, as text), in certificate order."""
        return _san_names(self.certificate)


def default_state_dir() -> Path:
    """Where the lab keeps its CA and issued certificates: ``$SMTPLAB_STATE`` or ``./.smtplab``."""
    return Path(os.environ.get("SMTPLAB_STATE") or ".smtplab")


class LabCA:
    """The lab's certificate authority, created on first use in ``state_dir/ca/`` and reused afterwards."""

    def __init__(self, state_dir: Path, *, _label: str = "", _common_name: str = "smtplab Lab CA") -> None:
        base = Path(state_dir) / _label if _label else Path(state_dir)
        self.ca_dir = base / "ca"
        self.certs_dir = base / "certs"
        self._common_name = _common_name
        self._cert, self._key = self._load_or_create()

    @classmethod
    def untrusted(cls, state_dir: Path) -> LabCA:
        """A second, separate CA (``state_dir/untrusted/``) whose certificates the lab CA does not vouch for."""
        return cls(state_dir, _label="untrusted", _common_name="smtplab Untrusted CA")

    @property
    def ca_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_path(self) -> Path:
        """The CA certificate on disk, for external tools (``swaks --tls-ca-path``, Postfix ``CAfile``)."""
        return self.ca_dir / "ca.pem"

    def issue(self, name: str, hostnames: Sequence[str], *, client: bool = False) -> CertKey:
        """A certificate for ``hostnames`` (the first is the CN), cached as ``certs/NAME.pem``/``.key``.

        The cached one is reused while its names, purpose and issuer match and it is not near expiry.
        """
        if not name or "/" in name or name.startswith("."):
            raise BadInput(f"unusable certificate name {name!r}", field="name")
        names = tuple(hostnames)
        if not names:
            raise BadInput(f"certificate {name!r} needs at least one host name", field="hostnames")
        cert_path, key_path = self.certs_dir / f"{name}.pem", self.certs_dir / f"{name}.key"
        cached = self._cached(cert_path, key_path, names, client)
        if cached is not None:
            return cached
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign_leaf(key, names, client)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key)
        _write_atomic(key_path, key_pem, 0o600)
        _write_atomic(cert_path, cert_pem, 0o644)
        return CertKey(name, cert_pem, key_pem)

    def _cached(self, cert_path: Path, key_path: Path, names: tuple[str, ...], client: bool) -> CertKey | None:
        try:
            cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (OSError, ValueError, TypeError):
            return None
        if _san_names(cert) != tuple(_canonical(n) for n in names) or cert.issuer != self._cert.subject:
            return None
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            return None
        try:
            cert.verify_directly_issued_by(self._cert)
        except Exception:  # InvalidSignature: signed by another CA of the same name
            return None
        wanted = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return None
        if wanted not in eku or cert.not_valid_after_utc - RENEW_BEFORE < _now():
            return None
        return CertKey(cert_path.stem, cert_pem, key_pem)

    def issue_expired(self, name: str, hostnames: Sequence[str]) -> CertKey:
        """A server certificate for ``hostnames`` from this CA whose validity ended a day ago (never cached: a
        receiver that must present a broken certificate, docs/rules.md §6)."""
        key = ec.generate_private_key(ec.SECP256R1())
        ended = _now() - dt.timedelta(days=1)
        cert = self._sign_leaf(key, tuple(hostnames), False, not_after=ended)
        return CertKey(name, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def _sign_leaf(
        self,
        key: ec.EllipticCurvePrivateKey,
        names: tuple[str, ...],
        client: bool,
        not_after: dt.datetime | None = None,
    ) -> x509.Certificate:
        now = _now() if not_after is None else not_after - LEAF_VALIDITY
        sans: list[x509.GeneralName] = []
        for raw in names:
            ip = _as_ip(raw)
            sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(_canonical(raw)))
        eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())

    def _load_or_create(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The CA on disk, or a new one; under a lock, since the cases of a run start in parallel processes on
        one state directory and none may read the key written and the certificate not yet."""
        with contextlib.suppress(OSError):  # a directory that cannot be made: writing the CA fails below
            self.ca_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.ca_dir / ".lock"):
            return self._load_or_create_locked()

    def _load_or_create_locked(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert_path, key_path = self.ca_dir / "ca.pem", self.ca_dir / "ca.key"
        if cert_path.exists() or key_path.exists():
            try:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise HarnessError(f"lab CA in {self.ca_dir} is unreadable ({exc}); remove the directory") from exc
            if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > _now():
                return cert, key
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "smtplab"),
                x509.NameAttribute(NameOID.COMMON_NAME, self._common_name),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a reader that sees ca.pem can rely on ca.key being complete.
        _write_atomic(key_path, _key_pem(key), 0o600)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert, key


def self_signed(name: str, hostnames: Sequence[str]) -> CertKey:
    """A server certificate for ``hostnames`` signed by its own key: no CA vouches for it (never cached)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:64])])
    now = _now()
    sans = [x509.DNSName(_canonical(n)) for n in hostnames]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(name, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def demo_certificate() -> CertKey:
    """The built-in demo certificate (package data): self-signed, shared by every install, hence insecure."""
    data = resources.files("lab.tls").joinpath("data")
    cert_pem = data.joinpath("demo-cert.pem").read_bytes()
    key_pem = data.joinpath("demo-key.pem").read_bytes()
    return CertKey("demo", cert_pem, key_pem, insecure_demo=True)


def load_pem(cert_path: str | Path, key_path: str | Path, name: str) -> CertKey:
    """Import a certificate (leaf first, then any intermediates) and its unencrypted private key."""
    cert_bytes = _read(cert_path)
    key_bytes = _read(key_path)
    try:
        certs = x509.load_pem_x509_certificates(cert_bytes)
    except ValueError as exc:
        raise BadInput(f"not a PEM certificate ({exc})", file=str(cert_path)) from exc
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"not an unencrypted PEM private key ({exc})", file=str(key_path)) from exc
    if not isinstance(key, TLS_KEY_TYPES):
        raise BadInput(f"a {type(key).__name__} cannot sign a TLS handshake (use RSA or EC)", file=str(key_path))
    leaf = certs[0]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise BadInput(f"private key does not match the certificate in {cert_path}", file=str(key_path))
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:])
    return CertKey(name, leaf.public_bytes(serialization.Encoding.PEM), _key_pem(key), chain)


MAX_PEM_BYTES = 1024 * 1024  # a certificate chain or key is a few KiB; /dev/zero is not one


def _read(path: str | Path) -> bytes:
    try:
        if Path(path).exists() and not Path(path).is_file():
            raise BadInput("not a regular file", file=str(path))
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise BadInput(f"cannot read: {exc.strerror or exc}", file=str(path)) from exc
    if len(data) > MAX_PEM_BYTES:
        raise BadInput(f"larger than {MAX_PEM_BYTES} bytes, too large for a PEM file", file=str(path))
    return data


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _as_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def _canonical(name: str) -> str:
    ip = _as_ip(name)
    return str(ip) if ip is not None else name.strip().rstrip(".").lower()


def _san_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out: list[str] = []
    for entry in san:
        if isinstance(entry, x509.DNSName):
            out.append(entry.value.lower())
        elif isinstance(entry, x509.IPAddress):
            out.append(str(entry.value))
    return tuple(out)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) against other processes. Where it cannot be created
    (a read-only state directory) there is no lock: nothing can be written there to race with."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so a concurrent reader never sees half a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
