"""Packed sequences (FlashAttention's varlen convention) as a structured mask over one long (total_q, total_k) problem.

``da.varlen_attention`` runs B sequences packed along the token axis: sequence ``s`` owns queries
``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and keys ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``.  As one batch-1 problem of
``total_q`` queries and ``total_k`` keys, that is the mask ``Packed``: a query attends only to keys of its own
sequence and, when causal, to keys ``j <= i + Lk - Lq`` in the sequence's own positions (bottom-right aligned,
FlashAttention >= 2.1).  Since ``i - Lq`` and ``j - Lk`` are positions counted from the sequence's end, causal is
``q_rev[q_idx] >= k_rev[kv_idx]`` with ``rev = position - cu_seqlens[s + 1]``: two table reads, no lengths.

``PackedIndex`` holds those per-token tables (sequence index, position inside the sequence, position from the
end), built from ``cu_seqlens`` with tensor ops only (``searchsorted``: traceable, no ``.item()``) and, in eager
mode, once per pair of ``cu_seqlens`` tensors (``index_for``: keyed on their identity and version).
``LocalMask`` / ``LocalScore`` wrap a user's mod so that it sees ``(b, h, q_idx, kv_idx)`` = (sequence index,
head, position inside the sequence, position inside the sequence).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .masks import MaskMod, structure_hash

__all__ = ["Packed", "PackedIndex", "LocalMask", "LocalScore", "build_index", "index_for"]


@dataclass(frozen=True, eq=False)
class PackedIndex:
    """Per-token tables of one packing (int32 unless said): for queries ``q_seq`` (sequence index), ``q_local``
    (position inside the sequence), ``q_rev`` (position - length, < 0); the same for keys; ``empty_plain`` /
    ``empty_causal`` (bool, (total_q,)): query rows that see no key without / with the causal mask.  ``lengths``:
    eager only, the (q lengths, kv lengths) as Python lists (None while compiling)."""

    q_seq: torch.Tensor
    q_local: torch.Tensor
    q_rev: torch.Tensor
    k_seq: torch.Tensor
    k_local: torch.Tensor
    k_rev: torch.Tensor
    empty_plain: torch.Tensor
    empty_causal: torch.Tensor
    lengths: tuple[list[int], list[int]] | None = None
    any_empty_plain: bool | None = None  # eager only: whether the tables hold an empty row
    any_empty_causal: bool | None = None


def _token_tables(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence index, position inside it, position - its length) of each of ``total`` packed tokens."""
    cu = cu.long()
    tokens = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu, tokens, right=True) - 1  # the last sequence starting at or before the token
    local = tokens - cu[seq]
    rev = tokens - cu[seq + 1]
    return seq.int(), local.int(), rev.int()


def build_index(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
                lengths: tuple[list[int], list[int]] | None = None) -> PackedIndex:
    """The tables of one packing, with tensor ops only (traceable).  ``lengths``: the sequence lengths already
    read in eager mode (then the Python-side facts are filled in), or None while compiling."""
    q_seq, q_local, q_rev = _token_tables(cu_seqlens_q, total_q)
    k_seq, k_local, k_rev = _token_tables(cu_seqlens_k, total_k)
    kv_lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).int()
    q_kv_length = kv_lengths[q_seq.long()]  # keys of each query's sequence
    empty_plain = q_kv_length == 0
    empty_causal = (q_rev + q_kv_length) < 0  # i - Lq + Lk < 0: before the bottom-right diagonal starts
    if lengths is None:
        return PackedIndex(q_seq, q_local, q_rev, k_seq, k_local, k_rev, empty_plain, empty_causal)
    pairs = list(zip(*lengths))
    return PackedIndex(q_seq, q_local, q_rev, k_seq, k_local, k_rev, empty_plain, empty_causal, lengths,
                       any(lk == 0 < lq for lq, lk in pairs), any(lq > lk for lq, lk in pairs))


# Eager cache: (id, version) of both cu_seqlens tensors -> (weak references to them, PackedIndex).  A tensor edited in
# place has a new version (a new entry); a freed one leaves its entry unreachable until it is evicted.
_INDEX_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_INDEX_CACHE_SIZE = 32


def index_for(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
              check=None) -> PackedIndex:
    """``build_index`` once per pair of cu_seqlens tensors (eager), after ``check(cu_q values, cu_k values)`` (lists
    of ints: the value checks, raising on bad input).  While compiling: built in the graph, unchecked, not cached."""
    if torch.compiler.is_compiling():
        return build_index(cu_seqlens_q, cu_seqlens_k, total_q, total_k)
    key = (id(cu_seqlens_q), cu_seqlens_q._version, id(cu_seqlens_k), cu_seqlens_k._version, total_q, total_k)
    hit = _INDEX_CACHE.get(key)
    if hit is not None and hit[0]() is cu_seqlens_q and hit[1]() is cu_seqlens_k:
        _INDEX_CACHE.move_to_end(key)
        return hit[2]
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # one read of the values per pair of tensors
    if check is not None:
        check(cu_q, cu_k)
    lengths = ([b - a for a, b in zip(cu_q, cu_q[1:])], [b - a for a, b in zip(cu_k, cu_k[1:])])
    index = build_index(cu_seqlens_q, cu_seqlens_k, total_q, total_k, lengths)
    _INDEX_CACHE[key] = (weakref.ref(cu_seqlens_q), weakref.ref(cu_seqlens_k), index)
    if len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
        _INDEX_CACHE.popitem(last=False)
    return index


