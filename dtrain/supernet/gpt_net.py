"""The GPT supernet: a decoder-only byte-level LM with elastic depth, width, heads, MLP ratio.

Layout: token embedding (V x E_max, tied with the LM head) + learned position
embedding (block_size x E_max) -> pre-LN blocks -> final LN -> LM head. A
subnet with embedding width e uses the first e columns of both embeddings and
the first e entries / rows / columns of every layer norm and linear layer that
touches the residual stream; depth d runs the first d blocks; block i runs
``heads[i]`` heads of the fixed head dim and an MLP of hidden width
``mlp_ratio[i] * e``:

    x = x + DropPath(Dropout(Attn(LN1(x))));   x = x + DropPath(Dropout(MLP(LN2(x))))
    logits = LN_f(x) W_tok[:, :e]^T

Dropout (embedding, attention, residual) and drop-path (per sample, rate
growing linearly to ``drop_path`` at the last of the max-depth blocks) act only
inside ``regularized()`` in training mode. Init: N(0, 0.02) for linear weights
and embeddings, zero biases, and N(0, 0.02 / sqrt(2 * max_depth)) for the two
projections that write into the residual stream (GPT-2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import activations as act
from . import static_gpt as S
from .base import Supernet
from .drop_path import drop_path
from .elastic_attention import ElasticCausalSelfAttention
from .elastic_linear import ElasticLinear
from .elastic_norm import ElasticLayerNorm
from .gpt_cost import gpt_cost
from .gpt_space import GPTSpace


class ElasticMLP(nn.Module):
    """fc1 (e -> r*e) -> GELU -> fc2 (r*e -> e), hidden units sliced as a prefix."""

    def __init__(self, embed_max: int, ratio_max: int, dropout: float, bias: bool):
        super().__init__()
        self.fc1 = ElasticLinear(embed_max, ratio_max * embed_max, bias=bias)
        self.fc2 = ElasticLinear(ratio_max * embed_max, embed_max, bias=bias)
        self.dropout = dropout

    def set_width(self, embed: int, ratio: int) -> None:
        self.fc1.active_out, self.fc2.active_out = ratio * embed, embed

    def forward(self, x: torch.Tensor, regularize: bool = False) -> torch.Tensor:
        y = self.fc2(act.gelu(self.fc1(x)))
        p = self.dropout if regularize else 0.0
        return F.dropout(y, p, training=True) if p > 0 else y

    def to_static(self, embed: int) -> S.MLP:
        return S.MLP(self.fc1.to_static(embed), self.fc2.to_static(self.fc1.active_out), self.dropout)


class ElasticGPTBlock(nn.Module):
    """Pre-LN transformer block with elastic width, heads and MLP ratio."""

    def __init__(self, cfg):
        super().__init__()
        E, eps = max(cfg.embed_dims), cfg.ln_eps
        self.ln1 = ElasticLayerNorm(E, eps, bias=cfg.bias)
        self.attn = ElasticCausalSelfAttention(E, max(cfg.heads), cfg.head_dim, cfg.dropout, cfg.bias)
        self.ln2 = ElasticLayerNorm(E, eps, bias=cfg.bias)
        self.mlp = ElasticMLP(E, max(cfg.mlp_ratios), cfg.dropout, cfg.bias)
        self.drop_path_rate = 0.0
        self.embed = E

    def set_arch(self, embed: int, heads: int, ratio: int) -> None:
        self.embed = embed
        self.attn.set_width(embed, heads)
        self.mlp.set_width(embed, ratio)

    def _residual(self, branch: torch.Tensor, regularize: bool) -> torch.Tensor:
        if regularize and self.drop_path_rate > 0:
            return drop_path(branch, self.drop_path_rate)
        return branch

    def forward(self, x: torch.Tensor, regularize: bool = False) -> torch.Tensor:
        x = x + self._residual(self.attn(self.ln1(x), regularize), regularize)
        return x + self._residual(self.mlp(self.ln2(x), regularize), regularize)

    def to_static(self) -> S.GPTBlock:
        e = self.embed
        return S.GPTBlock(self.ln1.to_static(e), self.attn.to_static(e), self.ln2.to_static(e), self.mlp.to_static(e))


class GPTSupernet(Supernet):
    task = "lm"

    def __init__(self, cfg):
        space = GPTSpace.from_config(cfg)
        super().__init__(space)
        self.cfg = cfg
        E = max(cfg.embed_dims)
        self.tok_emb = nn.Embedding(cfg.vocab_size, E)
        self.pos_emb = nn.Embedding(cfg.block_size, E)
        self.blocks = nn.ModuleList(ElasticGPTBlock(cfg) for _ in range(space.max_depth))
        n = len(self.blocks)
        for j, b in enumerate(self.blocks):  # stochastic depth grows linearly with depth
            b.drop_path_rate = cfg.drop_path * (j + 1) / n
        self.ln_f = ElasticLayerNorm(E, cfg.ln_eps, bias=cfg.bias)
        self._init_weights()
        self._embed = E
        self._run: list = []
        self.set_active(self.space.max())

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (ElasticLinear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        residual_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for b in self.blocks:
            nn.init.normal_(b.attn.proj.weight, 0.0, residual_std)
            nn.init.normal_(b.mlp.fc2.weight, 0.0, residual_std)

    # -- arch -----------------------------------------------------------------------
    def _apply_arch(self, arch: dict) -> None:
        e = arch["embed"]
        self._embed = e
        self._run = []
        for i, heads, ratio in self.space.active_layers(arch):
            block = self.blocks[i]
            block.set_arch(e, heads, ratio)
            self._run.append(block)

    def teacher_needs_extra_forward(self) -> bool:
        return self.cfg.dropout > 0 or self.cfg.drop_path > 0

    # -- forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, return_clean: bool = False):
        """Logits [B, T, vocab] of the active subnet for byte ids ``x`` [B, T]."""
        if x.dim() != 2:
            raise ValueError(f"expected token ids of shape [batch, time], got shape {tuple(x.shape)}")
        t = x.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(
                f"input has {t} tokens but model.block_size is {self.cfg.block_size}: crop or split the sequence"
            )
        reg = self.regularizing
        e = self._embed
        tok = self.tok_emb.weight[:, :e]
        h = F.embedding(x, tok) + self.pos_emb.weight[:t, :e]
        if reg and self.cfg.dropout > 0:
            h = F.dropout(h, self.cfg.dropout, training=True)
        for block in self._run:
            h = block(h, reg)
        logits = F.linear(self.ln_f(h), tok)
        if not return_clean:
            return logits
        if reg and self.teacher_needs_extra_forward():
            raise RuntimeError(
                "dropout / drop-path is on inside the blocks: the clean teacher needs its own forward pass"
            )
        return logits, logits.detach()

    # -- extraction and cost ----------------------------------------------------------
    def _extract_active(self) -> S.StaticGPT:
        e = self._embed
        tok = nn.Embedding(self.cfg.vocab_size, e)
        pos = nn.Embedding(self.cfg.block_size, e)
        with torch.no_grad():
            tok.weight.copy_(self.tok_emb.weight[:, :e])
            pos.weight.copy_(self.pos_emb.weight[:, :e])
        blocks = nn.Sequential(*[b.to_static() for b in self._run])
        net = S.StaticGPT(tok, pos, blocks, self.ln_f.to_static(e), self.cfg.dropout, tie=True)
        net.to(device=self.tok_emb.weight.device, dtype=self.tok_emb.weight.dtype)
        net.train(self.training)
        return net

    def cost(self, arch: dict) -> dict:
        return gpt_cost(self.cfg, self.space, self.space.validate(arch))
