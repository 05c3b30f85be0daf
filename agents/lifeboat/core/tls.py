"""A small CA for Lifeboat's links: CA and server certificates, and SSL contexts for both ends."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl

# cryptography is imported where certificates are made (lifeboat init, member-cert): the daemons
# only load PEM files through ssl, and importing x509 cost ~0.1 s of every agent start.

CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def create_ca(directory: str, name: str = "Lifeboat CA") -> tuple[str, str]:
    """Create ca.pem / ca.key (0600) in directory; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    ca_pem, ca_key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    _write(ca_key, _key_pem(key), 0o600)
    _write(ca_pem, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ca_pem, ca_key


def issue_server_cert(ca_pem: str, ca_key: str, directory: str, name: str, hosts: list[str],
                      common_name: str | None = None, client_auth: bool = False) -> tuple[str, str]:
    """Issue <name>.pem / <name>.key for the given DNS names and IP addresses. A group member's
    certificate (common_name = its machine name, client_auth) serves both ends of port 20004."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    with open(ca_pem, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(ca_key, "rb") as f:
        ca_priv = serialization.load_pem_private_key(f.read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH] + (
            [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])), critical=False)
        .sign(ca_priv, hashes.SHA256())
    )
    pem, keyp = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    _write(keyp, _key_pem(key), 0o600)
    _write(pem, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return pem, keyp


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def issue_member_cert(ca_pem: str, ca_key: str, directory: str, machine: str, hosts: list[str]) -> tuple[str, str]:
    """<machine>.pem / .key: a consistency-group member's identity (CN = machine name)."""
    return issue_server_cert(ca_pem, ca_key, directory, machine, hosts, common_name=machine, client_auth=True)


def mutual_server_context(cert: str, key: str, ca_pem: str) -> ssl.SSLContext:
    """Port 20004: a certificate the peer presents must be from our CA (else the handshake fails);
    a peer presenting none gets through the handshake only so that the listener can refuse it
    and count it (it checks peer_common_name before reading any frame)."""
    ctx = server_context(cert, key)
    ctx.load_verify_locations(ca_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def mutual_client_context(cert: str, key: str, ca_pem: str) -> ssl.SSLContext:
    ctx = client_context(ca_pem)
    ctx.load_cert_chain(cert, key)
    return ctx


def peer_common_name(ssl_object) -> str | None:
    """The CN of a verified peer certificate (ssl.SSLObject or SSLSocket)."""
    cert = ssl_object.getpeercert() if ssl_object else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
