"""The trainer's side of the outer loop: DiLoCo rounds (or the ddp baseline) in a peer.

**DiLoCo** (``outer.name=diloco``). Every ``P = sync_every / fragments`` inner
steps the peer runs one round, for fragment ``f = round mod fragments``:

    delta_f  = theta_global[f] - theta_local[f]            (the pseudo-gradient)
    payload  = delta_f   (+ error feedback, on the codec's grid)
    mean     = round_engine.exchange(payload)               (sync, all-reduce, commit)
    theta_global[f], v[f] <- outer Nesterov step with mean
    theta_local[f] <- theta_global[f]                       (tau = 0)
    theta_local[f] <- alpha * theta_local[f] + (1 - alpha) * theta_global[f]   (tau > 0)

With ``overlap_steps = tau > 0`` the exchange runs in a background thread
while inner steps go on, and its result is applied tau steps later (tau = 1
is the one-step-delayed "eager" update). If the coordinator says HEAL, the
peer adopts the donor's global state, sets theta_local to it, and moves its
inner step counter to the state's round.

**ddp baseline** (``outer.name=ddp``): every inner step is a round whose
payload is the gradient; the mean gradient replaces the local one before the
inner optimizer step. The global state then also holds the inner optimizer's
state, so that joiners and parity checks see everything that must agree.

Only the peer leader (rank 0) talks to the network. After each applied round
it broadcasts what happened (kind, round, step) and the new local parameters
to the peer's other ranks, which wait in that broadcast.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..comm.peer_service import PeerServicer, serve_peer
from ..wire.auth import resolve_token
from ..control.client import ControlError, CoordinatorClient, Stopping
from ..wire.schema import schema_hash
from ..outer.codecs import get_codec
from ..outer.error_feedback import ErrorFeedback
from ..outer.flat_params import FlatLayout
from ..outer.global_state import GlobalState
from ..outer.outer_opt import OuterNesterov
from .round_engine import RoundEngine, RoundOutcome
from ..checkpoint import load_checkpoint, save_checkpoint
from .optim_state import load_optimizer_flat_state, optimizer_flat_state

log = logging.getLogger("dtrain")

NONE, COMMIT, HEAL, STOP = 0, 1, 2, 3
FAULT_EXIT_AFTER_COMMIT = "DTRAIN_FAULT_EXIT_AFTER_COMMIT"  # test hook: a round number


def run_schema_hash(cfg) -> str:
    """What every peer of a run must share: the wire contract, the model, the outer protocol."""
    o = cfg.outer
    return schema_hash({"model": dataclasses.asdict(cfg.model),
                        "outer": {"name": o.name, "sync_every": o.sync_every, "fragments": o.fragments,
                                  "codec": o.codec, "block_size": o.block_size, "backend": o.backend,
                                  "optim": cfg.optim.name}})


class OuterLoop:
    def __init__(self, trainer):
        self.t = trainer
        c = trainer.cfg
        self.cfg, self.o = c, c.outer
        self.ddp = self.o.name == "ddp"
        self.layout = FlatLayout(trainer.model, 1 if self.ddp else self.o.fragments)
        self.fragments = len(self.layout.fragments)
        self.period = 1 if self.ddp else self.o.sync_every // self.o.fragments
        self.tau = 0 if self.ddp else self.o.overlap_steps
        self.leader = trainer.ctx.is_leader
        self.pending: Optional[tuple] = None  # (future, fragment, apply_at_step, t_start)
        self.last_round_end = time.perf_counter()
        self.compute_s = 0.0
        if not self.leader:
            return
        self.codec = get_codec(self.o.codec, self.o.block_size)
        self.ef = ErrorFeedback() if self.o.error_feedback else None
        self.outer_opt = OuterNesterov(self.o.lr, self.o.momentum, self.o.nesterov, self.o.lr_schedule,
                                       total_rounds=max(1, c.steps // self.period))
        self.state = GlobalState(self._state_tensors())
        self.schema = run_schema_hash(c)
        cc = c.control
        self.token = resolve_token(cc.auth.token)
        self.tls = cc.tls if cc.tls.client_enabled or cc.tls.server_enabled else None
        self._start_data_plane()
        self.client = CoordinatorClient(cc.coordinator, c.peer_id, self.address, self.schema,
                                        world_size=trainer.ctx.world_size, region=cc.region, token=self.token,
                                        tls=cc.tls if cc.tls.client_enabled else None,
                                        rpc_timeout=cc.rpc_timeout_s,
                                        state_fn=lambda: (self.state.round, self.state.hash()))
        self.client.should_stop = lambda: trainer.stop_requested is not None
        self.durable = self.o.durable_commit and not self.ddp
        self.next_path = os.path.join(trainer.run_dir, "checkpoints", "next_global.pt")
        self.candidate: Optional[GlobalState] = None  # S_{r+1} persisted before the vote on round r
        self.engine = RoundEngine(self.client, self.collective, self.state, self.publish, c.peer_id, self.schema,
                                  token=self.token, tls=cc.tls if cc.tls.client_enabled else None,
                                  deadline_s=self.o.deadline_s, sync_timeout_s=self.o.sync_timeout_s,
                                  transfer_timeout_s=cc.transfer_timeout_s,
                                  prepare=self._prepare if self.durable else None)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outer") if self.tau else None

    # ------------------------------------------------------------------ setup
    def _state_tensors(self):
        model = self.t.model
        theta = self.layout.flatten(model)
        if self.ddp:
            return [("theta", theta)] + optimizer_flat_state(self.t.optimizer, list(model.parameters()))
        return [("theta", theta), ("velocity", torch.zeros_like(theta))]

    def _start_data_plane(self) -> None:
        from ..comm.shard_inbox import ShardInbox

        cc, o = self.cfg.control, self.o
        self.inbox = ShardInbox()
        self.servicer = PeerServicer(self.schema, self.cfg.peer_id, inbox=self.inbox)
        server_tls = cc.tls if cc.tls.server_enabled else None
        self.server, port = serve_peer(self.servicer, cc.host, cc.port, token=self.token, tls=server_tls)
        self.address = cc.advertise or f"{cc.host}:{port}"
        if o.backend == "gloo":
            from ..comm.gloo_allreduce import GlooCollective

            wildcard = cc.host in ("0.0.0.0", "::", "")
            self.collective = GlooCollective(self.codec, hostname=None if wildcard else cc.host)
        else:
            from ..comm.grpc_allreduce import GrpcCollective

            self.collective = GrpcCollective(self.codec, self.cfg.peer_id, token=self.token,
                                             tls=cc.tls if cc.tls.client_enabled else None,
                                             chunk_bytes=int(o.chunk_mb * 2 ** 20), streams=o.streams,
                                             inbox=self.inbox)

    def publish(self, state: GlobalState) -> None:
        self.servicer.set_snapshot(state.snapshot({"peer_id": self.cfg.peer_id}))

    def start(self) -> None:
        """Join the run; heal first when the coordinator says this peer is behind.

        Durable commit: a state S_{r+1} this peer wrote before voting on round r, newer than its
        checkpoint, is adopted when the coordinator's commit history shows that round r committed with
        that very quorum from that very S_r (the crash came after the commit); else it is dropped."""
        kind = NONE
        if self.leader:
            if self._recover_next_state():
                kind = HEAL
            self.publish(self.state)
            info = self.client.join(timeout=self.cfg.control.join_timeout_s)
            self.client.start_heartbeat()
            log.info("joined %s as %s (data plane %s): committed round %d, must heal: %s",
                     self.cfg.control.coordinator, self.cfg.peer_id, self.address, info.committed_round,
                     info.must_heal)
            if info.must_heal and info.donor is not None:
                from ..control.client import HealOrder

                out = RoundOutcome("heal", self.state.round)
                if self.engine._heal(HealOrder(info.donor, info.committed_round, "joined behind"), out):
                    self._adopt_global()
                    self._record_heal(out)
                    kind = HEAL
        self._broadcast(kind)

    def finish(self) -> None:
        """Every rank, at the end of training: apply a round still in flight (overlap)."""
        if self.ddp or not self.tau:
            return
        kind = NONE
        if self.leader and self.pending is not None:
            kind = self._finish_pending()
        self._broadcast(kind)

    def close(self, leave: bool = True, reason: str = "finished") -> None:
        if not self.leader:
            return
        if self.pending is not None:
            self.pending[0].cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if leave:
            self.client.leave(reason)
        self.client.close()
        self.collective.close()
        self.server.stop(0)

    # ------------------------------------------------------------------ durable commit
    def _prepare(self, round: int, quorum_id: int, mean: torch.Tensor) -> None:
        """Before voting on ``round``: compute S_{round+1} and write it to disk (atomically)."""
        f = round % self.fragments
        lo, hi = self.layout.fragments[f]
        theta, v = self.state.tensors["theta"].clone(), self.state.tensors["velocity"].clone()
        self.outer_opt.step(theta[lo:hi], v[lo:hi], mean, round=round)
        cand = GlobalState([("theta", theta), ("velocity", v)], round=round + 1)
        save_checkpoint(self.next_path, {"round": cand.round, "tensors": cand.tensors, "state_hash": cand.hash(),
                                         "quorum_id": int(quorum_id), "from_hash": self.state.hash(),
                                         "schema": self.schema})
        self.candidate = cand

    def _recover_next_state(self) -> bool:
        """Adopt S_{r+1} written before a vote on round r if round r committed with that quorum."""
        if not self.durable or not os.path.exists(self.next_path):
            return False
        try:
            nxt = load_checkpoint(self.next_path)
            rnd, qid, base = int(nxt["round"]), int(nxt["quorum_id"]), str(nxt["from_hash"])
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is ignored, the checkpoint stands
            log.warning("ignoring %s: %s", self.next_path, e)
            return False
        if nxt.get("schema") != self.schema or rnd <= self.state.round or \
                sorted(nxt.get("tensors", {})) != sorted(self.state.tensors):
            return False
        commits, deadline = None, time.monotonic() + self.cfg.control.join_timeout_s
        while commits is None:
            try:
                commits = self.client.status().commits
            except ControlError as e:
                if time.monotonic() > deadline:
                    log.warning("cannot check whether round %d committed (%s): using the checkpoint", rnd - 1, e)
                    return False
                time.sleep(0.5)  # e.g. the coordinator is restarting with the cluster
        if not any(c.round == rnd - 1 and c.quorum_id == qid and c.state_hash == base for c in commits):
            log.info("S_%d written before a vote is not the committed one: using the checkpoint (S_%d)",
                     rnd, self.state.round)
            return False
        cand = GlobalState([(k, nxt["tensors"][k]) for k in self.state.tensors], round=rnd)
        if cand.hash() != nxt.get("state_hash"):
            log.warning("ignoring %s: its tensors do not match its state hash", self.next_path)
            return False
        log.info("round %d committed after this peer's vote: continuing from S_%d written before the vote "
                 "(checkpoint holds S_%d)", rnd - 1, rnd, self.state.round)
        self.state.tensors, self.state.round = cand.tensors, cand.round
        self.state.changed()
        self._adopt_global()
        self.t.record({"kind": "heal", "round": rnd, "donor": self.cfg.peer_id, "bytes": 0, "seconds": 0.0,
                       "state_hash": self.state.hash(), "reason": "state written before the vote of a committed round"})
        return True

    # ------------------------------------------------------------------ the loop
    def after_step(self) -> None:
        """Called by every rank after each inner step (DiLoCo; ddp works inside the step).

        Schedule, known to every rank: round exchanges start when ``step % P == 0``;
        with tau = 0 they are applied at once, else at ``step % P == tau``."""
        if self.ddp:
            return
        step, kind = self.t.step, NONE
        if self.tau == 0:
            if step % self.period:
                return
            if self.leader:
                f = self._fragment()
                self.compute_s += time.perf_counter() - self.last_round_end
                try:
                    kind = self._apply(self.engine.exchange(self._payload(f), op=f"f{f}"), f)
                except Stopping as e:
                    log.info("%s", e)
                    kind = STOP
            self._broadcast(kind)
            return
        if step % self.period == 0 and self.leader and self.pending is None:
            self._launch(step)
        if step % self.period == self.tau and step > self.tau:
            if self.leader and self.pending is not None:
                kind = self._finish_pending()
            self._broadcast(kind)

    def _fragment(self) -> int:
        return self.state.round % self.fragments

    def _payload(self, f: int) -> torch.Tensor:
        lo, hi = self.layout.fragments[f]
        delta = self.state.tensors["theta"][lo:hi] - self.layout.fragment_of(self.t.model, f)
        if self.ef is not None:
            return self.ef.quantize_with_feedback(f"f{f}", delta, self.codec)
        return delta

    def _launch(self, step: int) -> None:
        f = self._fragment()
        payload = self._payload(f)
        self.compute_s += time.perf_counter() - self.last_round_end
        fut = self.executor.submit(self.engine.exchange, payload, f"f{f}")
        self.pending = (fut, f, step + self.tau, time.perf_counter())

    def _finish_pending(self) -> int:
        fut, f, _, _ = self.pending
        self.pending = None
        t0 = time.perf_counter()
        try:
            out = fut.result()
        except Stopping as e:
            log.info("%s", e)
            return STOP
        self.t.stall_s += time.perf_counter() - t0
        return self._apply(out, f)

    def _apply(self, out: RoundOutcome, f: int) -> int:
        """Leader: apply a round's outcome to the global state and the local model."""
        if out.kind == "commit" and os.environ.get(FAULT_EXIT_AFTER_COMMIT) == str(out.round):
            log.error("fault injection: exiting right after round %d committed", out.round)
            os._exit(137)  # tests: the crash between the commit and anything written after it
        if out.kind == "heal":
            self.candidate = None
            self._adopt_global()
            self._record_heal(out)
            return HEAL
        lo, hi = self.layout.fragments[f]
        cand, self.candidate = self.candidate, None
        if cand is not None and cand.round == out.round + 1:  # computed (and persisted) before the vote
            self.state.tensors = cand.tensors
        else:
            theta, v = self.state.tensors["theta"], self.state.tensors["velocity"]
            self.outer_opt.step(theta[lo:hi], v[lo:hi], out.mean, round=out.round)
        theta = self.state.tensors["theta"]
        self.state.round = out.round + 1
        self.state.changed()
        self.publish(self.state)
        new_global = theta[lo:hi]
        if self.tau:
            local = self.layout.fragment_of(self.t.model, f)
            new_local = local.mul(self.o.alpha).add_(new_global, alpha=1 - self.o.alpha)
        else:
            new_local = new_global
        self.layout.load_fragment(self.t.model, new_local, f)
        k = self.o.checkpoint_every_rounds
        if k and self.state.round % k == 0:
            self.t.save()  # S_{r+1} on disk: a whole-cluster restart continues from here
        self._record_round(out)
        return COMMIT

    def _adopt_global(self) -> None:
        """After a heal: local parameters <- global ones; step counter <- the state's round."""
        self.layout.load(self.t.model, self.state.tensors["theta"])
        if self.ddp:
            load_optimizer_flat_state(self.t.optimizer, list(self.t.model.parameters()),
                                      [(n, t) for n, t in self.state.tensors.items() if n != "theta"])
        if self.ef is not None:
            self.ef.reset()
        self.t.jump_to_step(self.state.round * self.period)

    def _broadcast(self, kind: int) -> None:
        """Leader -> other ranks: what happened, then the local parameters."""
        if self.t.ctx.enabled:
            kind = self._broadcast_ranks(kind)
        if kind == STOP:  # the leader abandoned the round to shut down: every rank leaves the loop
            self.t.stop_requested = self.t.stop_requested or "SIGTERM"
            self.t.stop_everywhere = True

    def _broadcast_ranks(self, kind: int) -> int:
        info = torch.tensor([kind, self.state.round if self.leader else 0, self.t.step], dtype=torch.long)
        dist.broadcast(info, 0)
        kind, _, step = (int(x) for x in info.tolist())
        if kind in (COMMIT, HEAL):
            for p in self.t.model.parameters():
                dist.broadcast(p.data, 0)
            if kind == HEAL and not self.leader:
                self.t.jump_to_step(step)
        return kind

    # ------------------------------------------------------------------ ddp
    def reduce_gradients(self) -> None:
        """ddp: every rank calls this between backward and the optimizer step."""
        params = list(self.t.model.parameters())
        if self.leader:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                              for p in params])
            self.compute_s += time.perf_counter() - self.last_round_end
            try:
                out = self.engine.exchange(flat, op="grad")
            except Stopping as e:
                log.info("%s", e)
                out = RoundOutcome("stop", self.state.round)
            if out.kind == "stop":
                kind = STOP
            elif out.kind == "heal":
                self._adopt_global()
                self._record_heal(out)
                kind = HEAL
                for p in params:
                    p.grad = None  # the adopted state replaces this step
            else:
                off = 0
                for p in params:
                    n = p.numel()
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(out.mean[off:off + n].view_as(p))
                    off += n
                self._ddp_out = out
                kind = COMMIT
        else:
            kind = NONE
        if self.t.ctx.enabled:
            info = torch.tensor([kind, self.t.step], dtype=torch.long)
            dist.broadcast(info, 0)
            kind = int(info[0])
            if kind == HEAL:
                for p in params:
                    dist.broadcast(p.data, 0)
                    p.grad = None
                if not self.leader:
                    self.t.jump_to_step(int(info[1]))
            elif kind != STOP:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.broadcast(p.grad, 0)
        if kind == STOP:  # shutting down: this step is dropped and every rank leaves the loop
            for p in params:
                p.grad = None
            self.t.stop_requested = self.t.stop_requested or "SIGTERM"
            self.t.stop_everywhere = True
        self.ddp_healed = kind in (HEAL, STOP)

    def after_ddp_step(self) -> None:
        """ddp, leader: the state after the optimizer step becomes S_{round+1}."""
        if not self.leader or getattr(self, "ddp_healed", False):
            return
        out = self._ddp_out
        fresh = GlobalState(self._state_tensors(), round=out.round + 1)
        self.state.tensors, self.state.round = fresh.tensors, fresh.round
        self.state.changed()
        self.publish(self.state)
        self._record_round(out)

    # ------------------------------------------------------------------ records
    def _record_round(self, out: RoundOutcome) -> None:
        now = time.perf_counter()
        round_s = now - self.last_round_end
        self.t.record({"kind": "round", "round": out.round, "quorum_id": out.quorum_id,
                       "quorum_size": len(out.members), "members": out.members, "state_hash": self.state.hash(),
                       "bytes_sent": out.bytes_sent, "bytes_recv": out.bytes_recv, "round_s": round_s,
                       "compute_s": self.compute_s, "comm_s": out.comm_s, "wait_s": out.wait_s,
                       "codec": self.o.codec, "attempts": out.attempts, "step": self.t.step})
        self.last_round_end, self.compute_s = now, 0.0

    def _record_heal(self, out: RoundOutcome) -> None:
        if self.o.checkpoint_every_rounds:
            self.t.save()  # the adopted S_R on disk: this peer can restart (or restart the cluster) from it
        h = out.heal or {}
        self.t.record({"kind": "heal", "round": out.round, "donor": h.get("donor", ""), "bytes": h.get("bytes", 0),
                       "seconds": h.get("seconds", 0.0), "state_hash": self.state.hash(), "reason": h.get("reason", "")})
        self.last_round_end, self.compute_s = time.perf_counter(), 0.0
