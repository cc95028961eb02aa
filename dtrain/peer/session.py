"""One peer leader's membership in a run: its data plane, its coordinator client, its round engine.

The lifecycle every leader shares (the training peer's outer loop, the ddp
baseline, the model-free peer of ``dtrain-sim`` and the benches):

    session = PeerSession(...)        serve the Peer service (state, shard inbox), build the collective
    session.join()                    publish S, Join, start the heartbeat; heal first when told to
    session.engine.exchange(...)      rounds (see ``round_engine``)
    session.install(nxt)              commit S_{r+1} and publish it to joiners
    session.close(leave, reason)      Leave (or let the lease lapse), stop the server

The session owns the :class:`GlobalState` object the engine syncs, heals and
the caller commits into; ``publish`` serves its snapshot to joiners. With
``codec=None`` it builds no collective: the caller sets ``engine.collective``
before each exchange (the model-free peer picks one per round).
``transfer_chunk_bytes`` is the chunk size of the state it serves to joiners.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..comm.collective import Collective
from ..comm.gloo_allreduce import GlooCollective
from ..comm.grpc_allreduce import GrpcCollective
from ..comm.peer_service import PeerServicer, serve_peer
from ..comm.shard_inbox import ShardInbox
from ..config import ControlConfig, TrainConfig
from ..control.client import CoordinatorClient, HealOrder
from ..control.work_plan import WorkPlan
from ..outer.global_state import GlobalState
from ..wire.auth import resolve_token
from ..wire.codec import Codec
from ..wire.schema import schema_hash
from ..wire.snapshot import DEFAULT_CHUNK_BYTES
from .round_engine import ExchangeResult, RoundEngine

log = logging.getLogger("dtrain")


@dataclass(frozen=True)
class ExchangeSettings:
    """How the outer collective runs (from ``outer.*``)."""

    backend: str = "grpc"  # grpc | gloo
    streams: int = 2
    chunk_bytes: int = 1 << 20
    deadline_s: float = 30.0
    sync_timeout_s: float = 600.0
    weighting: str = "uniform"  # samples | uniform: the members' weights in the mean


def build_collective(
    codec: Codec, settings: ExchangeSettings, peer_id: str, control: ControlConfig, token: str, inbox: ShardInbox
) -> Collective:
    """The outer collective of ``settings.backend`` for this peer."""
    if settings.backend == "gloo":
        wildcard = control.host in ("0.0.0.0", "::", "")
        return GlooCollective(codec, hostname=None if wildcard else control.host)
    tls = control.tls if control.tls.client_enabled else None
    return GrpcCollective(
        codec, peer_id, token=token, tls=tls, chunk_bytes=settings.chunk_bytes, streams=settings.streams, inbox=inbox
    )


def run_schema_hash(cfg: TrainConfig) -> str:
    """What every peer of a run must share: the wire contract, the model, the outer protocol."""
    outer = cfg.outer
    return schema_hash(
        {
            "model": dataclasses.asdict(cfg.model),
            "outer": {
                "name": outer.name,
                "sync_every": outer.sync_every,
                "fragments": outer.fragments,
                "codec": outer.codec,
                "block_size": outer.block_size,
                "backend": outer.backend,
                "optim": cfg.optim.name,
                "local_steps": outer.local_steps,
                "min_local_steps": outer.min_local_steps,
                "balance_tolerance": outer.balance_tolerance,
                "weighting": outer.weighting,
            },
        }
    )


def work_plan(cfg: TrainConfig) -> WorkPlan:
    """The round plan a training peer declares at join."""
    outer = cfg.outer
    return WorkPlan(outer.sync_every, outer.min_local_steps, outer.local_steps == "balanced", outer.balance_tolerance)


class PeerSession:
    def __init__(
        self,
        peer_id: str,
        control: ControlConfig,
        schema: str,
        state: GlobalState,
        codec: Optional[Codec],
        settings: ExchangeSettings,
        world_size: int = 1,
        should_stop: Optional[Callable[[], bool]] = None,
        meta: Optional[dict] = None,
        plan: Optional[WorkPlan] = None,
        transfer_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        slice: str = "",
        slices: Optional[Callable[[str], Optional[torch.Tensor]]] = None,
    ):
        self.peer_id, self.control, self.schema, self.state = peer_id, control, schema, state
        self.meta = {"peer_id": peer_id, **(meta or {})}
        self.token = resolve_token(control.auth.token)
        client_tls = control.tls if control.tls.client_enabled else None
        self.inbox = ShardInbox()
        self.servicer = PeerServicer(schema, peer_id, chunk_bytes=transfer_chunk_bytes, inbox=self.inbox)
        self.server, port = serve_peer(
            self.servicer,
            control.host,
            control.port,
            token=self.token,
            tls=control.tls if control.tls.server_enabled else None,
        )
        self.address = control.advertise or f"{control.host}:{port}"
        self.collective = (
            None if codec is None else build_collective(codec, settings, peer_id, control, self.token, self.inbox)
        )
        self.client = CoordinatorClient(
            control.coordinator,
            peer_id,
            self.address,
            schema,
            world_size=world_size,
            region=control.region,
            token=self.token,
            tls=client_tls,
            rpc_timeout=control.rpc_timeout_s,
            state_fn=lambda: (self.state.round, self.state.hash()),
            plan=plan,
            slice=slice,
        )
        self.client.should_stop = should_stop
        self.engine = RoundEngine(
            self.client,
            self.collective,
            state,
            self.publish,
            peer_id,
            schema,
            token=self.token,
            tls=client_tls,
            deadline_s=settings.deadline_s,
            sync_timeout_s=settings.sync_timeout_s,
            transfer_timeout_s=control.transfer_timeout_s,
            weighting=settings.weighting,
            slices=slices,
        )

    def publish(self) -> None:
        """Serve the current global state to joiners and healers."""
        self.servicer.set_snapshot(self.state.snapshot(self.meta))

    def install(self, nxt: GlobalState) -> None:
        """Commit: S_r -> S_{r+1}, served from now on."""
        self.state.install(nxt)
        self.publish()

    def join(self) -> Optional[ExchangeResult]:
        """Join the run and renew the lease from now on; the HEAL result when it had to catch up first."""
        self.publish()
        info = self.client.join(timeout=self.control.join_timeout_s)
        self.client.start_heartbeat()
        log.info(
            "joined %s as %s (data plane %s): committed round %d, must heal: %s",
            self.control.coordinator,
            self.peer_id,
            self.address,
            info.committed_round,
            info.must_heal,
        )
        if info.must_heal and info.donor is not None:
            return self.engine.heal(HealOrder(info.donor, info.committed_round, "joined behind"))
        return None

    def announce_slice(self, spec: str) -> None:
        """Tell the coordinator this peer now trains within another top arch (a re-join: same incarnation,
        nothing else changes); the next quorum carries it."""
        self.client.slice = spec
        self.client.join(timeout=self.control.join_timeout_s)

    def close(self, leave: bool = True, reason: str = "finished") -> None:
        if leave:
            self.client.leave(reason)
        self.client.close()
        if self.collective is not None:
            self.collective.close()
        self.server.stop(0)
