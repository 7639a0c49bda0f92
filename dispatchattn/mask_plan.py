"""A structured mask as the fixed-function kernels see it: a band ``lo <= kv_idx - q_idx <= hi`` within documents.

flash-attn takes the band as ``window_size`` (and documents as varlen ``cu_seqlens``), xFormers as its attention
bias classes; both read it from ``mask_plan(spec)``, which says why when a mask has no such form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import Causal, Combined, Document, Full, MaskMod, PrefixLM, SlidingWindow
from .packed import Packed
from .spec import AttentionSpec


@dataclass(frozen=True)
class MaskPlan:
    """A structured mask as a band ``lo <= kv_idx - q_idx <= hi`` (None: unbounded) within documents."""

    lo: int | None = None
    hi: int | None = None
    document: Document | Packed | None = None  # Packed: hi 0 is causal per sequence, bottom-right
    problem: str | None = None  # why the mask has no band form

    def empty_rows(self, seq_q: int, seq_kv: int, device) -> torch.Tensor | None:
        """Bool (Sq,) of query rows that attend no key, or None when there are none (documents always
        contain their own diagonal, so only the plain band and packed sequences can empty a row)."""
        if isinstance(self.document, Packed):
            return self.document.empty_rows
        if self.document is not None:
            return None
        first_empty = self.hi is not None and self.hi < 0
        last_empty = self.lo is not None and seq_q - 1 + self.lo > seq_kv - 1
        if not (first_empty or last_empty):
            return None
        i = torch.arange(seq_q, device=device)
        start = (i + self.lo).clamp(min=0) if self.lo is not None else torch.zeros_like(i)
        stop = (i + self.hi).clamp(max=seq_kv - 1) if self.hi is not None else torch.full_like(i, seq_kv - 1)
        return start > stop


def mask_plan(spec: AttentionSpec) -> MaskPlan:
    """The band and document of ``spec``'s mask (``is_causal`` included), or the reason it has none."""
    lo, hi, doc = None, (0 if spec.is_causal else None), None
    mask = spec.mask
    if mask is None:
        return MaskPlan(lo, hi)
    if not isinstance(mask, MaskMod):
        return MaskPlan(problem="opaque")
    if isinstance(mask, Combined) and mask.op != "and":
        return MaskPlan(problem=f"the union mask {mask.__name__} is not a band")
    if isinstance(mask, Packed):  # exactly flash-attn's varlen semantics (causal: bottom-right per sequence)
        if spec.is_causal:
            return MaskPlan(problem="packed sequences with is_causal (top-left over the whole packing) have no "
                            "varlen form")
        return MaskPlan(None, 0 if mask.causal else None, mask)
    for part in mask.parts() if isinstance(mask, Combined) else [mask]:
        part = part.bind(spec.seq_q, spec.seq_kv)
        if isinstance(part, Full):
            continue
        if isinstance(part, Causal):
            hi = part.offset if hi is None else min(hi, part.offset)
        elif isinstance(part, SlidingWindow):
            lo = -part.left if lo is None else max(lo, -part.left)
            hi = part.right if hi is None else min(hi, part.right)
        elif isinstance(part, Document) and doc is None:
            doc = part
        elif isinstance(part, Packed):
            return MaskPlan(problem=f"{part.__name__} combined with another mask has no varlen form")
        elif isinstance(part, PrefixLM):
            return MaskPlan(problem=f"{part.__name__} (bidirectional prefix, causal after) is not a band")
        else:
            return MaskPlan(problem=f"{part.__name__} has no band form")
    return MaskPlan(lo, hi, doc)


def document_runs(document_ids: torch.Tensor, batch: int, seq: int, permute_ok: bool):
    """Run boundaries of packed documents: (int32 cu_seqlens over batch*seq tokens, max run length,
    gather order or None).  Ids of one document split into several runs are gathered into one run (a
    stable sort) when ``permute_ok``; otherwise a ValueError says what to do."""
    ids = document_ids.reshape(-1, seq).expand(batch, seq)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    order = None
    sorted_ids = ids.sort(dim=1, stable=True)
    distinct = (sorted_ids.values[:, 1:] != sorted_ids.values[:, :-1]).sum(1) + 1
    if bool((starts.sum(1) != distinct).any()):
        if not permute_ok:
            raise ValueError(
                "document_ids: a document id appears in separate runs, and the mask also depends on positions "
                "(window or alibi), so flash-attn varlen cannot compute it exactly; give each document one "
                "contiguous run (e.g. ids = (boundaries).cumsum(-1)) or force backend='triton_flex'")
        ids = sorted_ids.values
        order = (sorted_ids.indices + torch.arange(batch, device=ids.device)[:, None] * seq).reshape(-1)
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    flat = torch.nonzero(starts.reshape(-1)).reshape(-1)
    total = torch.tensor([batch * seq], device=flat.device)
    cu = torch.cat([flat, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()), order


def needs_dense_mask(spec: AttentionSpec) -> bool:
    """Whether a kernel that takes no mods (SDPA) needs ``spec``'s mask or score materialised: anything but no mod
    at all, or a plain top-left causal mask_mod (SDPA's ``is_causal``)."""
    mask = spec.mask
    plain_causal = isinstance(mask, Causal) and mask.offset == 0 and spec.attn_mask is None and not spec.is_causal
    return spec.score is not None or (mask is not None and not plain_causal)


def restore_order(out: torch.Tensor, lse: torch.Tensor | None, order: torch.Tensor | None, out_dim: int,
                  lse_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Undo ``document_runs``' reordering of packed tokens (``order``, None when it kept them in place) along the
    token dimension ``out_dim`` of ``out`` and ``lse_dim`` of ``lse``."""
    if order is None:
        return out, lse
    inverse = torch.argsort(order)
    return out.index_select(out_dim, inverse), (lse.index_select(lse_dim, inverse) if lse is not None else None)
