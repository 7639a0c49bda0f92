"""The Triton flex kernels as ``torch.ops.dispatchattn.*`` custom ops, for calls inside ``torch.compile``.

Eager calls use ``autograd.triton_flex_attention`` directly (a custom op costs several microseconds per call);
compiled graphs call these ops, which dynamo and AOTAutograd treat as opaque kernels with a fake
(shape-only) implementation and a registered backward.  Callables cannot cross an op boundary, so the
generated mods travel as their kernel key (``codegen.generated_by_key``) and the block-sparse structure as
its index tensors.  Tile configs travel as lists of ints (``TileConfig`` fields in order).  The tensors the mods
capture travel as ``buffers`` (a ``Tensor[]``, ``Generated.buffers`` order, any number: the kernels take them as
one tuple argument), so their values are the call's, never the ones seen when the kernel was generated.

- ``dispatchattn::triton_flex_fwd(q, k, v, buffers, kv_lists, bwd_lists, kernel_key, scale, config, bwd_config)
  -> (out, lse)``, differentiable in q, k, v and the buffers of ``Generated.grad_slots``
- ``dispatchattn::triton_flex_bwd(q, k, v, out, lse, dout, dlse, buffers, bwd_lists, kernel_key, scale, config)
  -> (dq, dk, dv, buffer_grads)`` (``buffer_grads``: one per grad slot)
- ``dispatchattn::triton_flex_decode(q, k, v, buffers, group_lists, kernel_key, scale, config, num_splits)
  -> (out, lse)``: the split-KV decoding kernels (``decode.py``) for calls with few query rows and no gradient
  (no autograd formula: a call that needs one is planned on the forward op instead).

``plan`` still refuses mods that capture tensors: it generates the kernel at trace time from the structural
twins of the mods (``compiled._rebuild_mod``), whose stand-in tensors have neither the values nor the strides
of the caller's.
"""

from __future__ import annotations

from dataclasses import astuple

import torch

from ...tuning.config import TileConfig
from .block_mask import BlockMask

__all__ = ["triton_flex_fwd", "triton_flex_bwd", "triton_flex_decode", "config_list", "lists_of"]


def config_list(config: TileConfig) -> list[int]:
    """A TileConfig as op arguments."""
    return [int(x) for x in astuple(config)]


def lists_of(block_mask: BlockMask, kind: str) -> list[torch.Tensor]:
    """The four index tensors of a block mask: ``kind`` "kv" (per q tile, forward and dQ) or "q" (dK/dV)."""
    if kind == "kv":
        return [block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                block_mask.full_kv_indices]
    return [block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks, block_mask.full_q_indices]


def _block_mask(q: torch.Tensor, k: torch.Tensor, config: TileConfig, kv_lists, q_lists=None) -> BlockMask:
    q_lists = q_lists if q_lists is not None else kv_lists  # the forward reads only the kv lists
    return BlockMask(config.block_m, config.block_n, q.shape[2], k.shape[2], *kv_lists, *q_lists,
                     fraction_computed=0.0, fraction_partial=0.0)


def _generated(kernel_key: str):
    from . import codegen

    return codegen.generated_by_key(kernel_key)


@torch.library.custom_op("dispatchattn::triton_flex_fwd", mutates_args=())
def triton_flex_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buffers: list[torch.Tensor],
                    kv_lists: list[torch.Tensor], bwd_lists: list[torch.Tensor], kernel_key: str, scale: float,
                    config: list[int], bwd_config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``kv_lists`` at ``config``'s tiles; ``bwd_lists`` (kv then q lists at ``bwd_config``'s tiles)
    and ``bwd_config`` are only kept for the backward."""
    from .autograd import flex_forward

    tile = TileConfig(*config)
    out, lse = flex_forward(q, k, v, _generated(kernel_key), _block_mask(q, k, tile, kv_lists), scale, tile,
                            buffers)
    return out.contiguous(), lse


@triton_flex_fwd.register_fake
def _(q, k, v, buffers, kv_lists, bwd_lists, kernel_key, scale, config, bwd_config):
    batch, heads, seq_q, _ = q.shape
    out = q.new_empty(batch, heads, seq_q, v.shape[-1])
    return out, q.new_empty(batch, heads, seq_q, dtype=torch.float32)


@torch.library.custom_op("dispatchattn::triton_flex_bwd", mutates_args=())
def triton_flex_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    dout: torch.Tensor, dlse: torch.Tensor | None, buffers: list[torch.Tensor],
                    bwd_lists: list[torch.Tensor], kernel_key: str, scale: float,
                    config: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """dq, dk, dv and the gradients of the buffers in ``Generated.grad_slots`` (in that order); ``bwd_lists`` =
    kv lists then q lists of the block mask at ``config``'s tiles."""
    from .autograd import flex_backward

    tile = TileConfig(*config)
    block_mask = _block_mask(q, k, tile, bwd_lists[:4], bwd_lists[4:])
    dlse = dlse.contiguous() if dlse is not None else None  # the preprocess kernel reads it as (B, H, S) dense
    dq, dk, dv, *buffer_grads = flex_backward(q, k, v, out, lse, dout.contiguous(), dlse, _generated(kernel_key),
                                              block_mask, scale, tile, buffers)
    return dq, dk, dv, buffer_grads


