"""DiLoCo rounds in a training peer: the outer-loop component of ``outer.name=diloco``.

Every ``P = sync_every / fragments`` inner steps the peer runs one round, for
fragment ``f = round mod fragments``:

    delta_f  = theta_global[f] - theta_local[f]            (the pseudo-gradient)
    payload  = delta_f   (+ error feedback, on the codec's grid)
    S_{r+1}  = exchange(payload): sync, all-reduce mean, prepare, commit   (``round_engine``)
               prepare: S_{r+1} = outer Nesterov step of S_r with the mean (``GlobalState.outer_step``),
                        written to disk before the vote when ``outer.durable_commit``
    theta_local[f] <- theta_global[f]                       (tau = 0)
    theta_local[f] <- alpha * theta_local[f] + (1 - alpha) * theta_global[f]   (tau > 0)

With ``overlap_steps = tau > 0`` the exchange runs in a background thread
while inner steps go on, and its result is applied tau steps later (tau = 1
is the one-step-delayed "eager" update). If the coordinator says HEAL, the
peer adopts the donor's global state, sets theta_local to it, and continues
from the inner step of the state's round (``RoundEvent.step``).

Schedule, known to every rank: round exchanges start when ``step % P == 0``;
with tau = 0 they are applied at once, else at ``step % P == tau``. Only the
leader (rank 0) talks to the network; the other ranks wait in the broadcast
of each boundary's event (``rank_broadcast``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import faults
from ..config import TrainConfig
from ..control.client import Stopping, SyncReport
from ..control.work_plan import probe_steps
from ..outer.codecs import get_codec
from ..outer.error_feedback import ErrorFeedback
from ..outer.flat_params import FlatLayout
from ..outer.global_state import GlobalState
from ..outer.outer_opt import OuterNesterov
from ..supernet.base import Supernet
from ..supernet.capacity import sandwich_macs
from ..wire.outcomes import RoundOutcome
from .component import OuterComponent, restore_global_state
from .durable_commit import DurableCommit
from .rank_broadcast import share_event
from .records import RoundClock, heal_record, round_record
from .round_engine import ExchangeResult
from .round_event import RoundEvent
from .session import ExchangeSettings, PeerSession, run_schema_hash, work_plan
from .slices import SliceBook, slice_spec
from .step_rate import StepRate

log = logging.getLogger("dtrain")


class DilocoLoop(OuterComponent):
    def __init__(
        self,
        cfg: TrainConfig,
        model: Supernet,
        *,
        is_leader: bool,
        world_size: int,
        distributed: bool,
        run_dir: str,
        should_stop: Callable[[], bool],
        ladder: Optional[List[Optional[dict]]] = None,
        slice_masks: Optional[Dict[str, torch.Tensor]] = None,
    ):
        outer = cfg.outer
        self.outer_cfg, self.model = outer, model
        self.layout = FlatLayout(model, outer.fragments)
        self.fragments = len(self.layout.fragments)
        self.period = outer.sync_every // outer.fragments
        self.tau = outer.overlap_steps
        self.is_leader, self.distributed = is_leader, distributed
        self.pending: Optional[Tuple[concurrent.futures.Future, int]] = None  # (exchange, fragment)
        self.clock = RoundClock()
        # balanced rounds (every rank): the round began at the nominal step round * H; this peer trains
        # local_steps in it (0: it sits out and takes one untrained probe step) and exchanges at next_boundary
        self.balanced = outer.local_steps == "balanced"
        self.batch_size = cfg.batch_size
        # the steps of a round nobody assigned (round 0, after a heal): H, or a short probe round while balanced
        self.unassigned_steps = probe_steps(work_plan(cfg)) if self.balanced else self.period
        self.round_start, self.local_steps, self.next_boundary = 0, self.period, self.period
        self.rate = StepRate()
        self.comm_s = 0.0  # moving average of the collective's seconds (the adaptive deadline)
        if not is_leader:
            return
        self.codec = get_codec(outer.codec, outer.block_size)
        self.error_feedback = ErrorFeedback() if outer.error_feedback else None
        self.outer_opt = OuterNesterov(
            outer.lr, outer.momentum, outer.nesterov, outer.lr_schedule, total_rounds=max(1, cfg.steps // self.period)
        )
        theta = self.layout.flatten(model)
        self.state = GlobalState([("theta", theta), ("velocity", torch.zeros_like(theta))])
        self.schema = run_schema_hash(cfg)
        self.durable = (
            DurableCommit(os.path.join(run_dir, "checkpoints", "next_global.pt"), self.schema)
            if outer.durable_commit
            else None
        )
        # capacity: this peer trains (and sends) only its top arch's slice; every member's mask comes from
        # the top arch it announces. capacity=auto: the ladder of top archs it may step down (and back up)
        self.ladder: List[Optional[dict]] = list(ladder or [None])
        self.level = 0
        self.level_rates: Dict[int, float] = {}  # the rate last measured at each level
        self.min_local_steps, self.num_random = outer.min_local_steps, cfg.sandwich.num_random
        self.slices = SliceBook(model)
        self.slice_spec = slice_spec(model.space, self.ladder[0])
        if self.ladder[0] is not None and slice_masks is not None:
            self.slices.add(self.slice_spec, slice_masks)
        self.mask = self.slices.flat_mask(self.slice_spec)
        self.slice_fraction = 1.0 if self.mask is None else int(self.mask.sum()) / self.mask.numel()
        settings = ExchangeSettings(
            outer.backend,
            outer.streams,
            int(outer.chunk_mb * 2**20),
            outer.deadline_s,
            outer.sync_timeout_s,
            outer.weighting,
        )
        self.session = PeerSession(
            cfg.peer_id,
            cfg.control,
            self.schema,
            self.state,
            self.codec,
            settings,
            world_size=world_size,
            should_stop=should_stop,
            plan=work_plan(cfg),
            slice=self.slice_spec,
            slices=self.slices.flat_mask,
        )
        self.join_timeout_s = cfg.control.join_timeout_s
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outer") if self.tau else None

    # ------------------------------------------------------------------ lifecycle
    def start(self, step: int) -> RoundEvent:
        """Join the run; adopt a state persisted before a committed vote, or heal when behind."""
        event = RoundEvent(step=step)
        if self.is_leader:
            recovered = self._recover()
            if recovered is not None:
                event = recovered
            healed = self.session.join()
            if healed is not None:
                event = self._adopt(healed, event)
            event.capacity_level = self.level  # the trainer trains within this level's top arch
        event = self._share(event)
        self._begin_round(event.step - event.step % self.period, self.unassigned_steps)
        return event

    def finish(self, step: int) -> RoundEvent:
        """Every rank, at the end of training: apply an exchange still in flight (overlap)."""
        if not self.tau:
            return RoundEvent(step=step)
        event = RoundEvent(step=step)
        if self.is_leader and self.pending is not None:
            event = self._finish_pending(step)
        return self._share(event)

    def use_global_parameters(self) -> None:
        """The run's result is the global model (local parameters differ by < H steps)."""
        if self.is_leader:
            self.layout.load(self.model, self.state.tensors["theta"])
        if self.distributed:
            share_event(RoundEvent(RoundOutcome.COMMIT), self.model.parameters(), self.is_leader)

    def close(self, leave: bool = True, reason: str = "finished") -> None:
        if not self.is_leader:
            return
        if self.pending is not None:
            self.pending[0].cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close(leave, reason)

    def state_dict(self) -> dict:
        if not self.is_leader:
            return {}
        ef = self.error_feedback
        return {
            "round": self.state.round,
            "tensors": dict(self.state.tensors),
            "error_feedback": ef.state_dict() if ef is not None else {},
            "capacity_level": self.level,
        }

    def load_state_dict(self, saved: dict) -> None:
        if not self.is_leader or not saved:
            return
        restore_global_state(self.state, saved)
        level = int(saved.get("capacity_level", 0))
        if 0 < level < len(self.ladder):  # capacity=auto had stepped down: resume within that top arch
            self._set_level(level)
        if self.error_feedback is not None and saved.get("error_feedback"):
            self.error_feedback.load_state_dict(saved["error_feedback"])

    # ------------------------------------------------------------------ rounds
    def _begin_round(self, start_step: int, local_steps: int) -> None:
        self.round_start, self.local_steps = start_step, local_steps
        self.next_boundary = start_step + max(1, local_steps)

    def _at_boundary(self, step: int) -> bool:
        if self.balanced:
            return step >= self.next_boundary
        return step % self.period == 0

    def after_step(self, step: int, step_s: float = 0.0) -> RoundEvent:
        """Every rank, after each inner step: run, finish or apply this step's round (see the docstring)."""
        self.rate.observe(step_s)
        if self.tau == 0:
            if not self._at_boundary(step):
                return RoundEvent(step=step)
            event = RoundEvent(step=step)
            if self.is_leader:
                fragment = self.state.round % self.fragments
                self.clock.exchange_starts()
                try:
                    event = self._exchange(fragment, step)
                except Stopping as e:
                    log.info("%s", e)
                    event = RoundEvent(RoundOutcome.STOP, step)
            event = self._share(event)
            if event.outcome in (RoundOutcome.COMMIT, RoundOutcome.HEAL):
                self._begin_round(event.step, event.local_steps if event.local_steps >= 0 else self.unassigned_steps)
            return event
        if step % self.period == 0 and self.is_leader and self.pending is None:
            self._launch()
        if step % self.period == self.tau and step > self.tau:
            event = RoundEvent(step=step)
            if self.is_leader and self.pending is not None:
                event = self._finish_pending(step)
            return self._share(event)
        return RoundEvent(step=step)

    def _exchange(self, fragment: int, step: int) -> RoundEvent:
        """Leader, blocking round: report this round's work, exchange, apply."""
        trained = step - self.round_start
        sits_out = self.balanced and self.local_steps == 0
        samples = 0 if sits_out else trained * self.batch_size
        report = SyncReport(self.rate.steps_per_s, 0 if sits_out else trained, samples)
        if sits_out:  # weight 0: its probe step is not sent, and error feedback keeps its residual
            lo, hi = self.layout.fragments[fragment]
            payload = torch.zeros(hi - lo if self.mask is None else int(self.mask.sum()), dtype=torch.float32)
        else:
            ef_weight = float(samples) if self.balanced and self.outer_cfg.weighting == "samples" else 1.0
            payload = self._payload(fragment, ef_weight)
        self._adapt_deadline()
        result = self.session.engine.exchange(payload, f"f{fragment}", self._prepare, report)
        event = self._apply(result, fragment, step)
        for rec in event.records:
            rec.update(
                steps=trained,
                sat_out=sits_out,
                steps_lost=trained if (sits_out or rec["kind"] == "heal") else 0,
                step_rate=report.step_rate,
            )
        return event

    def _adapt_deadline(self) -> None:
        """The collective's deadline follows its measured time: 4x the moving average, between
        ``outer.deadline_min_s`` and ``outer.deadline_s``."""
        cap = self.outer_cfg.deadline_s
        floor = min(self.outer_cfg.deadline_min_s, cap)
        self.session.engine.deadline_s = cap if not self.comm_s else min(cap, max(floor, 4.0 * self.comm_s))

    def _payload(self, fragment: int, ef_weight: float = 1.0) -> torch.Tensor:
        lo, hi = self.layout.fragments[fragment]
        delta = self.state.tensors["theta"][lo:hi] - self.layout.fragment_of(self.model, fragment)
        if self.mask is not None:  # only the slice travels (capacity requires one fragment: lo, hi = 0, N)
            delta = delta[self.mask]
        if self.error_feedback is not None:
            return self.error_feedback.quantize_with_feedback(f"f{fragment}", delta, self.codec, ef_weight)
        return delta

    def _prepare(
        self, round: int, quorum_id: int, mean: torch.Tensor, covered: Optional[torch.Tensor] = None
    ) -> GlobalState:
        """Before the vote on ``round``: S_{round+1}, computed once; on disk first with durable commit."""
        span = self.layout.fragments[round % self.fragments]
        nxt = self.state.outer_step(mean, span, self.outer_opt, covered)
        if self.durable is not None:
            self.durable.persist(nxt, quorum_id, self.state.hash())
        return nxt

    def _launch(self) -> None:
        fragment = self.state.round % self.fragments
        payload = self._payload(fragment)
        self.clock.exchange_starts()
        assert self.executor is not None
        future = self.executor.submit(self.session.engine.exchange, payload, f"f{fragment}", self._prepare)
        self.pending = (future, fragment)

    def _finish_pending(self, step: int) -> RoundEvent:
        assert self.pending is not None
        future, fragment = self.pending
        self.pending = None
        t0 = time.perf_counter()
        try:
            result = future.result()
        except Stopping as e:
            log.info("%s", e)
            return RoundEvent(RoundOutcome.STOP, step)
        stall_s = time.perf_counter() - t0
        event = self._apply(result, fragment, step)
        event.stall_s = stall_s
        return event

    def _apply(self, result: ExchangeResult, fragment: int, step: int) -> RoundEvent:
        """Leader: install a committed round's S_{r+1} (or take a heal) and update the local model."""
        if result.outcome is RoundOutcome.HEAL:
            return self._adopt(result, RoundEvent(step=step))
        faults.point("after_commit", round=result.round)
        assert result.next_state is not None, "a committed DiLoCo round carries the state prepared for it"
        self.session.install(result.next_state)
        new_global = self.state.tensors["theta"][slice(*self.layout.fragments[fragment])]
        if self.tau:
            local = self.layout.fragment_of(self.model, fragment)
            alpha = self.outer_cfg.alpha
            new_local = local.mul(alpha).add_(new_global, alpha=1 - alpha)
        else:
            new_local = new_global
        self.layout.load_fragment(self.model, new_local, fragment)
        self.comm_s = result.comm_s if not self.comm_s else 0.7 * self.comm_s + 0.3 * result.comm_s
        every = self.outer_cfg.checkpoint_every_rounds
        record = round_record(result, self.state, self.clock, self.outer_cfg.codec, step)
        record.update(
            local_steps=result.steps,
            next_local_steps=result.next_steps,
            weights=list(result.weights) or [1] * len(result.members),
            slice_fraction=self.slice_fraction,
        )
        next_steps = result.next_steps.get(self.session.peer_id, self.period) if self.balanced else self.period
        level, predicted = self._pick_level(result)
        record.update(capacity_level=self.level, next_capacity_level=level)
        if level != self.level:
            self._switch_level(level)
            next_steps = predicted  # assigned from the old level's rate; this is what the new level allows
        # balanced: the next round starts at its nominal step round * H, whatever this peer trained
        next_step = self.state.round * self.period if self.balanced else step
        return RoundEvent(
            RoundOutcome.COMMIT,
            next_step,
            records=[record],
            checkpoint=bool(every) and self.state.round % every == 0,
            local_steps=next_steps,
            capacity_level=self.level,
        )

    def _pick_level(self, result: ExchangeResult) -> Tuple[int, int]:
        """capacity=auto: the ladder level for the next round, and the steps it should allow.

        Each level's rate: the one measured there, scaled by how much this peer's speed changed since (the
        current level's rate now over when last measured); for a level never trained, the current rate
        scaled by the ratio of the levels' sandwich MACs. With the fastest member's rate (the quorum's
        reports), a level L allows ``floor(H * min(1, rate_L / fastest))`` steps. Take the largest
        capacity (lowest level) that allows at least ``max(1, outer.min_local_steps)`` steps, so the peer
        does not sit out for being slow while a smaller top arch would let it train; stepping back up to a
        larger one needs twice that (no flapping)."""
        mine, fastest = self.rate.steps_per_s, max(result.rates.values(), default=0.0)
        if len(self.ladder) == 1 or not self.balanced or mine <= 0 or fastest <= 0:
            return self.level, -1
        before = self.level_rates.get(self.level, mine)
        self.level_rates[self.level] = mine
        macs = [sandwich_macs(self.model, top, self.num_random) for top in self.ladder]
        floor_steps = max(1, self.min_local_steps)

        def rate_at(level: int) -> float:
            if level == self.level:
                return mine
            if level in self.level_rates:
                return self.level_rates[level] * mine / before
            return mine * macs[self.level] / macs[level]

        def allowed(level: int) -> int:
            return math.floor(self.period * min(1.0, rate_at(level) / fastest))

        for level in range(len(self.ladder)):
            if allowed(level) >= floor_steps * (2 if level < self.level else 1):
                return level, allowed(level)
        return len(self.ladder) - 1, allowed(len(self.ladder) - 1)

    def _set_level(self, level: int) -> None:
        """Train within the top arch of ladder ``level``: its slice is what this peer sends and announces."""
        self.level = level
        self.slice_spec = slice_spec(self.model.space, self.ladder[level])
        self.mask = self.slices.flat_mask(self.slice_spec)
        self.slice_fraction = 1.0 if self.mask is None else int(self.mask.sum()) / self.mask.numel()
        self.session.client.slice = self.slice_spec

    def _switch_level(self, level: int) -> None:
        """Train within another top arch from the next round: announce its slice (re-join), restart the
        rate measurement and error feedback (the slice, and so the payload, changes)."""
        self._set_level(level)
        self.rate = StepRate(skip=0)
        if self.error_feedback is not None:
            self.error_feedback.reset()
        self.session.announce_slice(self.slice_spec)
        log.info("capacity=auto: level %d of %d, slice %.1f%%", level, len(self.ladder), 100 * self.slice_fraction)

    def _adopt(self, result: ExchangeResult, event: RoundEvent) -> RoundEvent:
        """After a heal: local parameters <- global ones; continue from the state's round."""
        self.layout.load(self.model, self.state.tensors["theta"])
        if self.error_feedback is not None:
            self.error_feedback.reset()
        event.outcome, event.step = RoundOutcome.HEAL, self.state.round * self.period
        if self.balanced and self.session.peer_id in result.next_steps:  # the coordinator's assignment
            event.local_steps = result.next_steps[self.session.peer_id]
        event.records.append(heal_record(result, self.state, self.clock))
        # the adopted S_R on disk: this peer can restart (or restart the cluster) from it
        event.checkpoint = bool(self.outer_cfg.checkpoint_every_rounds)
        return event

    def _recover(self) -> Optional[RoundEvent]:
        """Durable commit: continue from S_{r+1} persisted before a vote that committed."""
        if self.durable is None:
            return None
        nxt = self.durable.recover(self.state, lambda: self.session.client.status().commits, self.join_timeout_s)
        if nxt is None:
            return None
        self.state.install(nxt)
        result = ExchangeResult(RoundOutcome.HEAL, nxt.round)
        event = self._adopt(result, RoundEvent())
        event.records[-1].update(
            donor=self.session.peer_id, reason="state written before the vote of a committed round"
        )
        return event

    def _share(self, event: RoundEvent) -> RoundEvent:
        """Leader -> other ranks (when there are any): the boundary's outcome, step and parameters."""
        if self.distributed:
            return share_event(event, self.model.parameters(), self.is_leader)
        return event
