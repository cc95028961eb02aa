"""Error feedback (EF-SGD style) for lossy pseudo-gradient codecs.

Each named vector (e.g. the flat pseudo-gradient of one fragment) keeps a
residual e, zero at first. In round t, with pseudo-gradient x_t and codec Q
(Q(v) = decode(encode(v))):

    v_t     = x_t + e_t          (compensate: add back what was dropped before)
    x̂_t     = Q(v_t)             (what is actually transmitted)
    e_{t+1} = v_t - x̂_t          (update: what the quantisation dropped this round)

Summing over rounds, sum_t x̂_t = sum_t x_t + e_0 - e_{T}: the transmitted
values track the true ones up to a single residual, which stays bounded by the
codec's per-round error (|e| <= s'/2 per element for int8 / int4) instead of
accumulating. Small, consistent updates that a block scale would round to zero
every round are therefore delivered eventually rather than lost.

Because the codecs' grids are fixed points (re-encoding x̂ gives the same
bytes), x̂_t can be handed to the collective, which encodes it again without
further loss.

Weighted rounds (``outer.weighting=samples``): member i's x̂_t enters the mean
with weight w_t (the samples it trained in round t), so what the quantisation
dropped counted w_t * (v_t - x̂_t) there. The residual is kept in those
weighted units and divided by the next round's own weight when compensating:

    v_t     = x_t + e_t / w_t,     e_{t+1} = w_t * (v_t - x̂_t)

so sum_t w_t * x̂_t tracks sum_t w_t * x_t the same way. With w = 1 it is
the rule above, bit for bit; with any other constant w, the same rule up to
float32 rounding of (w * d) / w (bit for bit when w is a power of two). A round
in which the member sits out (w = 0) sends nothing and leaves e unchanged.

When an exchange can fail, use the two-step form: ``v = compensate(name, x)``,
quantise, and call ``update(name, v, x̂)`` only once the round succeeded (a
failed round leaves the residual untouched). ``quantize_with_feedback`` does
all three at once. Residuals cost one float32 copy of each vector.
"""

from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional

import torch

from dtrain.wire.codec import Codec


def _check_vec(what: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1 or t.device.type != "cpu":
        desc = f"{t.dim()}-D {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: expected a 1-D float32 CPU tensor, got {desc}")


class ErrorFeedback:
    """Per-name residuals e; see the module docstring for the math."""

    def __init__(self) -> None:
        self._residual: Dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._residual

    def names(self) -> Iterator[str]:
        return iter(sorted(self._residual))

    def residual(self, name: str) -> Optional[torch.Tensor]:
        """The current residual of ``name`` (a view, do not modify), or None if zero/unset."""
        return self._residual.get(name)

    def compensate(self, name: str, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """x + e / weight as a new tensor (x itself is not modified)."""
        _check_vec(f"error feedback {name!r}", x)
        e = self._residual.get(name)
        if e is None:
            return x.detach().clone(memory_format=torch.contiguous_format)
        if e.shape != x.shape:
            raise ValueError(
                f"error feedback {name!r}: residual has {e.numel()} values but the "
                f"input has {x.numel()}; reset() after changing the parameter layout"
            )
        if weight <= 0:
            raise ValueError(
                f"error feedback {name!r}: weight={weight} must be > 0 (a member that sits out "
                "sends nothing and skips error feedback)"
            )
        return x.detach() + (e if weight == 1.0 else e / weight)

    def update(self, name: str, sent_exact: torch.Tensor, sent_decoded: torch.Tensor, weight: float = 1.0) -> None:
        """e = weight * (sent_exact - sent_decoded), where sent_exact is what compensate returned."""
        _check_vec(f"error feedback {name!r} (exact)", sent_exact)
        _check_vec(f"error feedback {name!r} (decoded)", sent_decoded)
        if sent_exact.shape != sent_decoded.shape:
            raise ValueError(
                f"error feedback {name!r}: exact has {sent_exact.numel()} values, decoded has {sent_decoded.numel()}"
            )
        dropped = (sent_exact.detach() - sent_decoded.detach()).contiguous()
        self._residual[name] = dropped if weight == 1.0 else dropped.mul_(weight)

    def quantize_with_feedback(self, name: str, x: torch.Tensor, codec: Codec, weight: float = 1.0) -> torch.Tensor:
        """x̂ = decode(encode(x + e / w)); sets e = w * ((x + e / w) - x̂); returns x̂ (on the codec grid)."""
        v = self.compensate(name, x, weight)
        if codec.lossless:
            self._residual.pop(name, None)  # nothing is dropped: e = 0
            return v
        x_hat = codec.decode(codec.encode(v), v.numel())
        self.update(name, v, x_hat, weight)
        return x_hat

    def reset(self, name: Optional[str] = None) -> None:
        """Forget every residual (or only ``name``'s)."""
        if name is None:
            self._residual.clear()
        else:
            self._residual.pop(name, None)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """{name: residual} as independent copies (for checkpoints)."""
        return {k: v.clone() for k, v in sorted(self._residual.items())}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace all residuals with copies of ``state``'s (validated: 1-D finite float32)."""
        new: Dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if not isinstance(k, str):
                raise ValueError(f"error feedback state: expected str keys, got {k!r}")
            _check_vec(f"error feedback state {k!r}", v)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"error feedback state {k!r}: residual has non-finite values")
            new[k] = v.detach().clone(memory_format=torch.contiguous_format)
        self._residual = new
