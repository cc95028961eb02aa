"""Authentication and transport security for the gRPC services.

- **Token**: a shared secret (``auth.token``, or the environment variable
  ``DTRAIN_TOKEN``) sent as call metadata ``authorization: Bearer <token>``
  and compared in constant time (``hmac.compare_digest``). Every RPC except
  the standard health checks needs it; a missing or wrong token gets
  UNAUTHENTICATED before the request is even parsed.
- **TLS**: server credentials from ``tls.cert`` / ``tls.key``, with
  ``tls.client_ca`` turning on mutual TLS; client credentials from ``tls.ca``
  (+ ``tls.cert`` / ``tls.key`` as the client identity).
- **Limits**: both ends cap message sizes (``channel_options``).
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import List, Optional, Tuple

import grpc

log = logging.getLogger("dtrain.control")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_ENV = "DTRAIN_TOKEN"


def resolve_token(configured: str) -> str:
    """The configured token, else ``$DTRAIN_TOKEN``, else empty (auth off)."""
    return configured or os.environ.get(TOKEN_ENV, "")


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


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call without the right bearer token (health checks exempt)."""

    def __init__(self, token: str):
        self._token = token.encode()
        self._deny = {}  # method -> its refusing handler, built once

    def _ok(self, metadata) -> bool:
        return hmac.compare_digest(_bearer(metadata).encode(), self._token)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(HEALTH_PREFIX) or self._ok(details.invocation_metadata):
            return handler
        log.warning("refused unauthenticated call to %s", details.method)
        if details.method not in self._deny:
            self._deny[details.method] = _denying(handler)
        return self._deny[details.method]


def _denying(handler):
    """A handler of the same kind that refuses without parsing the request."""
    if handler is None:
        return None
    msg = "missing or wrong token (send 'authorization: Bearer <token>')"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
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

    def __init__(self, token: str):
        self._token = token.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if details.method.startswith(HEALTH_PREFIX) or hmac.compare_digest(
            _bearer(details.invocation_metadata).encode(), self._token
        ):
            return handler
        log.warning("refused unauthenticated call to %s", details.method)
        return _denying_blocking(handler)


def _denying_blocking(handler):
    if handler is None:
        return None
    msg = "missing or wrong token (send 'authorization: Bearer <token>')"

    def unary(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

    def streaming(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
        yield  # pragma: no cover

    raw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **raw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **raw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **raw)
    return grpc.unary_unary_rpc_method_handler(unary, **raw)