@triton_flex_bwd.register_fake
def _(q, k, v, out, lse, dout, dlse, buffers, bwd_lists, kernel_key, scale, config):
    grad_slots = _generated(kernel_key).grad_slots
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(buffers[s])
                                                                           for s in grad_slots]


def _setup_context(ctx, inputs, output):
    q, k, v, buffers, kv_lists, bwd_lists, kernel_key, scale, config, bwd_config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *buffers, *bwd_lists)
    ctx.buffer_count, ctx.kernel_key, ctx.scale, ctx.bwd_config = len(buffers), kernel_key, scale, bwd_config
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    buffers, bwd_lists = rest[:ctx.buffer_count], rest[ctx.buffer_count:]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, buffer_grads = triton_flex_bwd(q, k, v, out, lse, dout, dlse, buffers, bwd_lists, ctx.kernel_key,
                                               ctx.scale, ctx.bwd_config)
    grads = [None] * len(buffers)  # a gradient for the buffers of the grad slots, None for the others
    for slot, grad in zip(_generated(ctx.kernel_key).grad_slots, buffer_grads):
        grads[slot] = grad
    no_grads = [None] * len(bwd_lists)  # the index lists: same structure as the inputs, no gradient
    return dq, dk, dv, grads, no_grads[:4], no_grads, None, None, None, None


triton_flex_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dispatchattn::triton_flex_decode", mutates_args=())
def triton_flex_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buffers: list[torch.Tensor],
                       group_lists: list[torch.Tensor], kernel_key: str, scale: float, config: list[int],
                       num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding kernels: ``group_lists`` = ``decode.GroupLists`` fields at ``config``'s BLOCK_N."""
    from .autograd import vendor_of
    from .decode import GroupLists, decode_attention

    out, lse = decode_attention(q, k, v, _generated(kernel_key), GroupLists(*group_lists), scale, TileConfig(*config),
                                num_splits, vendor_of(q.device), buffers)
    return out.contiguous(), lse


@triton_flex_decode.register_fake
def _(q, k, v, buffers, group_lists, kernel_key, scale, config, num_splits):
    batch, heads, seq_q, _ = q.shape
    out = q.new_empty(batch, heads, seq_q, v.shape[-1])
    return out, q.new_empty(batch, heads, seq_q, dtype=torch.float32)


class Plan:
    """What a compiled graph needs to call the ops: kernel key, configs and block-mask tensors, made at trace time."""

    def __init__(self, kernel_key: str, config: TileConfig, bwd_config: TileConfig, kv_lists, bwd_lists):
        self.kernel_key, self.config, self.bwd_config = kernel_key, config_list(config), config_list(bwd_config)
        self.kv_lists, self.bwd_lists = kv_lists, bwd_lists

    def run(self, call, spec, config=None):
        """``Backend.run``'s contract, through the ops (traced by dynamo)."""
        q, k, v = call.bhsd(call.query), call.bhsd(call.key), call.bhsd(call.value)
        out, lse = triton_flex_fwd(q, k, v, [], self.kv_lists, self.bwd_lists, self.kernel_key, call.scale,
                                   self.config, self.bwd_config)
        return call.from_bhsd(out), (lse if call.return_lse else None)


