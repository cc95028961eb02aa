"""Authentication, identity and transport security for the gRPC services.

Every call answers two questions: may this caller talk to the server at all
(authentication: a token, a client certificate), and may it act as the peer
id its request names (identity binding).

**Tokens** (``authorization: Bearer <token>`` metadata; health checks need none):

- *Shared token* (``auth.token`` / ``$DTRAIN_TOKEN``): one string for the
  whole run, compared in constant time. It keeps outsiders out and binds
  nothing: any holder may name any peer id. Still supported.
- *Identity tokens* (recommended without TLS): one token per peer id (and per
  tool), all derived from one cluster secret (``auth.secret`` /
  ``$DTRAIN_SECRET``; only the coordinator and the admin hold it)::

      <subject>:<cluster key, 64 hex>:<signature, 128 hex>
      subject = dtrain-peer:<peer id> | dtrain-tool:<tool name>

  The cluster key is an Ed25519 key whose seed is
  ``HMAC-SHA256(secret, "dtrain identity token key v1")``; the signature
  covers ``"dtrain identity token v1\\0" + subject``. A signature rather than
  an HMAC of the id: the Peer services run on the peers, and they must check
  each other's tokens without being able to make them (whoever can check an
  HMAC can mint every peer's token). The coordinator derives the public key
  from the secret; a peer's Peer service takes it from the peer's own token
  (the one its admin handed it). Any token of another key, with a bad
  signature, or not of this form: UNAUTHENTICATED, before the request is
  parsed. ``mint_token`` / ``dtrain-certs secret=...`` make them.

**TLS**: server credentials from ``tls.cert`` / ``tls.key``; ``tls.client_ca``
turns on mutual TLS. Client credentials from ``tls.ca`` (+ ``tls.cert`` /
``tls.key``: the client's certificate). ``dtrain-certs`` puts a peer's id in
its certificate as the URI SAN ``dtrain-peer:<id>`` (tools:
``dtrain-tool:<name>``) and as the CN; the URI SAN is what counts.

**Identity binding** (:class:`IdentityGuard`, asked by the Coordinator and the
Peer service in every RPC): binding is on where the server runs mutual TLS or
identity tokens. The caller's identity is then its certificate's dtrain URI
SAN, else its identity token's subject (both present: they must agree).

- A call that names a peer id (Coordinator: Join, Heartbeat, Leave, Sync,
  Commit, Report; Peer: GetStateHeader's ``requester``, every PushShard
  chunk's ``sender``) must come from that peer's own identity. A tool
  identity, or a certificate without a dtrain identity, acts as no peer.
- A call that names none (Status, Ping) is open to every authenticated
  caller: that is what tools such as ``dtrain-status`` use.
- Revoked peer ids (``IdentityGuard.revoked``) are refused in every mode, as
  the caller's identity and as the claimed id.
- A refusal is PERMISSION_DENIED with one WARNING log line naming the method,
  the presented identity and the claimed id; the handler does nothing else.

With a shared token or no auth nothing is bound (only revocation is checked).

**Limits**: both ends cap message sizes (``channel_options``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple, Union

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError

log = logging.getLogger("dtrain.control")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_ENV = "DTRAIN_TOKEN"
SECRET_ENV = "DTRAIN_SECRET"

PEER, TOOL = "peer", "tool"  # identities that name someone
CERT, SHARED, OPEN = "certificate", "shared", "open"  # a certificate without one; the shared token; auth off
PREFIXES = {PEER: "dtrain-peer:", TOOL: "dtrain-tool:"}
NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a peer id or tool name (the coordinator's peer id rule)


def resolve_token(configured: str) -> str:
    """The configured token, else ``$DTRAIN_TOKEN``, else empty (auth off)."""
    return configured or os.environ.get(TOKEN_ENV, "")


def resolve_secret(configured: str) -> str:
    """The configured cluster secret, else ``$DTRAIN_SECRET``, else empty (no identity tokens)."""
    return configured or os.environ.get(SECRET_ENV, "")


# ---------------------------------------------------------------- identities


@dataclass(frozen=True)
class Identity:
    """Who a call comes from: ``kind`` PEER / TOOL (``name`` is the id), CERT (a verified certificate
    without a dtrain identity; ``name`` is its CN), SHARED (the shared token) or OPEN (auth off)."""

    kind: str
    name: str = ""
    via: str = ""  # "certificate" | "token" | ""

    @property
    def subject(self) -> str:
        return PREFIXES[self.kind] + self.name if self.kind in PREFIXES else ""

    def __str__(self) -> str:
        if self.kind in PREFIXES:
            return f"{self.kind} {self.name!r} ({self.via})"
        if self.kind == CERT:
            return f"a certificate without a dtrain identity (CN {self.name!r})"
        return "the shared token" if self.kind == SHARED else "an unauthenticated caller"


def parse_subject(subject: str) -> Optional[Tuple[str, str]]:
    """``dtrain-peer:<id>`` -> (PEER, id), ``dtrain-tool:<name>`` -> (TOOL, name); else None."""
    for kind, prefix in PREFIXES.items():
        if subject.startswith(prefix) and NAME.fullmatch(subject[len(prefix) :]):
            return kind, subject[len(prefix) :]
    return None


def subject_of(kind: str, name: str) -> str:
    """The subject (certificate URI SAN, token subject) of a peer or tool; ValueError for a bad name."""
    if kind not in PREFIXES:
        raise ValueError(f"identity kind {kind!r} is not allowed: {PEER} or {TOOL}")
    if not NAME.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} is not allowed: 1..128 of letters, digits, '.', '_', '-'")
    return PREFIXES[kind] + name


# ---------------------------------------------------------------- identity tokens

_KEY_INFO = b"dtrain identity token key v1"
_SIGNED = b"dtrain identity token v1\0"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signing_key(secret: str) -> Ed25519PrivateKey:
    if not secret:
        raise ValueError("the cluster secret is empty")
    return Ed25519PrivateKey.from_private_bytes(hmac.new(secret.encode(), _KEY_INFO, hashlib.sha256).digest())


def cluster_key(secret: str) -> str:
    """The public key (hex) that checks the identity tokens made from ``secret``."""
    return _signing_key(secret).public_key().public_bytes(*_RAW).hex()


def mint_token(secret: str, kind: str, name: str) -> str:
    """The identity token of peer (``kind=PEER``) or tool ``name`` under the cluster ``secret``."""
    subject = subject_of(kind, name)
    key = _signing_key(secret)
    sig = key.sign(_SIGNED + subject.encode())
    return f"{subject}:{key.public_key().public_bytes(*_RAW).hex()}:{sig.hex()}"


@dataclass(frozen=True)
class _Token:
    kind: str
    name: str
    subject: str
    key: str  # hex
    sig: bytes


def _parse_token(token: str) -> Optional[_Token]:
    parts = token.rsplit(":", 2)
    if len(parts) != 3 or not _HEX64.fullmatch(parts[1]) or not _HEX128.fullmatch(parts[2]):
        return None
    who = parse_subject(parts[0])
    if who is None:
        return None
    return _Token(who[0], who[1], parts[0], parts[1], bytes.fromhex(parts[2]))


def _verifies(t: _Token, key: str) -> bool:
    if not hmac.compare_digest(t.key, key):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(t.sig, _SIGNED + t.subject.encode())
    except (InvalidSignature, ValueError):
        return False
    return True


def is_identity_token(token: str) -> bool:
    """Whether ``token`` has the form of an identity token (its signature is not checked)."""
    return _parse_token(token) is not None


class TokenPolicy:
    """How a server checks bearer tokens: NONE (auth off), SHARED (one token) or IDENTITY (identity
    tokens of one cluster key). Build it with :meth:`for_server`."""

    NONE, SHARED, IDENTITY = "none", "shared", "identity"
    _CACHE = 4096  # verified tokens remembered (a signature check costs ~0.1 ms)

    def __init__(self, mode: str, shared: str = "", key: str = ""):
        self.mode, self._shared, self.key = mode, shared.encode(), key
        self._verified: Dict[str, Identity] = {}

    @classmethod
    def for_server(cls, token: str = "", secret: str = "") -> "TokenPolicy":
        """With a ``secret``: identity tokens of its key. Else a ``token`` that is itself an identity
        token (a peer's own): identity tokens of the key it names. Else a shared ``token``; else none.
        ConfigError for an identity token whose signature does not verify."""
        if secret:
            return cls(cls.IDENTITY, key=cluster_key(secret))
        if not token:
            return cls(cls.NONE)
        t = _parse_token(token)
        if t is None:
            return cls(cls.SHARED, shared=token)
        if not _verifies(t, t.key):
            raise ConfigError(
                f"auth.token is an identity token for {t.subject!r} whose signature does not verify: "
                "copy it again from the .token file dtrain-certs wrote"
            )
        return cls(cls.IDENTITY, key=t.key)

    @property
    def enabled(self) -> bool:
        return self.mode != self.NONE

    def identity_of(self, bearer: str) -> Optional[Identity]:
        """The identity ``bearer`` proves, or None: refuse the call (UNAUTHENTICATED)."""
        if self.mode == self.NONE:
            return Identity(OPEN)
        if self.mode == self.SHARED:
            return Identity(SHARED, via="token") if hmac.compare_digest(bearer.encode(), self._shared) else None
        hit = self._verified.get(bearer)
        if hit is not None:
            return hit
        t = _parse_token(bearer)
        if t is None or not _verifies(t, self.key):
            return None
        ident = Identity(t.kind, t.name, "token")
        if len(self._verified) >= self._CACHE:
            self._verified.clear()
        self._verified[bearer] = ident
        return ident

    def describe(self, bearer: str) -> str:
        """What a refused bearer token was, for the log (never the token itself)."""
        if not bearer:
            return "no token"
        t = _parse_token(bearer)
        if self.mode == self.SHARED or t is None:
            return "a wrong token" if self.mode == self.SHARED else "a token that is no identity token"
        if t.key != self.key:
            return f"a token for {t.subject!r} of another cluster secret"
        return f"a token for {t.subject!r} whose signature does not verify"


# ---------------------------------------------------------------- binding calls to identities


def read_revoked(path: str) -> FrozenSet[str]:
    """The peer ids of a revocation list: one a line, ``#`` starts a comment, blank lines are ignored.
    ConfigError (one line) for a file that cannot be read or a line that is no peer id."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"control.revoked={path!r} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    ids = set()
    for n, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        if not NAME.fullmatch(word):
            raise ConfigError(f"control.revoked={path!r} line {n}: {word[:80]!r} is not a peer id")
        ids.add(word)
    return frozenset(ids)


def _cert_identity(context) -> Tuple[Optional[Identity], str]:
    """The identity of the call's verified client certificate, or (None, why)."""
    try:
        ac = context.auth_context() or {}
    except Exception:  # no auth context on this transport
        ac = {}
    if not ac.get("x509_pem_cert"):
        return None, "no verified client certificate"
    found = set()
    for raw in ac.get("peer_uri", []):
        who = parse_subject(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
        if who is not None:
            found.add(who)
    if len(found) > 1:
        return None, "the certificate names several dtrain identities: " + ", ".join(sorted(map(str, found)))
    if found:
        kind, name = found.pop()
        return Identity(kind, name, "certificate"), ""
    cn = (ac.get("x509_common_name") or [b""])[0]
    return Identity(CERT, cn.decode("utf-8", "replace") if isinstance(cn, bytes) else str(cn), "certificate"), ""


class IdentityGuard:
    """Binds calls to identities (the module docstring has the rules). ``revoked`` may be replaced
    at any time (a new frozenset); ``binding`` says whether identities are enforced."""

    def __init__(
        self,
        tokens: Optional[TokenPolicy] = None,
        mutual_tls: bool = False,
        revoked: Iterable[str] = (),
        logger: Optional[logging.Logger] = None,
    ):
        self.tokens = tokens if tokens is not None else TokenPolicy(TokenPolicy.NONE)
        self.mutual_tls = mutual_tls
        self.revoked: FrozenSet[str] = frozenset(revoked)
        self.log = logger if logger is not None else log

    @property
    def binding(self) -> bool:
        return self.mutual_tls or self.tokens.mode == TokenPolicy.IDENTITY

    def identify(self, context) -> Tuple[Optional[Identity], str]:
        """The caller's identity, or (None, why it has none that counts)."""
        bearer = _bearer(context.invocation_metadata())
        tok = self.tokens.identity_of(bearer)
        if tok is None:  # the token interceptor refuses these first; kept for servers without it
            return None, f"{self.tokens.describe(bearer)} (UNAUTHENTICATED)"
        if not self.mutual_tls:
            return tok, ""
        cert, why = _cert_identity(context)
        if cert is None:
            return None, why
        if tok.kind in PREFIXES:
            if cert.kind in PREFIXES and (cert.kind, cert.name) != (tok.kind, tok.name):
                return None, f"the certificate names {cert.subject!r}, the token {tok.subject!r}"
            if cert.kind not in PREFIXES:
                return tok, ""
        return cert, ""

    def claim_refusal(self, ident: Identity, claimed: Optional[str]) -> str:
        """Why ``ident`` may not make a call naming peer id ``claimed`` (None: a call that names
        none); "" when it may."""
        if ident.kind == PEER and ident.name in self.revoked:
            return f"peer {ident.name!r} is revoked"
        if claimed is None:
            return ""
        if claimed in self.revoked:
            return f"peer {claimed!r} is revoked"
        if not self.binding or (ident.kind == PEER and ident.name == claimed):
            return ""
        if ident.kind == PEER:
            return f"{ident} may not act as peer {claimed!r}"
        if ident.kind == TOOL:
            return f"{ident} may call Status only, not act as peer {claimed!r}"
        return (
            f"{ident} acts as no peer: issue one certificate per peer id (dtrain-certs clients=[{claimed}]) "
            "or use that peer's identity token"
        )

    def refuse(self, method: str, presented: Union[Identity, str, None], claimed: Optional[str], why: str) -> str:
        """Log the one line of a refusal; returns ``why`` (the status message)."""
        who = presented if presented is not None else "an unidentified caller"
        what = f"peer id {claimed!r}" if claimed is not None else "no peer id"
        self.log.warning("refused %s from %s claiming %s: %s", method, who, what, why)
        return why

    def authorize(self, context, method: str, claimed: Optional[str]) -> Tuple[Optional[Identity], str]:
        """(identity, "") when the call may go on; (identity or None, why) when it must be refused with
        PERMISSION_DENIED (the log line is written here)."""
        ident, why = self.identify(context)
        if ident is None:
            return None, self.refuse(method, None, claimed, why)
        why = self.claim_refusal(ident, claimed)
        if why:
            return ident, self.refuse(method, ident, claimed, why)
        return ident, ""


# ---------------------------------------------------------------- transport


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what} {path!r} cannot be read: {e.strerror or e}") from None


def channel_options(max_message_bytes: int) -> List[Tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


# reconnect quickly after a coordinator restart instead of gRPC's default backoff (up to 120 s)
# (not grpc.min_reconnect_backoff_ms: gRPC also uses it as the connect timeout, which would
# fail every link whose handshake takes longer, e.g. intercontinental or slow TLS)
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 5000)]


