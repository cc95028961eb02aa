"""Analytical parameters and MACs of a gpt subnet.

params: every parameter of the extracted static model, counted once: token
embedding V*e (tied with the LM head, so the head adds nothing), position
embedding block_size*e, and per layer with h heads, ratio r, a = h*hd and
b = 1 if ``bias`` else 0:

    LN1, LN2: (1 + b) * e each
    qkv: e * 3a + b * 3a      out: a * e + b * e
    fc1: e * r*e + b * r*e    fc2: r*e * e + b * e

plus the final LN (1 + b) * e.

macs: multiply-accumulates for ONE sequence of T = block_size tokens: every
linear layer in_features * out_features per token (LM head included),

    T * (e*3a + a*e + 2*r*e*e)  per layer,   T * e * V  for the head,

plus the attention products q.k^T and p.v counted as full (non-causal)
matrices, 2 * T^2 * a per layer. Embedding look-ups, layer norms, softmax,
GELU and residual additions are not counted.
"""

from __future__ import annotations


def gpt_cost(cfg, space, arch: dict) -> dict:
    """Cost of a canonical ``arch`` of ``space`` under the sizes of ``cfg`` (a GPTConfig)."""
    b = 1 if cfg.bias else 0
    T, V, hd = cfg.block_size, cfg.vocab_size, cfg.head_dim
    e = arch["embed"]
    params = V * e + T * e
    macs = 0

    def linear(fin: int, fout: int, bias: bool) -> None:
        nonlocal params, macs
        params += fin * fout + (fout if bias else 0)
        macs += T * fin * fout

    for _, heads, ratio in space.active_layers(arch):
        a, hidden = heads * hd, ratio * e
        params += 2 * (1 + b) * e  # LN1, LN2
        linear(e, 3 * a, b)
        linear(a, e, b)
        linear(e, hidden, b)
        linear(hidden, e, b)
        macs += 2 * T * T * a
    params += (1 + b) * e  # final LN
    macs += T * e * V  # tied LM head: no extra parameters
    return {"params": int(params), "macs": int(macs)}
