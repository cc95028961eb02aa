"""Self-signed certificates for the control plane (behind ``dtrain-certs``).

One run makes a private CA, a server certificate whose subject alternative
names are the given hosts (IP addresses become IP SANs, everything else DNS
SANs) and one client certificate per client name, for mutual TLS. Keys are
ECDSA P-256 in unencrypted PKCS#8 PEM, written with mode 0600. Existing
files are never replaced unless ``overwrite=True``; the check covers every
file before the first one is written.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RESERVED = ("ca", "server")  # client names whose files would clash with the CA / server files
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SKEW = dt.timedelta(minutes=5)  # not-valid-before slack for clocks that run behind


class CertsError(ValueError):
    """Bad input (host or client name). The message is one line."""


@dataclass
class CertFiles:
    """Paths written by :func:`generate` (absolute)."""

    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    clients: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # name -> (cert, key)

    def all(self) -> List[str]:
        out = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        for cert, key in self.clients.values():
            out += [cert, key]
        return out


def client_stem(name: str) -> str:
    """``client`` -> ``client``; any other name -> the name itself (``<stem>.pem`` / ``<stem>.key``)."""
    return "client" if name == "client" else name


def plan(out_dir: str, clients: Sequence[str]) -> CertFiles:
    """The paths :func:`generate` would write; CertsError for unusable client names."""
    out = os.path.abspath(out_dir)
    seen = set()
    files = CertFiles(
        os.path.join(out, "ca.pem"),
        os.path.join(out, "ca.key"),
        os.path.join(out, "server.pem"),
        os.path.join(out, "server.key"),
    )
    for name in clients:
        name = str(name)
        if not _NAME.match(name):
            raise CertsError(
                f"clients: {name!r} is not a usable name: letters, digits, '.', '_', '-' "
                "(not starting with a punctuation mark)"
            )
        if name in RESERVED:
            raise CertsError(f"clients: {name!r} would clash with the {name}.pem / {name}.key files: pick another name")
        if name in seen:
            raise CertsError(f"clients: {name!r} is given twice")
        seen.add(name)
        stem = client_stem(name)
        files.clients[name] = (os.path.join(out, stem + ".pem"), os.path.join(out, stem + ".key"))
    return files


def san_entries(hosts: Sequence[str]) -> List[x509.GeneralName]:
    """Subject alternative names: IP addresses as IPAddress, other names as DNSName."""
    out: List[x509.GeneralName] = []
    for h in hosts:
        h = str(h).strip()
        if not h:
            raise CertsError("hosts: an empty host name is not allowed")
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
            continue
        except ValueError:
            pass
        if not re.match(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", h):
            raise CertsError(f"hosts: {h!r} is neither an IP address nor a DNS name")
        out.append(x509.DNSName(h))
    return out


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dtrain"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _builder(subject: x509.Name, issuer: x509.Name, key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_ca(days: int = 365, common_name: str = "dtrain CA") -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only."""
    key = _new_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    client: bool = False,
    days: int = 365,
) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate signed by the CA: a server one (SANs = hosts) or a client one."""
    key = _new_key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    b = (
        _builder(_name(common_name), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: str, data: bytes, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # an overwritten file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def generate(
    out_dir: str,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    clients: Sequence[str] = ("client",),
    days: int = 365,
    overwrite: bool = False,
) -> CertFiles:
    """Write the CA, the server certificate for ``hosts`` and one client certificate per name.

    FileExistsError (naming the file) when a target exists and ``overwrite`` is false;
    CertsError for bad host or client names. Nothing is written in either case.
    """
    if days <= 0:
        raise CertsError(f"days={days!r} is not allowed: must be > 0")
    hosts = [str(h) for h in hosts]
    if not hosts:
        raise CertsError("hosts: name at least one host")
    san_entries(hosts)  # validate before writing anything
    files = plan(out_dir, clients)
    if not overwrite:
        for path in files.all():
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists: refusing to overwrite it (give overwrite=true to replace)")
    os.makedirs(os.path.dirname(files.ca_cert), exist_ok=True)

    ca_key, ca_cert = make_ca(days)
    srv_key, srv_cert = issue(ca_key, ca_cert, hosts[0].strip("[]"), hosts=hosts, days=days)
    out = [
        (files.ca_cert, cert_pem(ca_cert), 0o644),
        (files.ca_key, key_pem(ca_key), 0o600),
        (files.server_cert, cert_pem(srv_cert), 0o644),
        (files.server_key, key_pem(srv_key), 0o600),
    ]
    for name, (cert_path, key_path) in files.clients.items():
        k, c = issue(ca_key, ca_cert, name, client=True, days=days)
        out += [(cert_path, cert_pem(c), 0o644), (key_path, key_pem(k), 0o600)]
    for path, data, mode in out:
        _write(path, data, mode, overwrite)
    return files
