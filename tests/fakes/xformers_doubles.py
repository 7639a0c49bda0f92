"""A test double for ``xformers.ops.fmha``: xFormers' real ``attn_bias`` classes (they work on CPU), and
``memory_efficient_attention`` / ``memory_efficient_attention_forward_requires_grad`` computed in float64
from ``attn_bias.materialize`` (xFormers' own definition of each bias).  Calls are recorded.  Like the
cutlass kernels, the lse is padded to a multiple of 32 rows.  Rows with no key come back as zeros, or as
NaN with ``nan_rows=True`` (to check that the backend's forward fix-up does not rely on the kernel).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch


def _compute(q, k, v, attn_bias, p, scale, nan_rows):
    five = q.dim() == 5
    if five:  # BMGHK -> BMHK
        b, m, g, h, d = q.shape
        q, k, v = (t.reshape(t.shape[0], t.shape[1], g * h, t.shape[-1]) for t in (q, k, v))
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, M, K)
    s = qd @ kd.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if isinstance(attn_bias, torch.Tensor):
        assert attn_bias.dtype == q.dtype and attn_bias.stride(-2) % 8 == 0, "bias must be aligned"
        s = s + attn_bias.double()
    elif attn_bias is not None:
        s = s + attn_bias.materialize(tuple(s.shape[-2:]), dtype=torch.float64)
    lse = torch.logsumexp(s, -1)
    empty = torch.isneginf(s).all(-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, float("nan") if nan_rows else 0.0)
    out = (probs @ vd).transpose(1, 2).to(q.dtype)
    pad = -(-lse.shape[-1] // 32) * 32 - lse.shape[-1]
    lse = torch.nn.functional.pad(lse.float(), (0, pad), value=float("inf"))
    if five:
        out = out.reshape(b, m, g, h, -1)
        lse = lse.reshape(b, g, h, -1)
    return out, lse


def make_fmha(recorder: list, nan_rows: bool = False):
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")

    mod = types.ModuleType("xformers.ops.fmha")
    mod.attn_bias = attn_bias

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
        recorder.append(("memory_efficient_attention", (query, key, value), dict(attn_bias=attn_bias, p=p,
                                                                                 scale=scale)))
        return _compute(query, key, value, attn_bias, p, scale, nan_rows)[0]

    def memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=None, p=0.0, scale=None,
                                                         *, op=None, output_dtype=None):
        recorder.append(("memory_efficient_attention_forward_requires_grad", (query, key, value),
                         dict(attn_bias=attn_bias, p=p, scale=scale)))
        if p != 0.0:
            raise NotImplementedError("dropout is not supported on the non-autograd API.")
        return _compute(query, key, value, attn_bias, p, scale, nan_rows)

    mod.memory_efficient_attention = memory_efficient_attention
    mod.memory_efficient_attention_forward_requires_grad = memory_efficient_attention_forward_requires_grad
    return mod


def install(monkeypatch, nan_rows: bool = False) -> list:
    calls: list = []
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha", make_fmha(calls, nan_rows))
    return calls
