"""The ``ddp`` baseline across peers: every inner step is a round whose payload is the gradient.

    before the optimizer step:   mean gradient = exchange(flat gradient)   (sync, all-reduce, commit)
                                 it replaces the local gradient on every rank
    after the optimizer step:    S_{r+1} = (parameters, inner optimizer state)

The global state also holds the inner optimizer's state, so that joiners and
parity checks see everything that must agree. A HEAL adopts the donor's
parameters and optimizer state and drops this step's gradients; a STOP (the
leader gave up waiting to shut down) drops them as well. It is the
synchronous reference DiLoCo is measured against, over the same control
plane and collectives.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

import torch

from ..config import TrainConfig
from ..control.client import Stopping
from ..outer.codecs import get_codec
from ..outer.flat_params import FlatLayout
from ..outer.global_state import GlobalState
from ..wire.outcomes import RoundOutcome
from .component import OuterComponent, restore_global_state
from .optim_state import load_optimizer_flat_state, optimizer_flat_state
from .rank_broadcast import share_event, share_gradients
from .records import RoundClock, heal_record, round_record
from .round_engine import ExchangeResult
from .round_event import RoundEvent
from .session import ExchangeSettings, PeerSession, run_schema_hash

log = logging.getLogger("dtrain")


class DdpBaseline(OuterComponent):
    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        is_leader: bool,
        world_size: int,
        distributed: bool,
        should_stop: Callable[[], bool],
    ):
        outer = cfg.outer
        self.outer_cfg, self.model, self.optimizer = outer, model, optimizer
        self.params: List[torch.nn.Parameter] = list(model.parameters())
        self.layout = FlatLayout(model, 1)
        self.is_leader, self.distributed = is_leader, distributed
        self.clock = RoundClock()
        self.committed: Optional[ExchangeResult] = None  # this step's round, until its S_{r+1} exists
        if not is_leader:
            return
        self.state = GlobalState(self._state_tensors())
        settings = ExchangeSettings(
            outer.backend, outer.streams, int(outer.chunk_mb * 2**20), outer.deadline_s, outer.sync_timeout_s
        )
        self.session = PeerSession(
            cfg.peer_id,
            cfg.control,
            run_schema_hash(cfg),
            self.state,
            get_codec(outer.codec, outer.block_size),
            settings,
            world_size=world_size,
            should_stop=should_stop,
        )

    def _state_tensors(self):
        return [("theta", self.layout.flatten(self.model))] + optimizer_flat_state(self.optimizer, self.params)

    # ------------------------------------------------------------------ lifecycle
    def start(self, step: int) -> RoundEvent:
        event = RoundEvent(step=step)
        if self.is_leader:
            healed = self.session.join()
            if healed is not None:
                event = self._adopt(healed, event)
        if self.distributed:
            event = share_event(event, self.params, self.is_leader)
        return event

    def close(self, leave: bool = True, reason: str = "finished") -> None:
        if self.is_leader:
            self.session.close(leave, reason)

    def state_dict(self) -> dict:
        if not self.is_leader:
            return {}
        return {"round": self.state.round, "tensors": dict(self.state.tensors), "error_feedback": {}}

    def load_state_dict(self, saved: dict) -> None:
        if not self.is_leader or not saved:
            return
        restore_global_state(self.state, saved)

    # ------------------------------------------------------------------ rounds
    def before_optimizer_step(self, step: int) -> RoundEvent:
        """Every rank, between backward and the optimizer step: gradients <- the peers' mean."""
        event = RoundEvent(step=step)
        if self.is_leader:
            event = self._exchange(step)
        if self.distributed:
            event = share_gradients(event, self.params, self.is_leader)
        if event.outcome in (RoundOutcome.HEAL, RoundOutcome.STOP):
            for p in self.params:
                p.grad = None  # the adopted state replaces this step; a stop drops it
        return event

    def _exchange(self, step: int) -> RoundEvent:
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu() for p in self.params]
        )
        self.clock.exchange_starts()
        try:
            result = self.session.engine.exchange(flat, "grad")
        except Stopping as e:
            log.info("%s", e)
            return RoundEvent(RoundOutcome.STOP, step)
        if result.outcome is RoundOutcome.HEAL:
            return self._adopt(result, RoundEvent(step=step))
        assert result.mean is not None
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(result.mean[offset : offset + n].view_as(p))
            offset += n
        self.committed = result
        return RoundEvent(RoundOutcome.COMMIT, step)

    def after_optimizer_step(self, step: int) -> RoundEvent:
        """Leader: the state after the optimizer step becomes S_{round+1}."""
        result, self.committed = self.committed, None
        if not self.is_leader or result is None:
            return RoundEvent(step=step)
        self.session.install(GlobalState(self._state_tensors(), round=result.round + 1))
        return RoundEvent(
            RoundOutcome.COMMIT,
            step,
            records=[round_record(result, self.state, self.clock, self.outer_cfg.codec, step)],
        )

    def _adopt(self, result: ExchangeResult, event: RoundEvent) -> RoundEvent:
        """After a heal: parameters and optimizer state <- the adopted global state."""
        self.layout.load(self.model, self.state.tensors["theta"])
        load_optimizer_flat_state(
            self.optimizer, self.params, [(n, t) for n, t in self.state.tensors.items() if n != "theta"]
        )
        event.outcome, event.step = RoundOutcome.HEAL, self.state.round
        event.records.append(heal_record(result, self.state, self.clock))
        event.checkpoint = bool(self.outer_cfg.checkpoint_every_rounds)
        return event
