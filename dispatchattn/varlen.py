"""``varlen_attention``: packed variable-length sequences (FlashAttention's ``cu_seqlens`` convention).

The packed call is the batch-1 ``bshd`` problem of ``total_q`` queries and ``total_k`` keys under the structured
mask ``packed.Packed`` (each query sees its own sequence's keys; causal per sequence, bottom-right aligned), run by
``api.attention``: the same selector, policy (``backend=``, ``DISPATCHATTN_BACKEND``, ``use_backends``),
explanation and errors.  flash-attn gets ``flash_attn_varlen_func`` with the caller's ``cu_seqlens``, xFormers a
``BlockDiagonalMask``, the flex kernels the mask itself, SDPA a dense mask within its budget, the reference plain
math.  A user's ``score_mod`` / ``mask_mod`` is wrapped so that it sees ``b`` = the sequence index and positions
inside the sequence (``packed.LocalScore`` / ``LocalMask``); the wrapped mods are opaque to the fixed-function
kernels, which then refuse with that reason.
"""

from __future__ import annotations

import torch

from . import api
from .masks import both
from .packed import LocalMask, LocalScore, Packed, index_for
from .scores import Softcap
from .selector import Decision
from .spec import check_max_seqlen, check_varlen, check_varlen_values

__all__ = ["varlen_attention", "explain"]


def _batch_one(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, score_mod,
               mask_mod) -> tuple:
    """(q, k, v as (1, total, H, D) views, score_mod, mask_mod) of the batch-1 problem."""
    check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal)
    total_q, total_k = query.shape[0], key.shape[0]

    def check(cu_q: list[int], cu_k: list[int]) -> None:
        check_varlen_values("q", cu_q, total_q)
        check_varlen_values("k", cu_k, total_k)

    index = index_for(cu_seqlens_q, cu_seqlens_k, total_q, total_k, check)
    if index.lengths is not None:  # eager: the lengths were read once for this pair of tensors
        check_max_seqlen("q", index.lengths[0], max_seqlen_q)
        check_max_seqlen("k", index.lengths[1], max_seqlen_k)
    empty, any_empty = ((index.empty_causal, index.any_empty_causal) if is_causal
                        else (index.empty_plain, index.any_empty_plain))
    packed = Packed(index.q_seq, index.q_rev, index.k_seq, index.k_rev, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, is_causal, None if any_empty is False else empty)
    if mask_mod is not None:
        mask_mod = both(packed, LocalMask(mask_mod, index.q_seq, index.q_local, index.k_local))
    if score_mod is not None and not isinstance(score_mod, Softcap):  # softcap reads no index: as it is
        score_mod = LocalScore(score_mod, index.q_seq, index.q_local, index.k_local)
    return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), score_mod, packed if mask_mod is None else mask_mod


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    score_mod=None,
    mask_mod=None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention over packed variable-length sequences, on the fastest correct kernel for this device.

    ``query (total_q, Hq, D)``, ``key (total_k, Hkv, D)``, ``value (total_k, Hkv, Dv)``; sequence ``s`` owns
    queries ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and keys ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` (int32, starting
    at 0, FlashAttention's convention; lengths may differ between q and k, and may be 0).  ``is_causal``: query
    ``i`` of a sequence with lengths (Lq, Lk) sees keys ``j <= i + Lk - Lq`` (bottom-right, as FlashAttention
    >= 2.1).  ``score_mod`` / ``mask_mod`` see ``b`` = the sequence index and ``q_idx`` / ``kv_idx`` = positions
    inside the sequence.  Returns ``out (total_q, Hq, Dv)``, and with ``return_lse`` also ``lse (Hq, total_q)``
    float32 natural log (flash-attn's varlen layout).  A query row that sees no key gives zeros and lse ``-inf``.

    >>> import torch, dispatchattn as da
    >>> q = k = v = torch.randn(10, 2, 16)
    >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    >>> da.varlen_attention(q, k, v, cu, cu, 7, 7, is_causal=True).shape
    torch.Size([10, 2, 16])
    """
    q, k, v, score, mask = _batch_one(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      is_causal, score_mod, mask_mod)
    result = api.attention(q, k, v, None, 0.0, False, scale, enable_gqa, score_mod=score, mask_mod=mask,
                           layout="bshd", return_lse=return_lse, backend=backend)
    if return_lse:
        out, lse = result
        return out[0], lse[0]
    return result[0]


def explain(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
            scale=None, enable_gqa=False, score_mod=None, mask_mod=None, return_lse=False,
            backend=None) -> Decision:
    """Decide without running: which backend ``varlen_attention`` would use for these arguments, and why."""
    q, k, v, score, mask = _batch_one(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      is_causal, score_mod, mask_mod)
    return api.explain(q, k, v, None, 0.0, False, scale, enable_gqa, score_mod=score, mask_mod=mask, layout="bshd",
                       return_lse=return_lse, backend=backend)
