"""Self-signed certificates and identity tokens for a run (behind ``dtrain-certs``).

One run makes, in ``out_dir``:

- a private CA (``ca.pem`` / ``ca.key``) and the coordinator's server
  certificate (``server.pem``) whose subject alternative names are the given
  hosts (IP addresses become IP SANs, everything else DNS SANs);
- one certificate per **peer id** in ``clients`` (``<id>.pem`` / ``<id>.key``):
  CN = the id, URI SAN ``dtrain-peer:<id>`` (the identity the servers bind
  its calls to under mutual TLS), usable as a client certificate and, when
  ``peer_hosts`` names the hosts other peers dial, as the server certificate
  of that peer's Peer service;
- one certificate per **tool** in ``tools`` (default ``status``, for
  ``dtrain-status``): URI SAN ``dtrain-tool:<name>``, client use only: a tool
  may call Status and nothing that acts as a peer;
- with a cluster ``secret``: one identity token per peer and tool
  (``<name>.token``, see :mod:`dtrain.wire.auth`), the per-peer identity
  without TLS. Only the coordinator (``auth.secret``) and the admin keep the
  secret; each machine gets its own token.

``certificates=False`` writes the tokens only. Keys are ECDSA P-256 in
unencrypted PKCS#8 PEM; keys and tokens are written with mode 0600. Existing
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

from ..wire.auth import PEER, TOOL, mint_token, subject_of

RESERVED = ("ca", "server")  # client names whose files would clash with the CA / server files
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SKEW = dt.timedelta(minutes=5)  # not-valid-before slack for clocks that run behind


class CertsError(ValueError):
    """Bad input (host or client name). The message is one line."""


@dataclass
class CertFiles:
    """Paths written by :func:`generate` (absolute); empty when not written (certificates off)."""

    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    clients: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # peer id -> (cert, key)
    tools: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # tool name -> (cert, key)
    tokens: Dict[str, str] = field(default_factory=dict)  # peer id or tool name -> its .token file

    def all(self) -> List[str]:
        out = [p for p in (self.ca_cert, self.ca_key, self.server_cert, self.server_key) if p]
        for cert, key in list(self.clients.values()) + list(self.tools.values()):
            out += [cert, key]
        return out + list(self.tokens.values())


def client_stem(name: str) -> str:
    """``client`` -> ``client``; any other name -> the name itself (``<stem>.pem`` / ``<stem>.key``)."""
    return "client" if name == "client" else name


def plan(
    out_dir: str,
    clients: Sequence[str],
    tools: Sequence[str] = (),
    certificates: bool = True,
    tokens: bool = False,
) -> CertFiles:
    """The paths :func:`generate` would write; CertsError for unusable peer ids or tool names."""
    out = os.path.abspath(out_dir)
    seen = set()
    ca_cert, ca_key, server_cert, server_key = (
        os.path.join(out, f) if certificates else "" for f in ("ca.pem", "ca.key", "server.pem", "server.key")
    )
    files = CertFiles(ca_cert, ca_key, server_cert, server_key)
    for key, names, into in (("clients", clients, files.clients), ("tools", tools, files.tools)):
        for name in names:
            name = str(name)
            if not _NAME.match(name):
                raise CertsError(
                    f"{key}: {name!r} is not a usable name: 1..128 letters, digits, '.', '_', '-' "
                    "(not starting with a punctuation mark)"
                )
            if name in RESERVED:
                raise CertsError(
                    f"{key}: {name!r} would clash with the {name}.pem / {name}.key files: pick another name"
                )
            if name in seen:
                raise CertsError(f"{key}: {name!r} is given twice (peer ids and tool names share the files' names)")
            seen.add(name)
            stem = os.path.join(out, client_stem(name))
            if certificates:
                into[name] = (stem + ".pem", stem + ".key")
            if tokens:
                files.tokens[name] = stem + ".token"
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
    identity: str = "",
    server: bool = False,
) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate signed by the CA: a server one (SANs = hosts) or a client one; ``identity``
    (``dtrain-peer:<id>`` / ``dtrain-tool:<name>``) is added as a URI SAN; a client certificate with
    ``server=True`` may serve TLS too (for the hosts given)."""
    key = _new_key()
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    if client and server:
        usage.append(ExtendedKeyUsageOID.SERVER_AUTH)
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
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    names: List[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)] if identity else []
    names += san_entries(hosts)
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
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
    clients: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
    tools: Sequence[str] = ("status",),
    peer_hosts: Sequence[str] = (),
    secret: str = "",
    certificates: bool = True,
) -> CertFiles:
    """Write the CA, the server certificate for ``hosts``, one certificate per peer id in ``clients``
    (URI SAN ``dtrain-peer:<id>``, + ``peer_hosts`` as DNS / IP SANs) and per tool in ``tools`` (URI
    SAN ``dtrain-tool:<name>``); with a ``secret``, each one's identity token too (``<name>.token``).

    FileExistsError (naming the file) when a target exists and ``overwrite`` is false;
    CertsError for bad host, peer or tool names, or for nothing to write. Nothing is written then.
    """
    if days <= 0:
        raise CertsError(f"days={days!r} is not allowed: must be > 0")
    hosts = [str(h) for h in hosts]
    peer_hosts = [str(h) for h in peer_hosts]
    if certificates and not hosts:
        raise CertsError("hosts: name at least one host")
    if not certificates and not secret:
        raise CertsError("certificates=false writes identity tokens only: set the cluster secret (DTRAIN_SECRET)")
    san_entries(hosts)  # validate before writing anything
    san_entries(peer_hosts)
    files = plan(out_dir, clients, tools, certificates=certificates, tokens=bool(secret))
    if not overwrite:
        for path in files.all():
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists: refusing to overwrite it (give overwrite=true to replace)")
    os.makedirs(os.path.abspath(out_dir), exist_ok=True)

    out = []
    if certificates:
        ca_key, ca_cert = make_ca(days)
        srv_key, srv_cert = issue(ca_key, ca_cert, hosts[0].strip("[]"), hosts=hosts, days=days)
        out += [
            (files.ca_cert, cert_pem(ca_cert), 0o644),
            (files.ca_key, key_pem(ca_key), 0o600),
            (files.server_cert, cert_pem(srv_cert), 0o644),
            (files.server_key, key_pem(srv_key), 0o600),
        ]
        for kind, certs in ((PEER, files.clients), (TOOL, files.tools)):
            for name, (cert_path, key_path) in certs.items():
                k, c = issue(
                    ca_key,
                    ca_cert,
                    name,
                    hosts=peer_hosts if kind == PEER else (),
                    client=True,
                    server=kind == PEER,
                    identity=subject_of(kind, name),
                    days=days,
                )
                out += [(cert_path, cert_pem(c), 0o644), (key_path, key_pem(k), 0o600)]
    kinds = {**{str(n): PEER for n in clients}, **{str(n): TOOL for n in tools}}
    for name, path in files.tokens.items():
        kind = kinds[name]
        out.append((path, (mint_token(secret, kind, name) + "\n").encode(), 0o600))
    for path, data, mode in out:
        _write(path, data, mode, overwrite)
    return files
