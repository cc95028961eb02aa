"""This peer's measured inner-step rate: a moving average of its own step times.

The trainer times every inner step (forward, backward, optimizer step, and
the sleep of an emulated slower machine), never evaluation or checkpoints:
the rate is what the machine delivers, however it is slowed (another job,
throttling, a smaller GPU, ``emulated_speed``). A change of speed shows in
the average within a few steps (``alpha`` is the weight of the newest). The
first step of a process is not counted: it pays for one-off work (imports,
allocator and kernel warm-up) that would make the peer look slow for rounds.
"""

from __future__ import annotations


class StepRate:
    def __init__(self, alpha: float = 0.3, skip: int = 1):
        self.alpha, self.skip = alpha, skip
        self.mean_s = 0.0  # moving average of step seconds; 0: nothing measured yet

    def observe(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.skip > 0:
            self.skip -= 1
            return
        self.mean_s = seconds if not self.mean_s else (1 - self.alpha) * self.mean_s + self.alpha * seconds

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.mean_s if self.mean_s else 0.0
