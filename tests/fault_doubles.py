"""Misbehaving collectives for the fault tests: stand-ins that ``fault_plugin.wrap("collective", ...)`` returns.

Loaded by the plugin inside the peer process (it imports torch and dtrain); the test process never needs it.

- :class:`PoisonedCollective`: sends garbage through the peer's own collective: NaN input (what gloo's native
  fp32 sum sends) and, for the call, a :class:`PoisonedCodec` in place of its codec (what every other path
  sends). Hostile (the default): it claims success whatever the collective saw, so the peer votes ok; only
  the receivers' reports keep the garbage out. Honest: it notices its own garbage and votes not ok.
- :class:`SlowPushCollective`: the grpc collective with a pause before every shard chunk it sends, so that a
  collective lasts long enough to be interrupted (optionally only in its first attempt).
"""

from __future__ import annotations

import logging
import time

import torch

from dtrain.comm.collective import Collective, CollectiveError, CollectiveResult, Group
from dtrain.wire.codec import Codec, CodecError

log = logging.getLogger("dtrain.faults")


class PoisonedCodec(Codec):
    """Encodes garbage of the right length: NaN floats, or invalid int scales.

    ``notice=False``: decoding garbage gives zeros instead of a CodecError, i.e. this peer does not notice
    its own garbage (the others' codecs still refuse it)."""

    def __init__(self, inner: Codec, notice: bool = True):
        self.inner, self.name, self.notice = inner, inner.name, notice
        self.block_size = getattr(inner, "block_size", 1)  # the grpc collective aligns shards on it

    @property
    def lossless(self) -> bool:  # the gloo collective picks its algorithm by it: same as everyone's
        return self.inner.lossless

    def encoded_size(self, numel: int) -> int:
        return self.inner.encoded_size(numel)

    def encode(self, x: torch.Tensor) -> bytes:
        if self.inner.name == "fp32":
            return torch.full((x.numel(),), float("nan")).numpy().tobytes()
        return b"\xff" * self.inner.encoded_size(x.numel())

    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        try:
            return self.inner.decode(payload, numel)
        except CodecError:
            if self.notice:
                raise
            return torch.zeros(numel)


class PoisonedCollective(Collective):
    """Garbage through ``target`` (the peer's real collective, whose codec is swapped for the call), run by
    ``inner`` (``target`` itself or a stand-in around it). The same collective object, so gloo reuses the
    quorum's process group as everyone else does. ``hostile``: return zeros and claim success whatever the
    collective saw; they are never applied, since the receivers refuse the garbage and vote not ok."""

    def __init__(self, inner: Collective, target: Collective, hostile: bool):
        self.inner, self.target, self.name, self.hostile = inner, target, inner.name, hostile

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        codec = self.target.codec
        self.target.codec = PoisonedCodec(codec, notice=not self.hostile)
        try:
            return self.inner.allreduce_mean(torch.full_like(flat, float("nan")), group, deadline_s)
        except CollectiveError as e:
            if not self.hostile:
                raise
            log.warning("poisoned round %d: ignoring the failed collective and voting ok (%s)", group.round, e)
            return CollectiveResult(torch.zeros_like(flat), 0, 0, 0.0)
        finally:
            self.target.codec = codec

    def close(self) -> None:
        self.inner.close()


class SlowPushCollective(Collective):
    """A grpc collective (``inner``) that sleeps ``pause_s`` before every shard chunk it sends.

    The plugin makes one per round; ``first_attempt_only``: only its first ``allreduce_mean`` (the round's
    first quorum) is slow, so that the retry is as quick as any other round."""

    def __init__(self, inner: Collective, pause_s: float, first_attempt_only: bool):
        self.inner, self.name, self.pause_s, self.first_attempt_only = inner, inner.name, pause_s, first_attempt_only
        self.calls = 0

    def allreduce_mean(self, flat: torch.Tensor, group: Group, deadline_s: float) -> CollectiveResult:
        self.calls += 1
        if self.first_attempt_only and self.calls > 1:
            return self.inner.allreduce_mean(flat, group, deadline_s)
        chunks, pause = self.inner._chunks, self.pause_s  # GrpcCollective: the generator of one push's chunks

        def slow_chunks(*args, **kwargs):
            for msg in chunks(*args, **kwargs):
                time.sleep(pause)
                yield msg

        self.inner._chunks = slow_chunks  # this call's pushes only (an instance attribute over the method)
        try:
            return self.inner.allreduce_mean(flat, group, deadline_s)
        finally:
            del self.inner._chunks

    def close(self) -> None:
        self.inner.close()
