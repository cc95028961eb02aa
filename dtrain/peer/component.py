"""The outer-loop component interface the trainer drives (``factory`` picks the component).

The trainer calls every rank's component at fixed points of its loop and acts
on the :class:`RoundEvent` each call returns (see ``round_event``):

    start(step)                       once, after resuming: join the run (heal first when behind)
    per inner step:
      before_optimizer_step(step)     gradients are ready (the ddp baseline averages them here)
      after_optimizer_step(step)      the step is taken (the ddp baseline commits S_{r+1} here)
      after_step(step, step_s)        between steps (DiLoCo rounds run here); step_s: how long the step took
    finish(step)                      end of training: apply an exchange still in flight
    use_global_parameters()           the run's result is the global model
    close(leave, reason)              leave the run (or let the lease lapse), stop serving

``state_dict()`` / ``load_state_dict()`` put the component's state (the global
state S_r, error-feedback residuals) into the trainer's checkpoint and back.
The hooks a component does not need return an empty event.
"""

from __future__ import annotations

from ..config import ConfigError
from ..outer.global_state import GlobalState, StateError
from .round_event import RoundEvent


class OuterComponent:
    """No-op defaults; :class:`~dtrain.peer.diloco.DilocoLoop` and
    :class:`~dtrain.peer.ddp_baseline.DdpBaseline` override what they use."""

    def start(self, step: int) -> RoundEvent:
        return RoundEvent(step=step)

    def before_optimizer_step(self, step: int) -> RoundEvent:
        return RoundEvent(step=step)

    def after_optimizer_step(self, step: int) -> RoundEvent:
        return RoundEvent(step=step)

    def after_step(self, step: int, step_s: float = 0.0) -> RoundEvent:
        return RoundEvent(step=step)

    def finish(self, step: int) -> RoundEvent:
        return RoundEvent(step=step)

    def use_global_parameters(self) -> None:
        """Load the global parameters into the model on every rank (no-op where they are the same)."""

    def close(self, leave: bool = True, reason: str = "finished") -> None:
        """Leave the run and release the network (leader); no-op on other ranks."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (ConfigError when it belongs to other settings)."""


def restore_global_state(state: GlobalState, saved: dict) -> None:
    """A checkpoint's global state (its ``tensors`` and ``round``) into ``state``; ConfigError when the
    checkpoint belongs to other settings (other tensors or sizes)."""
    try:
        state.replace(saved["tensors"], int(saved["round"]))
    except StateError as e:
        raise ConfigError(
            f"the checkpoint holds another outer state ({e}): use the same outer.*, optim.* and model.* "
            "settings or a new run_dir"
        ) from None