def clear_cache() -> None:
    _INDEX_CACHE.clear()


def _tile_min_max(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``values`` over each tile of ``block`` tokens (the last tile padded with its last value)."""
    n_tiles = -(-values.shape[0] // block)
    pad = n_tiles * block - values.shape[0]
    padded = torch.cat([values, values[-1:].expand(pad)]).view(n_tiles, block)
    return padded.amin(-1), padded.amax(-1)


class Packed(MaskMod):
    """Packed sequences: ``q_seq[q_idx] == k_seq[kv_idx]``, and per sequence bottom-right causal
    ``q_rev[q_idx] >= k_rev[kv_idx]`` when ``causal``.  Carries the caller's int32 ``cu_seqlens_q`` /
    ``cu_seqlens_k`` and ``max_seqlen_q`` / ``max_seqlen_k`` for flash-attn's varlen entry point, and
    ``empty_rows`` (bool (total_q,), None when known to be none) for the kernels that need it said."""

    kind = "packed"
    _fields = ("q_seq", "q_rev", "k_seq", "k_rev", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
               "causal", "empty_rows")

    def __init__(self, q_seq, q_rev, k_seq, k_rev, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                 max_seqlen_k: int, causal: bool, empty_rows=None):
        self.q_seq, self.q_rev, self.k_seq, self.k_rev = q_seq, q_rev, k_seq, k_rev
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k
        self.causal = causal
        self.empty_rows = empty_rows

    @property
    def __name__(self) -> str:
        return f"packed_{self.cu_seqlens_q.shape[0] - 1}_sequences" + ("_causal" if self.causal else "")

    @property
    def key(self):
        return ("packed", self.causal, self.max_seqlen_q, self.max_seqlen_k, tuple(self.cu_seqlens_q.shape),
                tuple(self.q_seq.shape), tuple(self.k_seq.shape), self.empty_rows is not None, str(self.q_seq.device))

    def captured(self) -> tuple[torch.Tensor, ...]:
        tensors = (self.q_seq, self.q_rev, self.k_seq, self.k_rev, self.cu_seqlens_q, self.cu_seqlens_k)
        return tensors + ((self.empty_rows,) if self.empty_rows is not None else ())

    def __call__(self, b, h, q_idx, kv_idx):
        same = self.q_seq[q_idx] == self.k_seq[kv_idx]
        if not self.causal:
            return same
        return same & (self.q_rev[q_idx] >= self.k_rev[kv_idx])

    def tile_classes(self, block_m, block_n, seq_q, seq_kv):
        qs_min, qs_max = _tile_min_max(self.q_seq, block_m)
        ks_min, ks_max = _tile_min_max(self.k_seq, block_n)
        maybe_any = (qs_max[:, None] >= ks_min[None, :]) & (ks_max[None, :] >= qs_min[:, None])
        surely_full = (qs_min == qs_max)[:, None] & (ks_min == ks_max)[None, :] & (qs_min[:, None] == ks_min[None, :])
        if self.causal:
            qr_min, qr_max = _tile_min_max(self.q_rev, block_m)
            kr_min, kr_max = _tile_min_max(self.k_rev, block_n)
            maybe_any = maybe_any & (qr_max[:, None] >= kr_min[None, :])
            surely_full = surely_full & (qr_min[:, None] >= kr_max[None, :])
        return maybe_any, surely_full


class _Local:
    """A user's mod seen through a packing: equal (and hashed) by the mod and the tables' identity, so caches keyed
    on it stay warm across calls with the same cu_seqlens.  ``__wrapped__`` is the user's mod."""

    def __init__(self, mod, q_seq, q_local, k_local):
        self.__wrapped__ = mod
        self.q_seq, self.q_local, self.k_local = q_seq, q_local, k_local

    @property
    def __name__(self) -> str:
        return f"local_{getattr(self.__wrapped__, '__name__', type(self.__wrapped__).__name__)}"

    def __eq__(self, other):
        return type(self) is type(other) and self.__wrapped__ == other.__wrapped__ and all(
            a is b for a, b in zip((self.q_seq, self.q_local, self.k_local), (other.q_seq, other.q_local,
                                                                              other.k_local)))

    def __hash__(self):
        return structure_hash(self, lambda: (type(self), self.__wrapped__, id(self.q_seq), id(self.q_local),
                                             id(self.k_local)))


class LocalMask(_Local):
    """``mask_mod(sequence index, h, position in the sequence, position in the sequence)``."""

    def __call__(self, b, h, q_idx, kv_idx):
        return self.__wrapped__(self.q_seq[q_idx], h, self.q_local[q_idx], self.k_local[kv_idx])


class LocalScore(_Local):
    """``score_mod(score, sequence index, h, position in the sequence, position in the sequence)``."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.__wrapped__(score, self.q_seq[q_idx], h, self.q_local[q_idx], self.k_local[kv_idx])
