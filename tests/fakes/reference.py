"""Float64 attention written for the tests from the contract's definitions (shares no code with dispatchattn).

``keep`` is a bool tensor broadcastable to (B, H, Sq, Sk); ``score_fn(scores, h, i, j)`` gets the scaled
float64 scores and broadcast index grids.  Rows with no key: zeros and -inf lse.
"""

from __future__ import annotations

import torch


def grids(seq_q: int, seq_kv: int, heads: int):
    h = torch.arange(heads).view(1, heads, 1, 1)
    i = torch.arange(seq_q).view(1, 1, seq_q, 1)
    j = torch.arange(seq_kv).view(1, 1, 1, seq_kv)
    return h, i, j


def attention64(q, k, v, *, scale: float, keep=None, score_fn=None, layout="bhsd"):
    """(out float64 in ``layout``, lse float64 (B, H, Sq))."""
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.detach().double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * scale
    h, i, j = grids(q.shape[2], k.shape[2], q.shape[1])
    if score_fn is not None:
        s = score_fn(s, h, i, j)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = p @ v
    return (out.transpose(1, 2) if layout == "bshd" else out), lse
