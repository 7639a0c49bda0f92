"""Test doubles for ``flash_attn`` (FA2), ``flash_attn_interface`` (FA3) and ``flash_attn.cute`` (FA4).

They have the libraries' Python signatures (an argument the real function lacks is a TypeError), record
every call, and compute flash-attn's own semantics in float64: bottom-right causal and windows (with
FA2's / FA3's clamping of large windows), softcap on the scaled scores, ALiBi ``-slope*|i + Sk - Sq - j|``,
varlen over ``cu_seqlens``; rows with no key give zeros and ``+inf`` lse, as the CUDA kernels do.
Dropout is recorded, not applied.  FA4's ``interface._flash_attn_bwd`` computes the gradients from the
``out`` and ``lse`` it is given (not by re-running the forward), as the kernels do.
"""

from __future__ import annotations

import sys
import types

import torch


def _scores(q, k, scale, causal, window, softcap, alibi, clamp):
    """Float64 (B, Hq, Sq, Sk) scores as flash-attn sees them (masked with -inf) and ``tanh(s / softcap)``
    (None without softcap), for q (B, Sq, Hq, D), k (B, Sk, Hkv, D)."""
    sq, hq, sk = q.shape[1], q.shape[2], k.shape[1]
    left, right = window
    left, right = (-1 if x is None else x for x in (left, right))
    if clamp == "fa2":  # csrc/flash_attn/flash_api.cpp
        left = -1 if left >= sk else left
        right = -1 if right >= sk else right
    else:  # hopper/flash_attn_interface.py
        left = -1 if left >= sk - 1 else left
        right = -1 if right >= sq - 1 else right
    if causal:
        right = 0
    qd, kd = (t.double().transpose(1, 2) for t in (q, k))
    kd = kd.repeat_interleave(hq // kd.shape[1], 1)
    s = qd @ kd.transpose(-1, -2) * scale
    tanh = None
    if softcap:
        tanh = torch.tanh(s / softcap)
        s = softcap * tanh
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    diag = i + sk - sq
    if alibi is not None:
        s = s - alibi.double().view(1, hq, 1, 1) * (diag - j).abs()
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= diag - left
    if right >= 0:
        keep &= j <= diag + right
    return s.masked_fill(~keep, float("-inf")), tanh


def _flash_math(q, k, v, scale, causal, window, softcap, alibi, clamp):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, Dv) in q's dtype, lse (B, Hq, Sq) fp32."""
    s, _ = _scores(q, k, scale, causal, window, softcap, alibi, clamp)
    vd = v.double().transpose(1, 2)
    vd = vd.repeat_interleave(q.shape[2] // vd.shape[1], 1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = (p @ vd).transpose(1, 2).to(q.dtype)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    return out, lse.float()


def _flash_bwd_math(q, k, v, out, dout, lse, scale, causal, window, softcap, clamp):
    """The flash backward from the saved ``out`` and ``lse`` as the kernels compute it (float64): P from the
    lse, ``dS = P * (dO @ V^T - rowsum(dO * O))``, softcap's chain rule; GQA gradients summed per kv head."""
    s, tanh = _scores(q, k, scale, causal, window, softcap, None, clamp)
    hq, hkv = q.shape[2], k.shape[2]
    qd, kd, vd, od, dod = (t.double().transpose(1, 2) for t in (q, k, v, out, dout))
    kd, vd = kd.repeat_interleave(hq // hkv, 1), vd.repeat_interleave(hq // hkv, 1)
    p = torch.exp(s - lse.double()[..., None])
    ds = p * (dod @ vd.transpose(-1, -2) - (dod * od).sum(-1, keepdim=True))
    if tanh is not None:
        ds = ds * (1 - tanh**2)
    dq = ds @ kd * scale
    dk = (ds.transpose(-1, -2) @ qd * scale).unflatten(1, (hkv, hq // hkv)).sum(2)
    dv = (p.transpose(-1, -2) @ dod).unflatten(1, (hkv, hq // hkv)).sum(2)
    return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def record(self, name, args, kwargs):
        self.calls.append((name, args, kwargs))

    @property
    def last(self):
        return self.calls[-1]


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, math_kwargs):
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    outs, lses = [], []
    for n in range(len(cu_q) - 1):
        a, b_ = int(cu_q[n]), int(cu_q[n + 1])
        c, d = int(cu_k[n]), int(cu_k[n + 1])
        assert b_ - a <= max_q and d - c <= max_k
        o, lse = _flash_math(q[None, a:b_], k[None, c:d], v[None, c:d], **math_kwargs)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)  # (total, H, Dv), (H, total)


def make_fa2(version="2.6.3", recorder=None):
    rec = recorder or Recorder()
    mod = types.ModuleType("flash_attn")
    mod.__version__ = version

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        rec.record("flash_attn_func", (q, k, v), dict(
            dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
            softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
            return_attn_probs=return_attn_probs))
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        out, lse = _flash_math(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, "fa2")
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        rec.record("flash_attn_varlen_func", (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                   dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                        return_attn_probs=return_attn_probs))
        out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dict(
            scale=softmax_scale, causal=causal, window=window_size, softcap=softcap, alibi=alibi_slopes,
            clamp="fa2"))
        return (out, lse, None) if return_attn_probs else out

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    mod.recorder = rec
    return mod


def make_fa3(recorder=None):
    rec = recorder or Recorder()
    mod = types.ModuleType("flash_attn_interface")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        rec.record("flash_attn_func", (q, k, v), dict(
            softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            deterministic=deterministic, return_attn_probs=return_attn_probs))
        out, lse = _flash_math(q, k, v, softmax_scale, causal, window_size, softcap, None, "fa3")
        return (out, lse) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):
        rec.record("flash_attn_varlen_func", (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                   dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                        deterministic=deterministic, return_attn_probs=return_attn_probs))
        out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dict(
            scale=softmax_scale, causal=causal, window=window_size, softcap=softcap, alibi=None, clamp="fa3"))
        return (out, lse) if return_attn_probs else out

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    mod.recorder = rec
    return mod


def make_fa4(recorder=None):
    """``flash_attn.cute`` with ``flash_attn_func`` and the ``interface`` module's ``_flash_attn_fwd`` /
    ``_flash_attn_bwd`` (the entry points ``dispatchattn::flash4_*`` call)."""
    rec = recorder or Recorder()
    mod = types.ModuleType("flash_attn.cute")
    interface = types.ModuleType("flash_attn.cute.interface")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                        softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, mask_mod=None,
                        return_lse=False):
        rec.record("flash_attn_func", (q, k, v), dict(
            softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            deterministic=deterministic, return_lse=return_lse))
        assert all(x is None or x >= 0 for x in window_size)
        out, lse = _flash_math(q, k, v, softmax_scale, causal, window_size, softcap, None, "fa3")
        return out, (lse if return_lse else None)

    def _flash_attn_fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, page_table=None, softmax_scale=None, causal=False,
                        softcap=None, window_size_left=None, window_size_right=None, learnable_sink=None,
                        m_block_size=128, n_block_size=128, num_threads=384, num_splits=1, pack_gqa=None,
                        _arch=None, score_mod=None, mask_mod=None, block_sparse_tensors=None,
                        cu_total_m_blocks=None, cu_total_n_blocks=None, return_lse=False, out=None, lse=None,
                        aux_tensors=None):
        rec.record("_flash_attn_fwd", (q, k, v), dict(
            softmax_scale=softmax_scale, causal=causal, softcap=softcap, window_size_left=window_size_left,
            window_size_right=window_size_right, return_lse=return_lse))
        assert cu_seqlens_q is None and out is None and lse is None
        assert all(x is None or x >= 0 for x in (window_size_left, window_size_right))
        window = (window_size_left, window_size_right)
        out, lse = _flash_math(q, k, v, softmax_scale, causal, window, softcap, None, "fa3")
        requires_grad = q.requires_grad or k.requires_grad or v.requires_grad
        return out.contiguous(), (lse if return_lse or requires_grad else None)  # new (B, Sq, H, Dv) tensors

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, m_block_size=64, n_block_size=128,
                        num_threads=256, pack_gqa=False, num_stages_Q=2, num_stages_dO=2, SdP_swapAB=False,
                        dKV_swapAB=False, dQ_swapAB=False, AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2,
                        V_in_regs=False, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, deterministic=False, dq=None, dk=None, dv=None,
                        score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                        block_sparse_tensors=None):
        rec.record("_flash_attn_bwd", (q, k, v, out, dout, lse), dict(
            softmax_scale=softmax_scale, causal=causal, softcap=softcap, window_size_left=window_size_left,
            window_size_right=window_size_right, deterministic=deterministic))
        assert cu_seqlens_q is None and dq is None and dk is None and dv is None
        b, sq, hq, dv_ = out.shape
        assert dout.shape == out.shape and lse.shape == (b, hq, sq) and lse.dtype == torch.float32
        window = (window_size_left, window_size_right)
        grads = _flash_bwd_math(q, k, v, out, dout, lse, softmax_scale, causal, window, softcap, "fa3")
        results = []
        for g, t in zip(grads, (q, k, v)):  # torch.empty_like(t), as the kernels allocate them
            result = torch.empty_like(t)
            result.copy_(g)
            results.append(result)
        return tuple(results)

    interface._flash_attn_fwd = _flash_attn_fwd
    interface._flash_attn_bwd = _flash_attn_bwd
    mod.flash_attn_func = flash_attn_func
    mod.interface = interface
    mod.recorder = rec
    return mod


def install(monkeypatch, fa2=None, fa3=None, fa4=None):
    """Put the doubles into ``sys.modules`` (absent ones are made unimportable)."""
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setitem(sys.modules, "flash_attn_3", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", fa4)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", getattr(fa4, "interface", None))
