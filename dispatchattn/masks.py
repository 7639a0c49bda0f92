"""Structured mask_mods: FlexAttention-style callables that also tell the selector what they are.

Every object here is a valid ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (so it works with
``torch.nn.attention.flex_attention`` unchanged) and carries its structure, so fixed-function kernels
can be chosen for it and block sparsity is computed analytically, tile by tile, never from an S x S grid.

>>> import dispatchattn as da
>>> mask = da.masks.causal() & da.masks.sliding_window(256)
>>> mask.__name__
'causal_and_sliding_window_256'
"""

from __future__ import annotations

import torch

__all__ = ["MaskMod", "causal", "sliding_window", "prefix_lm", "document", "full", "both", "from_dense"]


def _tile_bounds(block: int, seq: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index of every tile of ``block`` positions over ``seq`` positions (last tile clipped)."""
    first = torch.arange(0, seq, block, device=device)
    last = torch.clamp(first + block - 1, max=seq - 1)
    return first, last


def structure_hash(obj, parts) -> int:
    """``hash(parts())`` for a mod hashed by its structure, or the identity hash of an instance whose attributes are
    not set: torch 2.11's dynamo, before calling an object made inside a compiled region, hashes a stand-in of it
    built without ``__init__`` (to ask whether it is ``random.random``)."""
    try:
        return hash(parts())
    except AttributeError:
        return object.__hash__(obj)


class MaskMod:
    """Base of the structured masks.  Subclasses define ``__call__``, ``key`` and ``tile_classes``."""

    kind: str = "mask"
    #: True when the mask depends on (seq_q, seq_kv) and must be bound to them before it is evaluated.
    needs_lengths: bool = False
    #: The constructor's parameters, in order, each kept as the attribute of the same name: the object's whole
    #: state (``compiled.py`` reads them by name while tracing, and rebuilds the object from them).
    _fields: tuple[str, ...] = ()

    def __call__(self, b, h, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def key(self) -> tuple:
        """Static, hashable structure (no tensor values): what the selector and caches key on."""
        raise NotImplementedError

    def bind(self, seq_q: int, seq_kv: int) -> MaskMod:
        """This mask for a problem of ``seq_q`` queries and ``seq_kv`` keys."""
        return self

    def tile_classes(self, block_m: int, block_n: int, seq_q: int, seq_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(maybe_any, surely_full) per (q tile, kv tile), bool, broadcastable to (B, H, nQ, nKV).

        ``maybe_any`` False means no (q, kv) pair in the tile is attended (the tile is skipped);
        ``surely_full`` True means every pair is attended (the mask is not evaluated in the tile).
        Both are conservative: a "partial" tile is always correct, only slower.
        """
        raise NotImplementedError

    def __and__(self, other: MaskMod) -> MaskMod:
        return Combined("and", self, _as_mask(other))

    def __or__(self, other: MaskMod) -> MaskMod:
        return Combined("or", self, _as_mask(other))

    def __repr__(self) -> str:
        return f"da.masks.{self.__name__}"

    @property
    def __name__(self) -> str:  # attention-gym style: the name says the variant
        return self.kind

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.key == other.key and self._tensor_ids() == other._tensor_ids()

    def __hash__(self) -> int:
        return structure_hash(self, lambda: (self.key, self._tensor_ids()))

    def captured(self) -> tuple[torch.Tensor, ...]:
        """The tensors the mask reads (document ids, ...): caches key on their identity and version."""
        return ()

    def _tensor_ids(self) -> tuple:
        return tuple(id(t) for t in self.captured())


def _as_mask(other) -> MaskMod:
    if not isinstance(other, MaskMod):
        raise TypeError(
            f"mask combination: expected a da.masks object on both sides of & / |, got {type(other).__name__}; "
            "wrap an arbitrary function with a lambda combining both instead"
        )
    return other


class Full(MaskMod):
    kind = "full"

    def __call__(self, b, h, q_idx, kv_idx):
        return (q_idx >= 0) | (kv_idx >= 0)

    @property
    def key(self):
        return ("full",)

    def tile_classes(self, block_m, block_n, seq_q, seq_kv):
        shape = (-(-seq_q // block_m), -(-seq_kv // block_n))
        return torch.ones(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)


class Causal(MaskMod):
    """``q_idx + offset >= kv_idx``: offset 0 is top-left (SDPA's is_causal), Sk - Sq bottom-right."""

    _fields = ("bottom_right", "offset")

    def __init__(self, bottom_right: bool = False, offset: int | None = None):
        self.bottom_right = bool(bottom_right)
        self.offset = offset if offset is not None else (None if bottom_right else 0)
        self.needs_lengths = self.offset is None

    @property
    def kind(self) -> str:
        return "causal_bottom_right" if self.bottom_right else "causal"

    @property
    def key(self):
        return (self.kind, self.offset)

    def bind(self, seq_q, seq_kv):
        if not self.bottom_right:
            return self
        return Causal(bottom_right=True, offset=seq_kv - seq_q)

    def _offset(self) -> int:
        if self.offset is None:
            raise RuntimeError(
                "causal(bottom_right=True) depends on the sequence lengths: pass it to dispatchattn.attention, "
                "or call .bind(seq_q, seq_kv) before using it elsewhere"
            )
        return self.offset

    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx + self._offset() >= kv_idx

    def tile_classes(self, block_m, block_n, seq_q, seq_kv):
        offset = self.bind(seq_q, seq_kv)._offset()
        q_first, q_last = _tile_bounds(block_m, seq_q)
        kv_first, kv_last = _tile_bounds(block_n, seq_kv)
        maybe_any = (q_last[:, None] + offset) >= kv_first[None, :]
        surely_full = (q_first[:, None] + offset) >= kv_last[None, :]
        return maybe_any, surely_full


class SlidingWindow(MaskMod):
    """Keys with ``q_idx - left <= kv_idx <= q_idx + right`` (top-left aligned, like ``causal()``)."""

    _fields = ("left", "right")

    def __init__(self, left: int, right: int = 0):
        self.left = int(left)
        self.right = int(right)

    kind = "sliding_window"

    @property
    def __name__(self) -> str:
        return f"sliding_window_{self.left}" + (f"_{self.right}" if self.right else "")

    @property
    def key(self):
        return ("sliding_window", self.left, self.right)

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)

    def tile_classes(self, block_m, block_n, seq_q, seq_kv):
        q_first, q_last = _tile_bounds(block_m, seq_q)
        kv_first, kv_last = _tile_bounds(block_n, seq_kv)
        q_first, q_last = q_first[:, None], q_last[:, None]
        kv_first, kv_last = kv_first[None, :], kv_last[None, :]
        maybe_any = (kv_last >= q_first - self.left) & (kv_first <= q_last + self.right)
        surely_full = (kv_first >= q_last - self.left) & (kv_last <= q_first + self.right)
        return maybe_any, surely_full


class PrefixLM(MaskMod):
    """Bidirectional inside the first ``prefix_len`` keys, causal (top-left) after them."""

    kind = "prefix_lm"

    _fields = ("prefix_len",)

    def __init__(self, prefix_len: int):
        self.prefix_len = int(prefix_len)

    @property
    def __name__(self) -> str:
        return f"prefix_lm_{self.prefix_len}"

    @property
    def key(self):
        return ("prefix_lm", self.prefix_len)

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.prefix_len) | (q_idx >= kv_idx)

    def tile_classes(self, block_m, block_n, seq_q, seq_kv):
        causal_any, causal_full = Causal().tile_classes(block_m, block_n, seq_q, seq_kv)
        kv_first, kv_last = _tile_bounds(block_n, seq_kv)
        return causal_any | (kv_first < self.prefix_len)[None, :], causal_full | (kv_last < self.prefix_len)[None, :]


class Document(MaskMod):
    """Attend only within the same document: ``document_ids[q_idx] == document_ids[kv_idx]`` (per batch
    row when ``document_ids`` is (B, S))."""

    kind = "document"

    _fields = ("document_ids",)

    def __init__(self, document_ids: torch.Tensor):
        if not isinstance(document_ids, torch.Tensor):
            raise TypeError(
                f"document_ids: expected an integer torch.Tensor of shape (S,) or (B, S), "
                f"got {type(document_ids).__name__}"
            )
        if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
            raise TypeError(f"document_ids: expected an integer dtype, got {document_ids.dtype}")
        if document_ids.dim() not in (1, 2) or document_ids.shape[-1] == 0:
            raise ValueError(
                f"document_ids: expected shape (S,) or (B, S) with S > 0, got {tuple(document_ids.shape)}"
            )
        self.document_ids = document_ids

    @property
    def key(self):
        ids = self.document_ids
        return ("document", tuple(ids.shape), str(ids.dtype), str(ids.device))

    def captured(self) -> tuple[torch.Tensor, ...]:
        return (self.document_ids,)

    def __call__(self, b, h, q_idx, kv_idx):
        ids = self.document_ids
        if ids.dim() == 1:
            return ids[q_idx] == ids[kv_idx]
        return ids[b, q_idx] == ids[b, kv_idx]

    def tile_classes(self, block_m, block_n, seq_q, seq_kv):
        ids = self.document_ids.reshape(-1, self.document_ids.shape[-1]).to("cpu", torch.int64)

        def tile_min_max(block: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
            n_tiles = -(-seq // block)
            pad = n_tiles * block - seq
            part = ids[:, :seq]

            def padded(fill: int) -> torch.Tensor:  # not F.pad: its fill value is a double (int64 extremes overflow)
                return torch.cat([part, torch.full((part.shape[0], pad), fill, dtype=torch.int64)], dim=1)

            lo, hi = padded(torch.iinfo(torch.int64).max), padded(torch.iinfo(torch.int64).min)
            return lo.view(-1, n_tiles, block).amin(-1), hi.view(-1, n_tiles, block).amax(-1)

        q_min, q_max = tile_min_max(block_m, seq_q)
        kv_min, kv_max = tile_min_max(block_n, seq_kv)
        maybe_any = (q_max[:, :, None] >= kv_min[:, None, :]) & (kv_max[:, None, :] >= q_min[:, :, None])
        one_doc = (q_min == q_max)[:, :, None] & (kv_min == kv_max)[:, None, :]
        surely_full = one_doc & (q_min[:, :, None] == kv_min[:, None, :])
        return maybe_any[:, None], surely_full[:, None]  # (B or 1, 1, nQ, nKV)


class Combined(MaskMod):
    _fields = ("op", "left", "right")

    def __init__(self, op: str, left: MaskMod, right: MaskMod):
        self.op = op
        self.left = left
        self.right = right
        self.needs_lengths = left.needs_lengths or right.needs_lengths

    @property
    def kind(self) -> str:
        return self.op

    @property
    def __name__(self) -> str:
        return f"{self.left.__name__}_{self.op}_{self.right.__name__}"

    @property
    def key(self):
        return (self.op, self.left.key, self.right.key)

    def captured(self) -> tuple[torch.Tensor, ...]:
        return self.left.captured() + self.right.captured()

    def parts(self) -> list[MaskMod]:
        """The leaves of a chain of the same operator: (a & b) & c -> [a, b, c]."""
        out = []
        for side in (self.left, self.right):
            out.extend(side.parts() if isinstance(side, Combined) and side.op == self.op else [side])
        return out

    def bind(self, seq_q, seq_kv):
        if not self.needs_lengths:
            return self
        return Combined(self.op, self.left.bind(seq_q, seq_kv), self.right.bind(seq_q, seq_kv))

    def __call__(self, b, h, q_idx, kv_idx):
        a = self.left(b, h, q_idx, kv_idx)
        c = self.right(b, h, q_idx, kv_idx)
        return (a & c) if self.op == "and" else (a | c)

    def tile_classes(self, block_m, block_n, seq_q, seq_kv):
        a_any, a_full = self.left.tile_classes(block_m, block_n, seq_q, seq_kv)
        b_any, b_full = self.right.tile_classes(block_m, block_n, seq_q, seq_kv)
        if self.op == "and":
            return a_any & b_any, a_full & b_full
        return a_any | b_any, a_full | b_full


def full() -> MaskMod:
    """Every key attended (the identity mask)."""
    return Full()


def causal(bottom_right: bool = False) -> MaskMod:
    """Causal mask: top-left aligned like SDPA's ``is_causal`` (``q_idx >= kv_idx``), or bottom-right
    aligned (``q_idx + Sk - Sq >= kv_idx``, the convention of KV-cache decoding and flash-attn >= 2.1)."""
    return Causal(bottom_right=bottom_right)


def sliding_window(left: int, right: int = 0) -> MaskMod:
    """Keys with ``q_idx - left <= kv_idx <= q_idx + right``.  ``sliding_window(w) & causal()`` is the
    usual causal local attention of width ``w + 1`` (Mistral's ``sliding_window=w+1``)."""
    if isinstance(left, bool) or not isinstance(left, int) or left < 0:
        raise ValueError(f"sliding_window: left must be an int >= 0, got {left!r}")
    if isinstance(right, bool) or not isinstance(right, int) or right < 0:
        raise ValueError(f"sliding_window: right must be an int >= 0, got {right!r}")
    return SlidingWindow(left, right)


def prefix_lm(prefix_len: int) -> MaskMod:
    """Bidirectional attention over the first ``prefix_len`` keys, causal after them."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_lm: prefix_len must be an int >= 0, got {prefix_len!r}")
    return PrefixLM(prefix_len)


def document(document_ids: torch.Tensor) -> MaskMod:
    """Packed sequences: attend only within the same document id.  ``document_ids`` is (Sk,) or (B, Sk)."""
    return Document(document_ids)


class _Pair:
    """Two mods applied together, hashable by its parts (caches keyed on a mod stay warm across calls)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __eq__(self, other):
        return type(self) is type(other) and (self.first, self.second) == (other.first, other.second)

    def __hash__(self):
        return structure_hash(self, lambda: (type(self), self.first, self.second))


class BothMasks(_Pair):
    """Keys that both mask_mods keep."""

    def __call__(self, b, h, q_idx, kv_idx):
        return self.first(b, h, q_idx, kv_idx) & self.second(b, h, q_idx, kv_idx)


class ChainedScores(_Pair):
    """``second(first(score))``: two score_mods one after the other."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.second(self.first(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)


def both(first, second):
    """One mask_mod keeping what ``first`` and ``second`` both keep (either may be None).  Two ``da.masks`` objects
    combine with ``&``, which keeps their structure (block sparsity stays analytic); anything else pairs up."""
    if first is None or second is None:
        return first if second is None else second
    if isinstance(first, MaskMod) and isinstance(second, MaskMod):
        return first & second
    return BothMasks(first, second)


def chain(first, second):
    """One score_mod applying ``first`` then ``second`` (either may be None)."""
    if first is None or second is None:
        return first if second is None else second
    return ChainedScores(first, second)


class _DenseLookup:
    """An SDPA ``attn_mask`` read by index (broadcast dims at index 0); equal when it reads the same tensor."""

    def __init__(self, attn_mask: torch.Tensor):
        self.attn_mask = attn_mask
        self.mask4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))

    def at(self, b, h, q_idx, kv_idx):
        index = [i if size > 1 else i * 0 for i, size in zip((b, h, q_idx, kv_idx), self.mask4.shape)]
        return self.mask4[index[0], index[1], index[2], index[3]]

    def __eq__(self, other):
        return type(self) is type(other) and self.attn_mask is other.attn_mask

    def __hash__(self):
        return structure_hash(self, lambda: id(self.attn_mask))


class DenseMask(_DenseLookup):
    """A boolean ``attn_mask`` (True = attend) as a mask_mod."""

    def __call__(self, b, h, q_idx, kv_idx):
        return self.at(b, h, q_idx, kv_idx)


class DenseBias(_DenseLookup):
    """An additive float ``attn_mask`` as a score_mod."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.at(b, h, q_idx, kv_idx).to(score.dtype)


def from_dense(attn_mask: torch.Tensor) -> tuple[DenseMask | None, DenseBias | None]:
    """An SDPA ``attn_mask`` as FlexAttention mods: ``(mask_mod, None)`` for a boolean mask, ``(None, score_mod)``
    for an additive float one.  For the flex kernels, which take mods rather than a dense mask.

    >>> import torch
    >>> mask_mod, score_mod = from_dense(torch.ones(4, 4, dtype=torch.bool).tril())
    >>> bool(mask_mod(0, 0, torch.tensor(1), torch.tensor(2))), score_mod
    (False, None)
    """
    if attn_mask.dtype == torch.bool:
        return DenseMask(attn_mask), None
    return None, DenseBias(attn_mask)
