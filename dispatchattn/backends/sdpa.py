"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks flash / efficient /
cuDNN / math inside).

Structured masks become SDPA arguments: top-left causal -> ``is_causal``; anything else -> a dense mask,
built only under a memory budget (``DISPATCHATTN_DENSE_MASK_BUDGET_MB``, default 256) that the
explanation states in bytes.  Additive scores (ALiBi, relative bias) become a dense float bias the same
way; non-additive ones (softcap, arbitrary score_mods) are refused.  Rows whose every key is masked are
set to zeros (SDPA's kernels may return NaN or an average there).  A dense mask built from ``da.masks`` /
``da.scores`` alone is cached per (structure, captured tensors and their versions, shape, device, dtype),
all cached masks together within the same budget.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from .. import envs
from ..mask_plan import needs_dense_mask
from ..masks import Causal, Document, MaskMod
from ..scores import Alibi, RelativeBias, ScoreMod
from .base import AttentionCall, Backend, Reason

ADDITIVE_SCORES = (Alibi, RelativeBias)


def _dense_mask_shape(spec) -> tuple[int, int, int, int]:
    """Shape of the dense mask/bias SDPA needs for this spec's mods (1 where it broadcasts)."""
    b = h = 1
    mask = spec.mask
    if mask is not None:
        if not isinstance(mask, MaskMod):
            b, h = spec.batch, spec.heads_q  # an opaque mask_mod may depend on both
        elif any(isinstance(p, Document) and p.document_ids.dim() == 2 for p in _leaves(mask)):
            b = spec.batch
    if spec.score is not None:
        h = spec.heads_q
    return (b, h, spec.seq_q, spec.seq_kv)


def _leaves(mask: MaskMod) -> list[MaskMod]:
    return mask.parts() if hasattr(mask, "parts") else [mask]


def dense_bytes(spec) -> int:
    b, h, sq, sk = _dense_mask_shape(spec)
    element = spec.dtype.itemsize if spec.score is not None else 1
    return b * h * sq * sk * element


def _non_defaults(spec) -> dict:
    """The SDPA keywords (but ``is_causal`` and ``attn_mask``) whose value for ``spec`` is not SDPA's default:
    only those are passed, since each keyword costs time on the warm path."""
    kwargs = {}
    if spec.heads_q != spec.heads_kv:
        kwargs["enable_gqa"] = True
    if spec.scale is not None:
        kwargs["scale"] = spec.scale
    if spec.dropout_p:
        kwargs["dropout_p"] = spec.dropout_p
    return kwargs


class SdpaBackend(Backend):
    name = "sdpa"
    SUPPORTED_VENDORS = frozenset({"cpu", "cuda", "rocm", "mps", "xpu"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    SUPPORTS_LSE = False  # F.scaled_dot_product_attention returns only the output

    def library_label(self, caps) -> str:
        return f"torch {caps.libraries.torch} SDPA"

    def _why_not(self, spec, caps):
        reasons = []
        score = spec.score
        if score is not None and not isinstance(score, ADDITIVE_SCORES):
            what = score.__name__ if isinstance(score, ScoreMod) else "an arbitrary score_mod"
            reasons.append(Reason(
                "score_mod_unsupported",
                f"{what} is not an additive bias, so it cannot be passed to SDPA as a mask",
            ))
        if needs_dense_mask(spec):
            need, budget = dense_bytes(spec), envs.dense_mask_budget_bytes()
            if need > budget:
                reasons.append(Reason(
                    "dense_mask_too_large",
                    f"would build a dense {list(_dense_mask_shape(spec))} mask of {need / 2**20:,.1f} MiB, above "
                    f"the {budget / 2**20:,.0f} MiB budget (DISPATCHATTN_DENSE_MASK_BUDGET_MB)",
                ))
        if spec.mods_need_grad:
            reasons.append(Reason(
                "mod_grad_unsupported", "a score_mod's captured tensor requires grad; SDPA's mask gets no gradient"
            ))
        return reasons

    def notes(self, spec, caps):
        if needs_dense_mask(spec):
            shape = list(_dense_mask_shape(spec))
            return [f"builds a dense {shape} mask/bias ({dense_bytes(spec) / 2**20:,.2f} MiB) from the mask/score mods"]
        return []

    def direct_arguments(self, spec) -> tuple | None:
        """``(dropout_p, is_causal, scale, enable_gqa)`` of one ``F.scaled_dot_product_attention(query, key, value,
        None, *arguments)`` call that computes ``spec`` as it is, or None.  Only calls that reach SDPA unchanged:
        no mask tensor (its rows must be checked for emptiness per call), no dense mask to build, no transpose,
        no lse."""
        if spec.layout != "bhsd" or spec.attn_mask is not None or spec.return_lse or needs_dense_mask(spec):
            return None
        return (spec.dropout_p, spec.is_causal or isinstance(spec.mask, Causal), spec.scale,
                spec.heads_q != spec.heads_kv)

    def direct(self, spec, caps=None, config=None):
        arguments = self.direct_arguments(spec)
        if arguments is None:
            return None
        is_causal, kwargs = arguments[1], _non_defaults(spec)
        sdpa = F.scaled_dot_product_attention
        if not kwargs:  # the common case, without unpacking keywords on each call (~0.3 us)
            return lambda query, key, value: sdpa(query, key, value, is_causal=is_causal)
        return lambda query, key, value: sdpa(query, key, value, is_causal=is_causal, **kwargs)

    def run(self, call: AttentionCall, spec, config=None):
        if call.layout == "bhsd":
            q, k, v = call.query, call.key, call.value
        else:
            q, k, v = call.query.transpose(1, 2), call.key.transpose(1, 2), call.value.transpose(1, 2)
        is_causal = call.is_causal
        attn_mask, empty_rows = call.attn_mask, None
        if needs_dense_mask(spec) or (is_causal and attn_mask is not None):
            attn_mask, empty_rows = _dense_mask(call, spec, q.device, q.dtype)
            is_causal = False
        else:
            is_causal = is_causal or isinstance(call.mask_mod, Causal)
            if attn_mask is not None:
                empty_rows = _empty_rows(attn_mask)
        kwargs = _non_defaults(spec)
        if attn_mask is not None:
            kwargs["attn_mask"] = attn_mask
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **kwargs)
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0.0)
        return call.from_bhsd(out), None


_DENSE_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()


def _dense_key(call: AttentionCall, spec, device, dtype) -> tuple | None:
    """Cache key of a dense mask built from ``da.masks`` / ``da.scores`` alone; None when the call has a
    mask of its own or an opaque mod (a lambda may read anything)."""
    mods = [m for m in (call.mask_mod, call.score_mod) if m is not None]
    if call.attn_mask is not None or not all(isinstance(m, (MaskMod, ScoreMod)) for m in mods):
        return None
    versions = tuple(t._version for m in mods for t in m.captured())  # in-place edits make a new key
    return (call.mask_mod, call.score_mod, call.is_causal, _dense_mask_shape(spec), str(device), dtype, versions)


def _dense_mask(call: AttentionCall, spec, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dense mask or bias, rows with no key or None when there are none), cached when ``_dense_key`` allows."""
    key = None if torch.compiler.is_compiling() else _dense_key(call, spec, device, dtype)
    cached = _DENSE_CACHE.get(key) if key is not None else None
    if cached is not None:
        _DENSE_CACHE.move_to_end(key)
        return cached
    mask = _build_dense(call, spec, device, dtype)
    empty = _empty_rows(mask)
    if key is None:
        return mask, empty
    entry = (mask, empty if bool(empty.any()) else None)  # checked once per cached mask, not per call
    _DENSE_CACHE[key] = entry
    budget = envs.dense_mask_budget_bytes()
    while len(_DENSE_CACHE) > 1 and sum(m.nbytes for m, _ in _DENSE_CACHE.values()) > budget:
        _DENSE_CACHE.popitem(last=False)
    return entry


def _build_dense(call: AttentionCall, spec, device, dtype) -> torch.Tensor:
    """One mask for SDPA: bool when only masks are involved, additive float when a score bias is."""
    b_dim, h_dim, seq_q, seq_kv = _dense_mask_shape(spec)
    b = torch.arange(b_dim, device=device).view(-1, 1, 1, 1)
    h = torch.arange(h_dim, device=device).view(1, -1, 1, 1)
    q_idx = torch.arange(seq_q, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(seq_kv, device=device).view(1, 1, 1, -1)
    keep = None
    if call.mask_mod is not None:
        keep = call.mask_mod(b, h, q_idx, kv_idx)
    if call.is_causal:
        causal = q_idx >= kv_idx
        keep = causal if keep is None else keep & causal
    user = call.attn_mask
    if user is not None and user.dtype == torch.bool:
        keep = user if keep is None else keep & user
    bias = None
    if call.score_mod is not None:
        zero = torch.zeros((), device=device, dtype=torch.float32)
        bias = call.score_mod(zero, b, h, q_idx, kv_idx).to(dtype)
    if user is not None and user.dtype != torch.bool:
        bias = user if bias is None else bias + user
    if bias is None:
        return keep
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    return bias


def _empty_rows(attn_mask: torch.Tensor) -> torch.Tensor:
    """Rows whose every key is masked, (..., Sq, 1) bool: the contract makes them zeros, whatever SDPA's kernel
    returned there."""
    if attn_mask.dtype == torch.bool:
        return ~attn_mask.any(dim=-1, keepdim=True)
    return ~(attn_mask != float("-inf")).any(dim=-1, keepdim=True)