def server_credentials(tls) -> Optional[grpc.ServerCredentials]:
    """TLS server credentials from a TLSConfig, or None when TLS is off."""
    if not tls.server_enabled:
        return None
    pair = [(_read(tls.key, "tls.key"), _read(tls.cert, "tls.cert"))]
    if tls.client_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(tls.client_ca, "tls.client_ca"), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def client_credentials(tls) -> Optional[grpc.ChannelCredentials]:
    """TLS channel credentials from a TLSConfig, or None when TLS is off."""
    if not tls.client_enabled:
        return None
    key = _read(tls.key, "tls.key") if tls.key else None
    cert = _read(tls.cert, "tls.cert") if tls.cert else None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "tls.ca"), private_key=key, certificate_chain=cert
    )


def make_channel(address: str, tls, max_message_bytes: int) -> grpc.Channel:
    """A (blocking-API) channel to ``address`` with TLS when configured."""
    opts = channel_options(max_message_bytes) + RECONNECT_OPTIONS
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    creds = client_credentials(tls) if tls is not None else None
    if creds is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, creds, options=opts)


def auth_metadata(token: str) -> Tuple[Tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _bearer(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


def _policy(token: Union[str, TokenPolicy]) -> TokenPolicy:
    """A policy as given; a plain string is a shared token."""
    return token if isinstance(token, TokenPolicy) else TokenPolicy(TokenPolicy.SHARED, shared=token)


_DENIED = "missing or wrong token (send 'authorization: Bearer <token>')"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without a token the policy accepts (health checks exempt).
    ``token``: a :class:`TokenPolicy`, or a string (a shared token)."""

    def __init__(self, token: Union[str, TokenPolicy]):
        self.policy = _policy(token)
        self._deny = {}  # method -> its refusing handler, built once

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(HEALTH_PREFIX):
            return handler
        bearer = _bearer(details.invocation_metadata)
        if self.policy.identity_of(bearer) is not None:
            return handler
        log.warning("refused unauthenticated call to %s: %s", details.method, self.policy.describe(bearer))
        if details.method not in self._deny:
            self._deny[details.method] = _denying(handler)
        return self._deny[details.method]


def _denying(handler):
    """A handler of the same kind that refuses without parsing the request."""
    if handler is None:
        return None

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover - makes this an async generator

    raw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **raw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **raw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **raw)
    return grpc.unary_unary_rpc_method_handler(unary, **raw)


class BlockingTokenInterceptor(grpc.ServerInterceptor):
    """The same check for thread-pool (blocking) servers, e.g. a peer's Peer service."""

    def __init__(self, token: Union[str, TokenPolicy]):
        self.policy = _policy(token)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if details.method.startswith(HEALTH_PREFIX):
            return handler
        bearer = _bearer(details.invocation_metadata)
        if self.policy.identity_of(bearer) is not None:
            return handler
        log.warning("refused unauthenticated call to %s: %s", details.method, self.policy.describe(bearer))
        return _denying_blocking(handler)


def _denying_blocking(handler):
    if handler is None:
        return None

    def unary(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    def streaming(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover

    raw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **raw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **raw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **raw)
    return grpc.unary_unary_rpc_method_handler(unary, **raw)
