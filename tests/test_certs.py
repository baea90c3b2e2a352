"""The lab CA, issued certificates, the demo certificate and PEM import."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from lab.errors import BadInput, HarnessError
from lab.tls.certs import CertKey, LabCA, default_state_dir, demo_certificate, load_pem


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def server_verifier(ca: LabCA, name: x509.GeneralName) -> verification.ServerVerifier:
    store = verification.Store([x509.load_pem_x509_certificate(ca.ca_pem)])
    return verification.PolicyBuilder().store(store).build_server_verifier(name)


def test_ca_is_created_once_with_private_key_file(tmp_path: Path) -> None:
    first = LabCA(tmp_path)
    assert (tmp_path / "ca" / "ca.pem").read_bytes() == first.ca_pem
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    again = LabCA(tmp_path)
    assert again.ca_pem == first.ca_pem
    ca_cert = x509.load_pem_x509_certificate(first.ca_pem)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_processes_that_create_the_ca_at_once_all_get_the_same_one(tmp_path: Path) -> None:
    """Cases run in parallel processes on a fresh state directory: none may read the CA half written."""
    make = "import sys; from lab.tls.certs import LabCA; sys.stdout.buffer.write(LabCA.untrusted(sys.argv[1]).ca_pem)"
    for round_ in range(3):
        state = tmp_path / str(round_)
        runs = [
            subprocess.Popen([sys.executable, "-c", make, str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(8)
        ]
        outputs = [run.communicate(timeout=60) for run in runs]
        assert all(run.returncode == 0 for run in runs), [err.decode()[-300:] for _out, err in outputs]
        assert len({out for out, _err in outputs}) == 1
        assert (state / "untrusted" / "ca" / "ca.pem").read_bytes() == outputs[0][0]


def test_unreadable_ca_is_a_harness_error(tmp_path: Path) -> None:
    LabCA(tmp_path)
    (tmp_path / "ca" / "ca.key").write_bytes(b"not a key")
    with pytest.raises(HarnessError, match="lab CA"):
        LabCA(tmp_path)


def test_server_certificate_names_purpose_and_cache(tmp_path: Path) -> None:
    ca = LabCA(tmp_path)
    ck = ca.issue("mx", ["MX.Lab.Example.", "127.0.0.5"])
    assert ck.subject_cn == "MX.Lab.Example."
    assert ck.hostnames == ("mx.lab.example", "127.0.0.5")
    eku = ck.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(ck.private_key, ec.EllipticCurvePrivateKey)
    assert (tmp_path / "certs" / "mx.pem").read_bytes() == ck.cert_pem
    assert mode(tmp_path / "certs" / "mx.key") == 0o600
    assert len(ck.fingerprint_sha256) == 64 and int(ck.fingerprint_sha256, 16) >= 0
    assert ck.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=300)
    server_verifier(ca, x509.DNSName("mx.lab.example")).verify(ck.certificate, [])
    server_verifier(ca, x509.IPAddress(ipaddress.ip_address("127.0.0.5"))).verify(ck.certificate, [])
    with pytest.raises(verification.VerificationError):
        server_verifier(ca, x509.DNSName("other.lab.example")).verify(ck.certificate, [])
    assert LabCA(tmp_path).issue("mx", ["mx.lab.example", "127.0.0.5"]) == ck  # cached, same key


def test_reissued_when_names_or_purpose_change(tmp_path: Path) -> None:
    ca = LabCA(tmp_path)
    first = ca.issue("mx", ["mx.lab.example"])
    renamed = ca.issue("mx", ["mx2.lab.example"])
    assert renamed.fingerprint_sha256 != first.fingerprint_sha256
    assert renamed.hostnames == ("mx2.lab.example",)
    as_client = ca.issue("mx", ["mx2.lab.example"], client=True)
    eku = as_client.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_reissued_when_the_ca_was_replaced(tmp_path: Path) -> None:
    old = LabCA(tmp_path).issue("mx", ["mx.lab.example"])
    shutil.rmtree(tmp_path / "ca")
    ca = LabCA(tmp_path)
    new = ca.issue("mx", ["mx.lab.example"])
    assert new.fingerprint_sha256 != old.fingerprint_sha256
    server_verifier(ca, x509.DNSName("mx.lab.example")).verify(new.certificate, [])


def test_untrusted_ca_is_separate(tmp_path: Path) -> None:
    ca, rogue = LabCA(tmp_path), LabCA.untrusted(tmp_path)
    assert rogue.ca_pem != ca.ca_pem
    forged = rogue.issue("mx", ["mx.lab.example"])
    assert forged.fingerprint_sha256 != ca.issue("mx", ["mx.lab.example"]).fingerprint_sha256
    with pytest.raises(verification.VerificationError):
        server_verifier(ca, x509.DNSName("mx.lab.example")).verify(forged.certificate, [])


def test_issue_rejects_unusable_requests(tmp_path: Path) -> None:
    ca = LabCA(tmp_path)
    with pytest.raises(BadInput, match="host name"):
        ca.issue("mx", [])
    with pytest.raises(BadInput, match="unusable"):
        ca.issue("../escape", ["mx.lab.example"])


def test_demo_certificate_is_flagged_and_self_signed() -> None:
    demo = demo_certificate()
    assert demo.insecure_demo
    assert "Demo" in (demo.subject_cn or "")
    assert demo.certificate.issuer == demo.certificate.subject
    demo.certificate.verify_directly_issued_by(demo.certificate)
    assert demo.not_after.year >= 2045
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert demo.private_key.public_key().public_bytes(serialization.Encoding.DER, pub) == (
        demo.certificate.public_key().public_bytes(serialization.Encoding.DER, pub)
    )


def test_load_pem_round_trip_with_chain(tmp_path: Path) -> None:
    ca = LabCA(tmp_path)
    issued = ca.issue("mx", ["mx.lab.example"])
    cert_file, key_file = tmp_path / "full.pem", tmp_path / "mx.key"
    cert_file.write_bytes(issued.cert_pem + ca.ca_pem)
    key_file.write_bytes(issued.key_pem)
    loaded = load_pem(cert_file, key_file, "imported")
    assert isinstance(loaded, CertKey) and loaded.name == "imported"
    assert loaded.fingerprint_sha256 == issued.fingerprint_sha256
    assert [c.subject for c in loaded.chain] == [x509.load_pem_x509_certificate(ca.ca_pem).subject]
    assert not loaded.insecure_demo


def test_load_pem_errors_name_the_file(tmp_path: Path) -> None:
    ca = LabCA(tmp_path)
    one, two = ca.issue("one", ["one.lab.example"]), ca.issue("two", ["two.lab.example"])
    (tmp_path / "one.pem").write_bytes(one.cert_pem)
    (tmp_path / "two.key").write_bytes(two.key_pem)
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    encrypted = one.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "enc.key").write_bytes(encrypted)

    with pytest.raises(BadInput) as err:
        load_pem(tmp_path / "missing.pem", tmp_path / "two.key", "x")
    assert err.value.file == str(tmp_path / "missing.pem") and "cannot read" in str(err.value)
    with pytest.raises(BadInput) as err:
        load_pem(tmp_path / "junk.pem", tmp_path / "two.key", "x")
    assert err.value.file == str(tmp_path / "junk.pem")
    with pytest.raises(BadInput, match="does not match") as err:
        load_pem(tmp_path / "one.pem", tmp_path / "two.key", "x")
    assert err.value.file == str(tmp_path / "two.key")
    with pytest.raises(BadInput, match="unencrypted") as err:
        load_pem(tmp_path / "one.pem", tmp_path / "enc.key", "x")
    assert err.value.file == str(tmp_path / "enc.key")
    x25519_key = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "x25519.key").write_bytes(x25519_key)
    with pytest.raises(BadInput, match="cannot sign") as err:
        load_pem(tmp_path / "one.pem", tmp_path / "x25519.key", "x")
    assert err.value.file == str(tmp_path / "x25519.key")


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMTPLAB_STATE", str(tmp_path / "state"))
    assert default_state_dir() == tmp_path / "state"
    monkeypatch.delenv("SMTPLAB_STATE")
    assert default_state_dir() == Path(".smtplab")
