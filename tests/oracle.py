"""A float64 attention oracle written for the tests, sharing no code with dispatchattn.

Mods are evaluated element by element with scalar index tensors (as FlexAttention's vmap does), so it is
independent of the broadcasting the library's own reference uses.  Only for small problems.
"""

from __future__ import annotations

import math

import torch


def dense_mask(mask_mod, batch: int, heads: int, seq_q: int, seq_kv: int, device="cpu") -> torch.Tensor:
    keep = torch.ones(batch, heads, seq_q, seq_kv, dtype=torch.bool)
    if mask_mod is None:
        return keep
    t = lambda i: torch.tensor(i, device=device)  # noqa: E731
    for b in range(batch):
        for h in range(heads):
            for i in range(seq_q):
                for j in range(seq_kv):
                    keep[b, h, i, j] = bool(mask_mod(t(b), t(h), t(i), t(j)))
    return keep


def score_bias(score_mod, scores: torch.Tensor) -> torch.Tensor:
    """Apply ``score_mod`` element by element (float64)."""
    if score_mod is None:
        return scores
    out = torch.empty_like(scores)
    batch, heads, seq_q, seq_kv = scores.shape
    t = lambda i: torch.tensor(i)  # noqa: E731
    for b in range(batch):
        for h in range(heads):
            for i in range(seq_q):
                for j in range(seq_kv):
                    out[b, h, i, j] = score_mod(scores[b, h, i, j], t(b), t(h), t(i), t(j))
    return out


def attention64(q, k, v, *, mask=None, score_mod=None, scale=None, attn_bias=None):
    """q (B,Hq,Sq,D), k/v (B,Hkv,Sk,*) -> out float64 (B,Hq,Sq,Dv), lse float64 (B,Hq,Sq).

    ``mask``: bool (B|1, H|1, Sq, Sk) or None; ``attn_bias``: additive float64 or None.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    s = score_bias(score_mod, s)
    if attn_bias is not None:
        s = s + attn_bias.double()
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v, lse
