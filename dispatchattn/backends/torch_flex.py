"""``torch_flex``: ``torch.nn.attention.flex_attention``, compiled, with block masks built once per
(mask, shape) and cached.

Takes any mask_mod/score_mod.  On CPU it has no backward (torch raises NotImplementedError), so calls
that need gradients are refused there.  Its first call per shape compiles (tens of seconds on CPU).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

from .. import masks
from ..masks import Causal, Document, MaskMod
from .base import AttentionCall, Backend, Reason

_BLOCK_MASKS: OrderedDict = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64
MIN_HEAD_DIM = 16  # FlexAttention rejects head dims below 16 (torch/_inductor/kernel/flex)
# torch 2.13's compiled CPU kernel returned wrong values, run to run, for short sequences (S=24 and 56 at
# head dim 16, seen here; 64 and above were right in every run), so CPU calls below this are refused.
CPU_MIN_SEQ = 64


# Each new shape or mod recompiles flex_attention; past dynamo's default limit (8) it would silently run
# the unfused eager implementation, so the limit is raised (never lowered) for this one function's sake.
RECOMPILE_LIMIT = 256


@functools.cache
def _compiled_flex_attention():
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


def _mask_batch_heads(mask, spec) -> tuple[int | None, int | None]:
    """B and H the block mask must be built for (None = broadcast: the mask ignores that index)."""
    if isinstance(mask, masks.BothMasks):
        (b1, h1), (b2, h2) = _mask_batch_heads(mask.first, spec), _mask_batch_heads(mask.second, spec)
        return b1 or b2, h1 or h2
    if isinstance(mask, masks.DenseMask):
        b, h = mask.mask4.shape[:2]
        return (spec.batch if b > 1 else None), (spec.heads_q if h > 1 else None)
    if not isinstance(mask, MaskMod):
        return spec.batch, spec.heads_q
    leaves = mask.parts() if hasattr(mask, "parts") else [mask]
    batched = any(isinstance(p, Document) and p.document_ids.dim() == 2 for p in leaves)
    return (spec.batch if batched else None), None


def _block_mask(mask_mod, spec, device):
    """The BlockMask for this mask and shape, built once and cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, heads = _mask_batch_heads(mask_mod, spec)
    if torch.compiler.is_compiling():  # traced: the graph holds the block mask; a cache filled here would
        return create_block_mask(mask_mod, batch, heads, spec.seq_q, spec.seq_kv, device=device)  # recompile
    key = (mask_mod, batch, heads, spec.seq_q, spec.seq_kv, str(device))
    cached = _BLOCK_MASKS.get(key)
    if cached is not None:
        _BLOCK_MASKS.move_to_end(key)
        return cached
    block_mask = create_block_mask(mask_mod, batch, heads, spec.seq_q, spec.seq_kv, device=device)
    _BLOCK_MASKS[key] = block_mask
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


#: ``is_causal`` as a mask: one object made at import (a mask made in traced code is one that not every dynamo
#: can read the attributes of: torch 2.11's cannot, see tests/test_versions.py).
_CAUSAL = Causal()


class TorchFlexBackend(Backend):
    name = "torch_flex"
    SUPPORTED_VENDORS = frozenset({"cpu", "cuda", "rocm", "xpu"})
    SUPPORTS_DROPOUT = False

    def library_label(self, caps) -> str:
        return f"torch {caps.libraries.torch} flex_attention"

    def _why_not(self, spec, caps):
        reasons = []
        if spec.requires_grad and caps.vendor == "cpu":
            reasons.append(Reason(
                "no_backward", f"inputs require grad but torch {caps.libraries.torch} flex_attention has no "
                "backward on CPU",
            ))
        if spec.return_lse and caps.vendor == "cpu":
            reasons.append(Reason(
                "lse_unsupported", f"return_lse=True but compiled torch {caps.libraries.torch} flex_attention "
                "cannot return the lse on CPU",
            ))
        if caps.vendor == "cpu" and min(spec.seq_q, spec.seq_kv) < CPU_MIN_SEQ:
            reasons.append(Reason(
                "seq_too_short", f"sequence length {min(spec.seq_q, spec.seq_kv)} is below {CPU_MIN_SEQ}: torch "
                f"{caps.libraries.torch}'s compiled CPU flex_attention gave wrong results on such short sequences",
            ))
        if min(spec.head_dim, spec.head_dim_v) < MIN_HEAD_DIM:
            reasons.append(Reason(
                "head_dim_too_small",
                f"head_dim {min(spec.head_dim, spec.head_dim_v)} is below {MIN_HEAD_DIM}, the flex_attention minimum",
            ))
        if caps.vendor in ("cuda", "rocm") and caps.libraries.triton is None:
            reasons.append(Reason("not_installed", "compiling flex_attention on a GPU needs triton, not installed"))
        return reasons

    def notes(self, spec, caps):
        cost = "~20 s on CPU" if caps.vendor == "cpu" else "seconds"
        return [f"first call for this shape compiles flex_attention ({cost}); later calls reuse it"]

    def run(self, call: AttentionCall, spec, config=None):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = call.bhsd(call.query), call.bhsd(call.key), call.bhsd(call.value)
        mask_mod, score_mod = call.mask_mod, call.score_mod
        if call.is_causal:
            # Paired, not ``&``-combined: a structured combination made here would be made in traced code.
            mask_mod = _CAUSAL if mask_mod is None else masks.BothMasks(mask_mod, _CAUSAL)
        if call.attn_mask is not None:
            dense_mask, dense_score = masks.from_dense(call.attn_mask)
            mask_mod, score_mod = masks.both(mask_mod, dense_mask), masks.chain(score_mod, dense_score)
        block_mask = _block_mask(mask_mod, spec, q.device) if mask_mod is not None else None
        run = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
        result = run(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=call.scale,
                     enable_gqa=spec.heads_q != spec.heads_kv, return_lse=call.return_lse)
        out, lse = result if call.return_lse else (result, None)
        return call.from_bhsd(out), lse
