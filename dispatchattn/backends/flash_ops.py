"""flash-attn 4's entry points as ``torch.ops.dispatchattn.*`` custom ops, for calls inside ``torch.compile``.

Why they exist: FA4 (``flash_attn.cute``) is a ``torch.autograd.Function`` around CuTe-DSL kernels with no
``torch.library`` registration, so dynamo cannot put it in a graph as one opaque node (it would trace into
the kernel launcher, or break the graph).  FA2 and FA3 register their own ops (``flash_attn::*``,
``flash_attn_3::*``), used as they are.  Eager calls skip these ops (a custom op costs several microseconds)
and call ``flash_attn.cute.flash_attn_func`` directly, except where only the ops are exact (the lse gradient,
below).

- ``dispatchattn::flash4_fwd(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
  deterministic) -> (out, lse)`` calls ``flash_attn.cute.interface._flash_attn_fwd``;
- ``dispatchattn::flash4_bwd(q, k, v, out, dout, lse, softmax_scale, causal, window_left, window_right,
  softcap, deterministic) -> (dq, dk, dv)`` calls ``flash_attn.cute.interface._flash_attn_bwd``.

Tensors are flash's (B, S, H, D); ``out`` is (B, Sq, Hq, Dv) in q's dtype, ``lse`` (B, Hq, Sq) float32 natural
log, always computed (the backward needs it).  Windows are flash's bottom-right ``window_size``, -1 for an
unbounded side.  Only what ``flash.py`` passes is exposed: no varlen (document masks are refused while
compiling), dropout or ALiBi (FA4 has neither).  ``flash_attn`` is imported inside the ops, so importing
dispatchattn never needs it.

The lse gradient: FA4 marks its lse non-differentiable and its backward takes no ``dlse``.  The lse term is
``dS = P * dlse`` (per row), and FA4's backward computes ``dS = P * (dO @ V^T - rowsum(dO * O))``; calling it
again with ``V = 0`` and ``dO``, ``O`` whose row sum ``rowsum(dO * O)`` is ``-dlse`` gives exactly that term
(``dO @ V^T = 0``), softcap and masks included.  So the registered backward is exact for both outputs, at the
cost of a second backward pass when the lse has a gradient.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["flash4_fwd", "flash4_bwd", "flash4_attention"]


def _interface():
    return importlib.import_module("flash_attn.cute.interface")


def _options(softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float) -> dict:
    """Keyword arguments shared by FA4's ``_flash_attn_fwd`` and ``_flash_attn_bwd``, defaults left out (so
    releases without an argument accept the calls that do not need it)."""
    options: dict = {"softmax_scale": softmax_scale}
    if causal:
        options["causal"] = True
    if window_left >= 0:
        options["window_size_left"] = window_left
    if window_right >= 0:
        options["window_size_right"] = window_right
    if softcap:
        options["softcap"] = softcap
    return options


@torch.library.custom_op("dispatchattn::flash4_fwd", mutates_args=())
def flash4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
               window_left: int, window_right: int, softcap: float,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's forward as one graph node (FA4 registers no op of its own).  ``deterministic`` is only kept for
    the backward.  Returns (out, lse)."""
    out, lse = _interface()._flash_attn_fwd(q, k, v, **_options(softmax_scale, causal, window_left, window_right,
                                                                 softcap), return_lse=True)
    return out, lse


@flash4_fwd.register_fake
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, deterministic):
    batch, seq_q, heads, _ = q.shape
    return q.new_empty(batch, seq_q, heads, v.shape[-1]), q.new_empty(batch, heads, seq_q, dtype=torch.float32)


@torch.library.custom_op("dispatchattn::flash4_bwd", mutates_args=())
def flash4_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
               lse: torch.Tensor, softmax_scale: float, causal: bool, window_left: int, window_right: int,
               softcap: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4's backward as one graph node (the forward op's registered backward calls it).  Returns (dq, dk, dv),
    allocated by FA4 like its inputs (``empty_like``)."""
    options = _options(softmax_scale, causal, window_left, window_right, softcap)
    if deterministic:
        options["deterministic"] = True
    dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, dout, lse, **options)
    return dq, dk, dv


@flash4_bwd.register_fake
def _(q, k, v, out, dout, lse, softmax_scale, causal, window_left, window_right, softcap, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *settings = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.settings = settings
    ctx.set_materialize_grads(False)


def _lse_term(out: torch.Tensor, dlse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, dO) in O's dtype with ``rowsum(dO * O) == -dlse`` to fp32 precision, for FA4's backward (which
    sums in fp32).  dO holds a power of two per row in its first three columns, so that O stays within fp16's
    normal numbers (dlse is fp32, and loss scaling makes it large); O holds ``-dlse / scale`` in three parts,
    each the remainder of the ones before it (bf16's 8-bit mantissas together keep fp32's 24 bits)."""
    minus = -dlse.transpose(1, 2).unsqueeze(-1).float()  # (B, Sq, H, 1)
    scale = torch.exp2(torch.log2(minus.abs()).ceil().clamp(-14, 15)).to(out.dtype)
    rest = minus / scale.float()
    parts = []
    for _ in range(3):
        parts.append(rest.to(out.dtype))
        rest = rest - parts[-1].float()
    pad = out.new_zeros(*out.shape[:-1], out.shape[-1] - 3)
    return torch.cat([*parts, pad], dim=-1), torch.cat([scale, scale, scale, pad], dim=-1)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is not None:
        dq, dk, dv = flash4_bwd(q, k, v, out, dout, lse, *ctx.settings)
    else:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if dlse is not None:  # P * dlse, from FA4's own backward (see the module docstring)
        lse_dq, lse_dk, _ = flash4_bwd(q, k, torch.zeros_like(v), *_lse_term(out, dlse), lse, *ctx.settings)
        dq, dk = dq + lse_dq, dk + lse_dk
    return dq, dk, dv, *(None,) * len(ctx.settings)


flash4_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool = False,
                     window_size: tuple[int | None, int | None] = (None, None), softcap: float = 0.0,
                     deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn.cute.flash_attn_func(..., return_lse=True)`` through the ops: the same keyword arguments
    (the ones ``flash.py`` builds), returns (out, lse) with a gradient for both."""
    left, right = (-1 if side is None else side for side in window_size)
    return flash4_fwd(q, k, v, softmax_scale, causal, left, right, softcap, deterministic)
