"""Block sparsity for the Triton flex kernel: which (q tile, kv tile) pairs are empty, full or partial.

Empty tiles are skipped, full tiles run without evaluating the mask_mod, partial tiles evaluate it
element-wise.  The lists follow FlexAttention's ``BlockMask`` layout (int32, contiguous):

- ``kv_num_blocks`` (Bm, Hm, nQ) and ``kv_indices`` (Bm, Hm, nQ, nKV): per q tile, the partial kv
  tiles first-``num`` entries ascending; ``full_kv_num_blocks`` / ``full_kv_indices`` the full ones;
- ``q_num_blocks`` / ``q_indices`` (and ``full_q_*``): the transposes, per kv tile, for dK / dV.

``Bm`` / ``Hm`` are 1 when the mask does not depend on the batch / head (the kernels broadcast).
Structured masks (``da.masks``) classify tiles analytically with ``tile_classes``; opaque mask_mods
are evaluated in chunks of q tiles with bounded memory.  Results are cached per (mask, shape).

>>> import dispatchattn as da
>>> bm = build_block_mask(da.masks.causal(), batch=1, heads=1, seq_q=256, seq_kv=256, block_m=64, block_n=64)
>>> round(bm.fraction_computed, 3)
0.625
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...masks import MaskMod

__all__ = ["BlockMask", "build_block_mask", "refine", "tile_classes"]

#: Largest number of mask elements an opaque mask_mod is evaluated on at once.
CHUNK_ELEMENTS = 1 << 22
_CACHE_SIZE = 32


@dataclass(frozen=True)
class BlockMask:
    """Block-sparse structure of one mask for one problem shape and tile size."""

    block_m: int
    block_n: int
    seq_q: int
    seq_kv: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    full_q_num_blocks: torch.Tensor
    full_q_indices: torch.Tensor
    #: Fraction of (q tile, kv tile) pairs the kernel computes (partial + full), over batch and heads.
    fraction_computed: float
    #: Fraction of tiles where the mask_mod is evaluated element-wise.
    fraction_partial: float

    @property
    def mask_batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def mask_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    def describe(self) -> str:
        return (f"{self.fraction_computed:.1%} of {self.block_m}x{self.block_n} tiles computed "
                f"({self.fraction_partial:.1%} evaluate the mask)")


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _evaluate_block(mask_mod: Callable, b, h, q_range: range, kv_range: range, block_m: int, block_n: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) per tile of one rectangle of whole tiles; positions past the end count as don't-care."""
    q = torch.arange(q_range.start, q_range.stop, device=device, dtype=torch.int32).view(1, 1, -1, 1)
    kv = torch.arange(kv_range.start, kv_range.stop, device=device, dtype=torch.int32).view(1, 1, 1, -1)
    with torch.no_grad():
        allowed = torch.as_tensor(mask_mod(b, h, q, kv), device=device).to(torch.bool)
    rows, cols = len(q_range), len(kv_range)
    allowed = _as_4d(allowed).expand(-1, -1, rows, cols)
    pad = (0, -(-cols // block_n) * block_n - cols, 0, -(-rows // block_m) * block_m - rows)
    tiles = (allowed.shape[0], allowed.shape[1], -1, block_m, -(-cols // block_n), block_n)
    any_ = torch.nn.functional.pad(allowed, pad, value=False).view(tiles).any(5).any(3)
    all_ = torch.nn.functional.pad(allowed, pad, value=True).view(tiles).all(5).all(3)
    return any_, all_


def _opaque_classes(mask_mod: Callable, batch: int, heads: int, seq_q: int, seq_kv: int,
                    block_m: int, block_n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate ``mask_mod`` on broadcast index grids, one rectangle of whole tiles at a time, each of at
    most ``CHUNK_ELEMENTS`` mask elements (or one tile) over the batch and heads."""
    per_tile = max(1, batch * heads * block_m * block_n)
    kv_tiles = max(1, min(-(-seq_kv // block_n), CHUNK_ELEMENTS // per_tile))
    q_tiles = max(1, CHUNK_ELEMENTS // (per_tile * kv_tiles))
    b = torch.arange(batch, device=device, dtype=torch.int32).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device, dtype=torch.int32).view(1, -1, 1, 1)
    rows_any, rows_all = [], []
    for q_first in range(0, seq_q, q_tiles * block_m):
        q_range = range(q_first, min(seq_q, q_first + q_tiles * block_m))
        parts = [_evaluate_block(mask_mod, b, h, q_range, range(kv_first, min(seq_kv, kv_first + kv_tiles * block_n)),
                                 block_m, block_n, device)
                 for kv_first in range(0, seq_kv, kv_tiles * block_n)]
        shape = torch.broadcast_shapes(*(p[0].shape[:2] for p in parts))
        rows_any.append(torch.cat([p[0].expand(*shape, -1, -1) for p in parts], dim=3))
        rows_all.append(torch.cat([p[1].expand(*shape, -1, -1) for p in parts], dim=3))
    shape = torch.broadcast_shapes(*(r.shape[:2] for r in rows_any))
    return (torch.cat([r.expand(*shape, -1, -1) for r in rows_any], dim=2),
            torch.cat([r.expand(*shape, -1, -1) for r in rows_all], dim=2))


def tile_classes(mask_mod: Callable | None, batch: int, heads: int, seq_q: int, seq_kv: int,
                 block_m: int, block_n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(maybe_any, surely_full) bool tensors of shape (Bm, Hm, nQ, nKV); Bm in {1, batch}, Hm in {1, heads}."""
    device = torch.device(device)
    n_q, n_kv = -(-seq_q // block_m), -(-seq_kv // block_n)
    if mask_mod is None:
        ones = torch.ones(1, 1, n_q, n_kv, dtype=torch.bool, device=device)
        return ones, ones
    if isinstance(mask_mod, MaskMod):
        maybe_any, surely_full = mask_mod.bind(seq_q, seq_kv).tile_classes(block_m, block_n, seq_q, seq_kv)
        maybe_any, surely_full = _as_4d(maybe_any.to(device)), _as_4d(surely_full.to(device))
        shape = torch.broadcast_shapes(maybe_any.shape, surely_full.shape)
        return maybe_any.expand(shape), surely_full.expand(shape)
    try:
        return _opaque_classes(mask_mod, batch, heads, seq_q, seq_kv, block_m, block_n, device)
    except Exception:  # noqa: BLE001 - a mask we cannot evaluate in bulk is treated as partial everywhere
        ones = torch.ones(batch, heads, n_q, n_kv, dtype=torch.bool, device=device)
        return ones, torch.zeros_like(ones)


def index_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the count of selected columns and their indices first, ascending."""
    num = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), order.contiguous()


_cache: OrderedDict[tuple, tuple[Callable | None, BlockMask]] = OrderedDict()


def cache_key(mask_mod, *shape) -> tuple | None:
    if mask_mod is None or isinstance(mask_mod, MaskMod):
        return (mask_mod, *shape)
    return (id(mask_mod), *shape)  # opaque callables: the entry holds the function, so its id stays unique


def build_block_mask(mask_mod: Callable | None, *, batch: int, heads: int, seq_q: int, seq_kv: int,
                     block_m: int, block_n: int, device: torch.device | str = "cpu") -> BlockMask:
    """The block-sparse lists of ``mask_mod`` for this problem shape and tile size (cached)."""
    key = cache_key(mask_mod, batch, heads, seq_q, seq_kv, block_m, block_n, str(device))
    hit = _cache.get(key)
    if hit is not None and (hit[0] is mask_mod or isinstance(mask_mod, MaskMod)):
        _cache.move_to_end(key)
        return hit[1]
    maybe_any, surely_full = tile_classes(mask_mod, batch, heads, seq_q, seq_kv, block_m, block_n, device)
    full = surely_full & maybe_any
    partial = maybe_any & ~full
    kv_num, kv_idx = index_lists(partial)
    full_kv_num, full_kv_idx = index_lists(full)
    q_num, q_idx = index_lists(partial.transpose(-1, -2))
    full_q_num, full_q_idx = index_lists(full.transpose(-1, -2))
    block_mask = BlockMask(
        block_m, block_n, seq_q, seq_kv, kv_num, kv_idx, full_kv_num, full_kv_idx,
        q_num, q_idx, full_q_num, full_q_idx,
        fraction_computed=float(maybe_any.float().mean()), fraction_partial=float(partial.float().mean()),
    )
    _cache[key] = (mask_mod, block_mask)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return block_mask


def refine(block_mask: BlockMask, block_m: int, block_n: int) -> BlockMask:
    """``block_mask`` at smaller tiles (``block_m`` / ``block_n`` dividing its own), without the mask_mod.

    Each smaller tile takes the class of the tile it lies in: an empty tile's parts are empty, a full tile's are
    full (every element is kept), a partial tile's are partial (the kernel evaluates the mask_mod there, so this is
    exact, only less sparse than classifying the small tiles afresh).  Used when a launch at the larger tiles
    fails and the index tensors are all there is (inside a compiled graph)."""
    if (block_m, block_n) == (block_mask.block_m, block_mask.block_n):
        return block_mask
    if block_mask.block_m % block_m or block_mask.block_n % block_n:
        raise ValueError(f"block_m/block_n: expected divisors of {block_mask.block_m}/{block_mask.block_n}, "
                         f"got {block_m}/{block_n}")
    n_q, n_kv = -(-block_mask.seq_q // block_m), -(-block_mask.seq_kv // block_n)

    def dense(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(indices.shape[-1], device=indices.device)
        chosen = columns < num.unsqueeze(-1).long()
        selected = torch.zeros(indices.shape, dtype=torch.bool, device=indices.device)
        return selected.scatter_(-1, indices.long(), chosen)

    def finer(selected: torch.Tensor) -> torch.Tensor:
        rows = selected.repeat_interleave(block_mask.block_m // block_m, dim=-2)[..., :n_q, :]
        return rows.repeat_interleave(block_mask.block_n // block_n, dim=-1)[..., :n_kv]

    partial = finer(dense(block_mask.kv_num_blocks, block_mask.kv_indices))
    full = finer(dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    kv_num, kv_idx = index_lists(partial)
    full_kv_num, full_kv_idx = index_lists(full)
    q_num, q_idx = index_lists(partial.transpose(-1, -2))
    full_q_num, full_q_idx = index_lists(full.transpose(-1, -2))
    return BlockMask(block_m, block_n, block_mask.seq_q, block_mask.seq_kv, kv_num, kv_idx, full_kv_num, full_kv_idx,
                     q_num, q_idx, full_q_num, full_q_idx, fraction_computed=block_mask.fraction_computed,
                     fraction_partial=float(partial.float().mean()))
