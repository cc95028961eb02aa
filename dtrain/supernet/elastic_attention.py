"""Elastic causal self-attention: the first h heads of a fixed head dim, any embedding width.

The attention width is ``h * head_dim``, independent of the embedding width e
(AutoFormer style). The q/k/v projection is one ``ElasticLinear(E_max ->
3 * H_max * hd)`` laid out head-major: rows ``[3*hd*i, 3*hd*(i+1))`` hold
(q_i, k_i, v_i). Its first ``3 * h * hd`` rows are therefore exactly q, k and v
of the first h heads, so one prefix slice picks the heads consistently:

    [q|k|v] = x W_qkv[:3*h*hd, :e]^T,   y_i = softmax(q_i k_i^T / sqrt(hd) + causal) v_i
    out = [y_1 .. y_h] W_o[:e, :h*hd]^T

The scale 1/sqrt(hd) is the same for every subnet since hd is fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .elastic_linear import ElasticLinear
from .static_gpt import CausalSelfAttention, split_heads_qkv


class ElasticCausalSelfAttention(nn.Module):
    def __init__(self, embed_max: int, heads_max: int, head_dim: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.embed_max, self.heads_max, self.head_dim = embed_max, heads_max, head_dim
        self.dropout = dropout
        self.qkv = ElasticLinear(embed_max, 3 * heads_max * head_dim, bias=bias)
        self.proj = ElasticLinear(heads_max * head_dim, embed_max, bias=bias)
        self.active_heads = heads_max
        self.set_width(embed_max, heads_max)

    def set_width(self, embed: int, heads: int) -> None:
        """Run ``heads`` heads and write back an ``embed``-wide output."""
        self.active_heads = heads
        self.qkv.active_out = 3 * heads * self.head_dim
        self.proj.active_out = embed

    def forward(self, x: torch.Tensor, regularize: bool = False) -> torch.Tensor:
        """x [B, T, e] -> [B, T, e]; attention and output dropout only when ``regularize``."""
        b, t = x.shape[0], x.shape[1]
        h, hd = self.active_heads, self.head_dim
        q, k, v = split_heads_qkv(self.qkv(x), h, hd)
        p = self.dropout if regularize else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = self.proj(y.transpose(1, 2).reshape(b, t, h * hd))
        return F.dropout(y, p, training=True) if p > 0 else y

    def to_static(self, embed: int) -> CausalSelfAttention:
        width = self.active_heads * self.head_dim
        return CausalSelfAttention(
            self.qkv.to_static(embed), self.proj.to_static(width), self.active_heads, self.head_dim, self.dropout
        )

    def extra_repr(self) -> str:
        return (
            f"embed_max={self.embed_max}, heads_max={self.heads_max}, head_dim={self.head_dim}, "
            f"active_heads={self.active_heads}"
        )
