"""Static GPT networks built from plain torch layers.

``extract`` on the gpt supernet fills these with copied weights. They hold no
elastic logic and script with TorchScript. A block is pre-LN:

    x = x + Dropout(Attn(LN1(x)));   x = x + Dropout(MLP(LN2(x)))

The fused q/k/v projection is laid out head-major: output rows
``[3*hd*i : 3*hd*(i+1)]`` are (q, k, v) of head i, each ``hd`` rows. Dropout
(embedding, attention, residual) acts in training mode, as in any torch model;
the supernet's drop-path is a supernet-training device and is not carried over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads_qkv(qkv: torch.Tensor, n_heads: int, head_dim: int):
    """[B, T, 3*n_heads*head_dim] (head-major q,k,v) -> q, k, v each [B, n_heads, T, head_dim]."""
    b, t = qkv.shape[0], qkv.shape[1]
    qkv = qkv.view(b, t, n_heads, 3, head_dim).permute(3, 0, 2, 1, 4)
    return qkv[0], qkv[1], qkv[2]


class CausalSelfAttention(nn.Module):
    def __init__(self, qkv: nn.Linear, proj: nn.Linear, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.n_heads, self.head_dim = n_heads, head_dim
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        q, k, v = split_heads_qkv(self.qkv(x), self.n_heads, self.head_dim)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class GPTBlock(nn.Module):
    def __init__(self, ln1: nn.LayerNorm, attn: CausalSelfAttention, ln2: nn.LayerNorm, mlp: MLP):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class StaticGPT(nn.Module):
    """Token + position embedding -> blocks -> final LN -> LM head (tied to the token embedding)."""

    def __init__(
        self,
        tok_emb: nn.Embedding,
        pos_emb: nn.Embedding,
        blocks: nn.Sequential,
        ln_f: nn.LayerNorm,
        dropout: float,
        tie: bool = True,
    ):
        super().__init__()
        self.tok_emb, self.pos_emb, self.blocks, self.ln_f = tok_emb, pos_emb, blocks, ln_f
        self.dropout = nn.Dropout(dropout)
        vocab, embed = tok_emb.weight.shape
        self.lm_head = nn.Linear(embed, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.tok_emb.weight
        else:
            with torch.no_grad():
                self.lm_head.weight.copy_(tok_emb.weight)
        self.block_size = pos_emb.weight.shape[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(
                f"input has {t} tokens but the model's context (block_size) is "
                f"{self.block_size}: crop or split the sequence"
            )
        pos = torch.arange(t, device=idx.device)
        h = self.dropout(self.tok_emb(idx) + self.pos_emb(pos))
        h = self.ln_f(self.blocks(h))
        return self.lm_head(h)
