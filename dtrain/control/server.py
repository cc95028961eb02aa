"""Running the coordinator: the gRPC server with auth, TLS, health and reflection.

``serve(cfg)`` binds ``cfg.host:cfg.port`` (port 0: the OS picks), prints
``coordinator listening on HOST:PORT`` as the first line on stdout, and runs
until SIGTERM / SIGINT. The standard gRPC health service answers SERVING for
"" and ``dtrain.v1.Coordinator``; server reflection is on unless
``reflection=false``.

Authentication and identity (:mod:`dtrain.wire.auth`): with ``auth.secret``
(or ``$DTRAIN_SECRET``) callers present identity tokens of that cluster
secret; else ``auth.token`` is the shared token (or, if it is an identity
token itself, pins the cluster key it names); ``tls.client_ca`` adds mutual
TLS, where the certificate's identity counts. The revocation list
``control.revoked`` (a file of peer ids) is read at start (an unreadable file or a
bad line: the coordinator does not start) and again on SIGHUP (then an
unreadable file keeps the list in force, with one error line); revoked
members are removed at once.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..v1 import dtrain_pb2 as pb
from ..v1 import dtrain_pb2_grpc as pb_grpc
from ..wire.auth import (
    IdentityGuard,
    TokenInterceptor,
    TokenPolicy,
    channel_options,
    is_identity_token,
    read_revoked,
    resolve_secret,
    resolve_token,
    server_credentials,
)
from .parse_guard import ParseGuardInterceptor
from .quorum import Params, QuorumMachine
from .service import CoordinatorService
from .state_store import StateStore

log = logging.getLogger("dtrain.control")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


def params_from(cfg) -> Params:
    return Params(
        min_peers=cfg.min_peers,
        lease_timeout=cfg.lease_timeout_s,
        heartbeat_interval=cfg.heartbeat_interval_s,
        grace=cfg.grace_s,
        heal_grace=cfg.heal_grace_s,
        commit_timeout=cfg.commit_timeout_s,
        history=cfg.history,
        schema_hash=cfg.schema_hash,
        adaptive_grace=cfg.adaptive_grace,
        grace_cap=cfg.grace_cap_s,
        max_unconfirmed_reports=cfg.control.max_unconfirmed_reports,
    )


# pyright's bundled typeshed stubs for grpcio-health-checking lack ``health.aio`` (grpc_health.v1._async) and
# ``HealthListResponse``; both exist in the installed package.
class HealthServicer(health.aio.HealthServicer):  # pyright: ignore[reportAttributeAccessIssue]
    """The standard health service, with the List method the upstream one leaves out."""

    async def List(self, request, context):
        statuses = {name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)  # pyright: ignore[reportAttributeAccessIssue]


class CoordinatorServer:
    """The server and its service; ``await start()``, then ``await wait()`` or ``await stop()``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.store = StateStore(cfg.state_dir)
        snapshot = self.store.load()
        self.machine = QuorumMachine(params_from(cfg), snapshot)
        self.service: Optional[CoordinatorService] = None
        self.server: Optional[grpc.aio.Server] = None
        self._tcp_store = None
        self.port = 0
        self.resumed = snapshot is not None

    def _guard(self) -> IdentityGuard:
        cfg = self.cfg
        token, secret = resolve_token(cfg.auth.token), resolve_secret(cfg.auth.secret)
        tokens = TokenPolicy.for_server(token, secret)
        if secret and token and not is_identity_token(token):
            log.warning("auth.token / DTRAIN_TOKEN is not used: auth.secret is set (per-peer identity tokens)")
        mutual = cfg.tls.server_enabled and bool(cfg.tls.client_ca)
        if tokens.mode == TokenPolicy.NONE and not mutual:
            log.warning("no auth token configured (auth.token / DTRAIN_TOKEN): any caller is accepted")
        revoked = read_revoked(cfg.control.revoked) if cfg.control.revoked else frozenset()
        guard = IdentityGuard(tokens, mutual_tls=mutual, revoked=revoked, logger=log)
        log.info(
            "identity: %s%s; %d revoked peer id(s)%s",
            {"none": "no token", "shared": "shared token", "identity": "per-peer identity tokens"}[tokens.mode],
            ", mutual TLS (the certificate's identity counts)" if mutual else "",
            len(revoked),
            f" from {cfg.control.revoked}" if cfg.control.revoked else "",
        )
        if tokens.mode == TokenPolicy.SHARED and not mutual:
            log.info("the shared token binds no peer id: any holder may act as any peer (auth.secret binds them)")
        return guard

    def reload_revoked(self) -> None:
        """Read the revocation list again (SIGHUP); revoked members are removed at once."""
        path = self.cfg.control.revoked
        if self.service is None:
            return
        if not path:
            log.info("SIGHUP: no revocation list configured (control.revoked=...): nothing to read")
            return
        try:
            revoked = read_revoked(path)
        except ValueError as e:
            log.error("SIGHUP: %s; the previous list (%d peer ids) stays in force", e, len(self.service.guard.revoked))
            return
        before = self.service.guard.revoked
        gone = self.service.revoke(revoked)
        log.info(
            "revocation list %s: %d peer id(s) (added: %s; lifted: %s); removed from membership: %s",
            path,
            len(revoked),
            ", ".join(sorted(revoked - before)) or "none",
            ", ".join(sorted(before - revoked)) or "none",
            ", ".join(gone) or "none",
        )

    async def start(self) -> str:
        cfg = self.cfg
        guard = self._guard()
        interceptors = ([TokenInterceptor(guard.tokens)] if guard.tokens.enabled else []) + [ParseGuardInterceptor()]
        self.server = grpc.aio.server(
            interceptors=interceptors, options=channel_options(int(cfg.max_message_mb * 2**20))
        )
        store_address = self._start_gloo_store() if cfg.gloo_store else ""
        self.service = CoordinatorService(
            self.machine, self.store, cfg.max_wait_s, store_address=store_address, guard=guard
        )
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self.server)
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        names = [SERVICE_NAME, health.SERVICE_NAME]
        if cfg.reflection:
            names.append(reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        bind = f"{cfg.host}:{cfg.port}"
        creds = server_credentials(cfg.tls)
        self.port = (
            self.server.add_secure_port(bind, creds) if creds is not None else self.server.add_insecure_port(bind)
        )
        if not self.port:
            raise OSError(f"cannot bind {bind}")
        await self.server.start()
        self.service.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return f"{cfg.host}:{self.port}"

    def _start_gloo_store(self) -> str:
        """A TCPStore the gloo outer collectives rendezvous through (keys prefixed per quorum).

        torch's TCPStore has no authentication: the token and TLS do not cover it, so
        serve it only where every host that can reach its port is trusted."""
        import torch.distributed as dist

        self._tcp_store = dist.TCPStore(
            self.cfg.host,
            self.cfg.gloo_store_port,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=60),
        )
        return f"{self.cfg.host}:{self._tcp_store.port}"

    async def stop(self, grace: float = 0.5) -> None:
        if self.service is not None:
            await self.service.stop()
        if self.server is not None:
            await self.server.stop(grace)
        self._tcp_store = None  # closes the gloo store's listening socket
        self.store.close()


async def _serve(cfg) -> None:
    srv = CoordinatorServer(cfg)
    address = await srv.start()
    print(f"coordinator listening on {address}", flush=True)
    m = srv.machine
    log.info(
        "state_dir %s | %s | committed round %d, quorum id %d, min_peers %d, lease %.1fs, TLS %s",
        srv.store.dir,
        "resumed" if srv.resumed else "new",
        m.committed_round,
        m.quorum_id,
        cfg.min_peers,
        cfg.lease_timeout_s,
        "on" if cfg.tls.server_enabled else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, srv.reload_revoked)
    await stop.wait()
    log.info("stopping")
    await srv.stop()


def serve(cfg) -> int:
    asyncio.run(_serve(cfg))
    return 0
