"""``triton_flex_attention``: the Triton flex kernels behind a ``torch.autograd.Function``.

The launch steps are plain functions of tensors (``flex_forward``, ``flex_backward``) so that a
``torch.library.triton_op`` wrapper can reuse them; the generated mods are identified by
``generated.key``.

>>> import torch
>>> q = k = v = torch.randn(1, 2, 40, 32)
>>> out, lse = triton_flex_attention(q, k, v, scale=32 ** -0.5, return_lse=True)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...failures import LaunchFailed
from ...masks import MaskMod
from ...scores import ScoreMod
from ...tuning.config import TileConfig
from . import codegen, ladder
from .block_mask import BlockMask, build_block_mask
from .kernels import (
    PREPROCESS_CONFIG,
    dkdv_launch,
    dq_launch,
    fwd_launch,
    preprocess_launch,
)

__all__ = ["triton_flex_attention", "flex_forward", "flex_backward", "heuristic_config", "generated_for"]


def vendor_of(device: torch.device) -> str:
    if device.type == "cuda":
        return "rocm" if torch.version.hip is not None else "cuda"
    return device.type


def heuristic_config(kernel: str, head_dim: int, dtype: torch.dtype, vendor: str) -> TileConfig:
    """Tile config when the autotune cache has none.  ``kernel``: "fwd" or "bwd".

    CPU (Triton's interpreter, tests): 64 x 64 tiles; the interpreter's cost is dominated by the number
    of tile steps (measured: S=100, 2 heads, forward 0.6 s at 64x64, 1.3 s at 32x32, 3 s at 16x16).
    NVIDIA: Inductor's FlexAttention defaults for H100 / A100 (KERNEL_NOTES section 4):
    forward 128x64 (64x32 for head dims above 128; 128x128 at d <= 64 in 16-bit), backward 64x64
    (32x32 in fp32 or above head dim 128).
    AMD: the same tiles with one pipeline stage, as Inductor's ROCm defaults.
    """
    if vendor == "cpu":
        return TileConfig(64, 64, num_warps=4, num_stages=1)
    stages = 1 if vendor == "rocm" else 3
    if kernel == "bwd":
        block = 32 if dtype == torch.float32 or head_dim > 128 else 64  # fp32 64x64 needs ~180 KB on sm_90
        return TileConfig(block, block, num_warps=4, num_stages=1 if vendor == "rocm" else 2)
    if dtype == torch.float32:
        return TileConfig(64, 32, num_warps=4, num_stages=stages)
    if head_dim <= 64:
        return TileConfig(128, 128 if vendor == "cuda" else 64, num_warps=4, num_stages=stages)
    if head_dim <= 128:
        return TileConfig(128, 64, num_warps=8, num_stages=stages)
    return TileConfig(64, 32, num_warps=4, num_stages=stages)


def out_like(q: torch.Tensor, dim_v: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Hq, Sq, Dv) output in q's layout family: a (B, Sq, Hq, Dv) buffer when q is a bshd view."""
    batch, heads, seq, _ = q.shape
    if q.stride(1) < q.stride(2) and heads > 1 and seq > 1:
        return torch.empty(batch, seq, heads, dim_v, dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty(batch, heads, seq, dim_v, dtype=dtype, device=q.device)


def _kv_lists(block_mask: BlockMask) -> tuple[torch.Tensor, ...]:
    return (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices)


def _q_lists(block_mask: BlockMask) -> tuple[torch.Tensor, ...]:
    return (block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks,
            block_mask.full_q_indices)


def captured_buffers(generated: codegen.Generated, buffers: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The kernels' ``BUFS``: ``buffers`` (the captured tensors, e.g. passed through an op boundary) or the traced
    ones; as many as the mods capture."""
    if buffers is None:
        return list(generated.buffers)
    if len(buffers) != len(generated.buffers):
        raise ValueError(f"buffers: the kernel {generated.short_key} reads {len(generated.buffers)} captured "
                         f"tensor(s), got {len(buffers)}")
    return list(buffers)


def flex_forward(q, k, v, generated: codegen.Generated, block_mask: BlockMask, scale: float,
                 config: TileConfig, buffers: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: (out in q's layout family, lse (B, Hq, Sq) fp32 natural log).

    ``generated`` may come from ``codegen.generated_by_key(key)``; ``buffers`` then carries the captured
    tensors (same shapes, dtypes and strides as when the kernel was generated).
    """
    buffers = captured_buffers(generated, buffers)

    def attempt(config: TileConfig, block_mask: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
        out = out_like(q, v.shape[-1], q.dtype)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        launch = fwd_launch(q, k, v, out, lse, buffers, _kv_lists(block_mask), scale, generated, config, True)
        launch.run(config, vendor_of(q.device))
        return out, lse

    return ladder.run("fwd", config, block_mask, ladder.launch_problem(q, v, generated), q.device, attempt)


def flex_backward(q, k, v, out, lse, dout, dlse, generated: codegen.Generated, block_mask: BlockMask,
                  scale: float, config: TileConfig,
                  buffers: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, *grads of the captured tensors in ``generated.grad_slots``); ``dlse`` may be None."""
    vendor = vendor_of(q.device)
    delta = torch.empty_like(lse)
    preprocess_launch(out, dout, dlse, delta).run(PREPROCESS_CONFIG, vendor)
    buffers = captured_buffers(generated, buffers)

    def attempt(config: TileConfig, block_mask: BlockMask) -> tuple[torch.Tensor, ...]:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dkdv_launch(q, k, v, dout, lse, delta, dk, dv, buffers, _q_lists(block_mask), scale, generated,
                    config).run(config, vendor)
        grads = [torch.zeros(buffers[s].shape, dtype=torch.float32, device=q.device) for s in generated.grad_slots]
        dq_launch(q, k, v, dout, lse, delta, dq, buffers, grads, _kv_lists(block_mask), scale, generated, config,
                  bool(grads)).run(config, vendor)
        return (dq, dk, dv, *(g.to(buffers[s].dtype) for s, g in zip(generated.grad_slots, grads)))

    return ladder.run("bwd", config, block_mask, ladder.launch_problem(q, v, generated), q.device, attempt)


class _TritonFlexFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, generated, mask_mod, fwd_config, bwd_config, backward_fallback, *grad_tensors):
        block_mask = _block_mask(mask_mod, q, k, fwd_config)
        out, lse = flex_forward(q, k, v, generated, block_mask, scale, fwd_config)
        ctx.save_for_backward(q, k, v, out, lse, *grad_tensors)
        ctx.flex = (scale, generated, mask_mod, bwd_config, backward_fallback)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *grad_tensors = ctx.saved_tensors
        scale, generated, mask_mod, bwd_config, backward_fallback = ctx.flex
        if dout is None:
            dout = torch.zeros_like(out)
        block_mask = _block_mask(mask_mod, q, k, bwd_config)
        try:
            dq, dk, dv, *grads = flex_backward(q, k, v, out, lse, dout, dlse, generated, block_mask, scale,
                                               bwd_config)
        except LaunchFailed as failure:
            if backward_fallback is None:
                raise
            dq, dk, dv, *grads = backward_fallback(q, k, v, dout, dlse, grad_tensors, failure)
        return (dq, dk, dv, None, None, None, None, None, None, *grads)


def _block_mask(mask_mod, q: torch.Tensor, k: torch.Tensor, config: TileConfig) -> BlockMask:
    return build_block_mask(mask_mod, batch=q.shape[0], heads=q.shape[1], seq_q=q.shape[2], seq_kv=k.shape[2],
                            block_m=config.block_m, block_n=config.block_n, device=q.device)


def generated_for(score_mod: Callable | None, mask_mod: Callable | None, device: torch.device) -> codegen.Generated:
    """``codegen.generate`` for inputs on ``device`` (structured mods already bound to the lengths)."""
    return codegen.generate(score_mod, mask_mod, device)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, generated: codegen.Generated) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-D (B, H, S, D) tensors, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"heads: q has {q.shape[1]} heads, not a multiple of the {k.shape[1]} kv heads")
    for t in generated.buffers:
        if t.device != q.device:
            raise ValueError(f"a tensor captured by the mods is on {t.device}, the inputs on {q.device}; "
                             "move it to the inputs' device")


def prepare_mods(q, k, v, score_mod, mask_mod) -> tuple[Callable | None, Callable | None, codegen.Generated]:
    """The mods bound to the lengths (``da.masks`` / ``da.scores`` objects), and their generated kernel code
    checked against the call's tensors."""
    if isinstance(mask_mod, MaskMod):
        mask_mod = mask_mod.bind(q.shape[2], k.shape[2])
    if isinstance(score_mod, ScoreMod):
        score_mod = score_mod.bind(q.shape[2], k.shape[2])
    generated = generated_for(score_mod, mask_mod, q.device)
    _check(q, k, v, generated)
    return score_mod, mask_mod, generated


def triton_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          score_mod: Callable | ScoreMod | None = None, mask_mod: Callable | MaskMod | None = None,
                          scale: float, return_lse: bool = False, fwd_config: TileConfig | None = None,
                          bwd_config: TileConfig | None = None,
                          backward_fallback: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused block-sparse attention with generated mods: ``(out (B, Hq, Sq, Dv), lse or None)``.

    ``q`` (B, Hq, Sq, D), ``k`` (B, Hkv, Sk, D), ``v`` (B, Hkv, Sk, Dv), any strides; ``Hq % Hkv == 0``.
    ``score_mod`` / ``mask_mod``: FlexAttention signatures (da.scores / da.masks objects bound to the
    lengths, or any traceable callable).  Fully-masked rows give 0 and ``lse = -inf``.  Gradients flow to
    q, k, v and to floating captured tensors of the score_mod that require grad.  A launch that fails retries
    smaller tile configs (``ladder``); when no backward config launches, ``backward_fallback(q, k, v, dout, dlse,
    grad_tensors, failure)`` computes the gradients (another backend), else ``failures.LaunchFailed`` is raised.
    """
    score_mod, mask_mod, generated = prepare_mods(q, k, v, score_mod, mask_mod)
    vendor = vendor_of(q.device)
    fwd_config = fwd_config or heuristic_config("fwd", q.shape[-1], q.dtype, vendor)
    bwd_config = bwd_config or heuristic_config("bwd", q.shape[-1], q.dtype, vendor)
    grad_tensors = [generated.buffers[s] for s in generated.grad_slots]
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(t.requires_grad for t in grad_tensors))
    if needs_grad:
        out, lse = _TritonFlexFunction.apply(q, k, v, scale, generated, mask_mod, fwd_config, bwd_config,
                                             backward_fallback, *grad_tensors)
    else:
        out, lse = flex_forward(q, k, v, generated, _block_mask(mask_mod, q, k, fwd_config), scale, fwd_config)
    return out, (lse if return_lse else None)

