"""``reference``: attention in plain PyTorch math, the oracle.  Runs anywhere, in any float dtype.

Shares no code with the fast paths it checks.  Materialises the (B, H, Sq, Sk) score matrix, so it is
meant for tests, tiny problems and as the last resort of the selector.
"""

from __future__ import annotations

import math

import torch

from .base import AttentionCall, Backend, Reason

# The score matrix is B*Hq*Sq*Sk elements: refuse above this many (4 GiB of fp32 scores).
MAX_SCORE_ELEMENTS = 2**30


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    mask_mod=None,
    score_mod=None,
    dropout_p: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hq, Sq, D) x (B, Hkv, Sk, D) x (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv), lse (B, Hq, Sq).

    Computes in ``compute_dtype`` (default: float32 for half inputs, else the input dtype; pass
    ``torch.float64`` for an oracle).  Mods are evaluated with broadcast index tensors.  Fully masked
    rows give zeros and lse -inf.  Both results are in ``compute_dtype``.
    """
    dtype = compute_dtype or (torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    if heads_kv != heads_q:
        k = k.repeat_interleave(heads_q // heads_kv, dim=1)
        v = v.repeat_interleave(heads_q // heads_kv, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale

    device = q.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads_q, device=device).view(1, -1, 1, 1)
    q_idx = torch.arange(seq_q, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(seq_kv, device=device).view(1, 1, 1, -1)
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_idx, kv_idx).to(dtype)

    keep = torch.ones((1, 1, seq_q, seq_kv), dtype=torch.bool, device=device)
    if is_causal:
        keep = keep & (q_idx >= kv_idx)
    if mask_mod is not None:
        keep = keep & mask_mod(b, h, q_idx, kv_idx)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            scores = scores + attn_mask.to(dtype)
    scores = scores.masked_fill(~keep, float("-inf"))

    # Softmax with an explicit max so that fully masked rows give probs 0 and lse -inf with finite grads.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    exp_scores = torch.exp(scores - row_max)
    row_sum = exp_scores.sum(dim=-1, keepdim=True)
    empty = row_sum == 0
    safe_sum = torch.where(empty, torch.ones_like(row_sum), row_sum)
    probs = exp_scores / safe_sum
    lse = torch.where(empty, torch.full_like(row_sum, float("-inf")), row_max + torch.log(safe_sum)).squeeze(-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v)
    return out, lse


class ReferenceBackend(Backend):
    name = "reference"
    SUPPORTED_VENDORS = frozenset({"cpu", "cuda", "rocm", "mps", "xpu"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    BACKWARD_MAY_FAIL = False  # autograd through plain tensor ops

    def library_label(self, caps) -> str:
        return "the reference implementation"

    def _why_not(self, spec, caps):
        elements = spec.batch * spec.heads_q * spec.seq_q * spec.seq_kv
        if elements > MAX_SCORE_ELEMENTS:
            return [Reason(
                "too_large",
                f"would materialise {elements:,} attention scores (B*Hq*Sq*Sk), above its limit of "
                f"{MAX_SCORE_ELEMENTS:,}",
            )]
        return []

    def notes(self, spec, caps):
        return ["plain PyTorch math: materialises the full score matrix (the slow, always-correct fallback)"]

    def run(self, call: AttentionCall, spec, config=None):
        out, lse = reference_attention(
            call.bhsd(call.query), call.bhsd(call.key), call.bhsd(call.value),
            attn_mask=call.attn_mask, is_causal=call.is_causal, scale=call.scale,
            mask_mod=call.mask_mod, score_mod=call.score_mod, dropout_p=call.dropout_p,
        )
        return call.from_bhsd(out.to(call.query.dtype)), (lse.float() if call.return_lse else None)
