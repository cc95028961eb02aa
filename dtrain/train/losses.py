"""Losses of the sandwich rule: hard labels for the largest subnet, in-place
distillation for the others.

Logits of shape [..., C] are flattened to [N, C] (an LM's [B, T, V] too).

- ``hard_loss``: cross-entropy with label smoothing.
- ``kd_loss``: KL(p_t || p_s) at temperature T, scaled by T^2 so gradients keep
  their size as T changes; p = softmax(z / T).
- ``alpha_divergence_loss`` (AlphaNet): for alpha not in {0, 1}

      D_a(p || q) = 1 / (a (a - 1)) * sum_i q_i [ (p_i / q_i)^a - 1 ]

  (a -> 1: KL(p || q), a -> 0: KL(q || p)); per sample the larger of
  D_{alpha_min} and D_{alpha_max} is used. Its gradient in the student
  logits is -(1/a) sum_i q_i w_i grad log q_i with importance weights
  w_i = (p_i / q_i)^a, which are clipped to at most ``iw_clip`` so a teacher
  that is confident where the student is not cannot blow up the step. The
  returned value is the divergence itself; the gradient is that of the
  clipped surrogate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


def hard_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(_flat(logits), targets.reshape(-1), label_smoothing=label_smoothing)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    s = F.log_softmax(_flat(student) / temperature, dim=-1)
    t = F.log_softmax(_flat(teacher).detach() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def _alpha_value(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample D_alpha(p || q) from log-probabilities."""
    p, q = log_p.exp(), log_q.exp()
    if abs(alpha - 1.0) < 1e-6:
        return (p * (log_p - log_q)).sum(-1)
    if abs(alpha) < 1e-6:
        return (q * (log_q - log_p)).sum(-1)
    ratio_a = torch.exp(alpha * (log_p - log_q))
    return ((q * (ratio_a - 1.0)).sum(-1)) / (alpha * (alpha - 1.0))


def _alpha_surrogate(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, iw_clip: float) -> torch.Tensor:
    """Per-sample surrogate whose gradient is the clipped alpha-divergence gradient."""
    a = alpha if abs(alpha) > 1e-6 else 1e-6
    with torch.no_grad():
        w = torch.exp(a * (log_p - log_q)).clamp(max=iw_clip)
        coeff = log_q.exp() * w
    return -(coeff * log_q).sum(-1) / a


def alpha_divergence_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    iw_clip: float = 5.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    log_q = F.log_softmax(_flat(student) / temperature, dim=-1)
    log_p = F.log_softmax(_flat(teacher).detach() / temperature, dim=-1)
    with torch.no_grad():
        v_min = _alpha_value(log_p, log_q.detach(), alpha_min)
        v_max = _alpha_value(log_p, log_q.detach(), alpha_max)
        use_max = v_max >= v_min
        value = torch.where(use_max, v_max, v_min)
    s_min = _alpha_surrogate(log_p, log_q, alpha_min, iw_clip)
    s_max = _alpha_surrogate(log_p, log_q, alpha_max, iw_clip)
    surrogate = torch.where(use_max, s_max, s_min)
    per_sample = value + (surrogate - surrogate.detach())
    return per_sample.mean() * temperature**2


def distill_loss(student, teacher, targets, cfg) -> torch.Tensor:
    """Loss of a small subnet under ``SandwichConfig`` ``cfg``."""
    if cfg.distill == "none":
        return hard_loss(student, targets, cfg.label_smoothing)
    if cfg.distill == "kd":
        soft = kd_loss(student, teacher, cfg.temperature)
    else:
        soft = alpha_divergence_loss(student, teacher, cfg.alpha_min, cfg.alpha_max, cfg.iw_clip, cfg.temperature)
    w = cfg.hard_label_weight
    if w == 0:
        return soft
    return (1 - w) * soft + w * hard_loss(student, targets, cfg.label_smoothing)