class DecodePlan:
    """What a compiled graph needs to call the decoding op: kernel key, config, split count and kv lists."""

    def __init__(self, kernel_key: str, config: TileConfig, num_splits: int, group_lists):
        self.kernel_key, self.config, self.num_splits = kernel_key, config_list(config), num_splits
        self.group_lists = list(group_lists.as_tuple())

    def run(self, call, spec, config=None):
        q, k, v = call.bhsd(call.query), call.bhsd(call.key), call.bhsd(call.value)
        out, lse = triton_flex_decode(q, k, v, [], self.group_lists, self.kernel_key, call.scale, self.config,
                                      self.num_splits)
        return call.from_bhsd(out), (lse if call.return_lse else None)


def plan(spec, score_mod, mask_mod, fwd_config: TileConfig, bwd_config: TileConfig, device,
         caps) -> Plan | DecodePlan:
    """The trace-time plan for ``spec`` (mods bound to the lengths): the decoding op when ``backend.decoding``
    says so (``fwd_config`` is then the decoding config), else the forward op.  Raises ValueError when the ops
    cannot run it: a dense ``attn_mask`` or mods that capture tensors (their values may change between calls)."""
    from ...masks import Causal, both
    from . import codegen
    from .backend import decoding
    from .block_mask import build_block_mask

    if spec.attn_mask is not None:
        raise ValueError("a dense attn_mask would be a captured tensor of the generated kernel")
    if spec.is_causal:
        mask_mod = both(mask_mod, Causal())
    generated = codegen.generate(score_mod, mask_mod, device)
    if generated.buffers:
        raise ValueError(f"the mods capture {len(generated.buffers)} tensor(s)")
    if decoding(spec, caps):
        from .decode import decoding_plan, group_lists

        lists = group_lists(mask_mod, batch=spec.batch, heads_q=spec.heads_q, heads_kv=spec.heads_kv,
                            seq_q=spec.seq_q, seq_kv=spec.seq_kv, block_n=fwd_config.block_n, device=device)
        num_splits = decoding_plan(spec.batch, spec.heads_q, spec.heads_kv, spec.seq_q, spec.seq_kv, fwd_config,
                                   caps)[2]
        return DecodePlan(generated.key, fwd_config, num_splits, lists)
    shape = dict(batch=spec.batch, heads=spec.heads_q, seq_q=spec.seq_q, seq_kv=spec.seq_kv, device=device)
    fwd = build_block_mask(mask_mod, block_m=fwd_config.block_m, block_n=fwd_config.block_n, **shape)
    bwd = build_block_mask(mask_mod, block_m=bwd_config.block_m, block_n=bwd_config.block_n, **shape)
    return Plan(generated.key, fwd_config, bwd_config, lists_of(fwd, "kv"), lists_of(bwd, "kv") + lists_of(bwd, "q"))


def probe_configs(spec, score_mod, mask_mod, fwd_config: TileConfig, bwd_config: TileConfig,
                  device: torch.device) -> tuple[TileConfig, TileConfig]:
    """Launch the kernels ``spec`` needs once, on a problem of one tile with its dtype, head dims and mods, and
    return the (forward, backward) configs that launched (``ladder``).  While tracing, so that a config that cannot
    launch on this device fails where a smaller config or another backend can still be chosen, not inside the
    graph.  Raises ``failures.LaunchFailed`` when no config launches.  What a launch needs depends on the tile,
    dtype, head dims and mods, not on the lengths: one tile tells."""
    from ...capabilities import probe
    from . import codegen, ladder
    from .autograd import triton_flex_attention

    grad = spec.requires_grad or spec.mods_need_grad
    groups = max(1, spec.heads_q // max(spec.heads_kv, 1))
    seq_q, seq_kv = min(spec.seq_q, fwd_config.block_m), min(spec.seq_kv, fwd_config.block_n)
    make = dict(dtype=spec.dtype, device=device)
    q = torch.randn(1, groups, seq_q, spec.head_dim, **make).requires_grad_(grad)
    k = torch.randn(1, 1, seq_kv, spec.head_dim, **make)
    v = torch.randn(1, 1, seq_kv, spec.head_dim_v, **make)
    with torch.enable_grad() if grad else torch.no_grad():
        out, _ = triton_flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=1.0,
                                       fwd_config=fwd_config, bwd_config=bwd_config)
        if grad:
            out.sum().backward()
    generated = codegen.generate(score_mod, mask_mod, device)
    problem = ladder.problem_key(spec.dtype, spec.head_dim, spec.head_dim_v, generated.key)
    caps = probe(device)
    return (ladder.first_launchable("fwd", fwd_config, problem, caps)[0],
            ladder.first_launchable("bwd", bwd_config, problem, caps)[0] if grad else bwd_config)
