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

__all__ = ["BlockMask", "build_block_mask", "tile_classes"]

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


def _opaque_classes(mask_mod: Callable, batch: int, heads: int, seq_q: int, seq_kv: int,
                    block_m: int, block_n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate ``mask_mod`` on broadcast index grids, ``rows`` q positions at a time (whole q tiles)."""
    n_kv = -(-seq_kv // block_n)
    tiles_per_chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * seq_kv * block_m))
    b = torch.arange(batch, device=device, dtype=torch.int32).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device, dtype=torch.int32).view(1, -1, 1, 1)
    kv = torch.arange(seq_kv, device=device, dtype=torch.int32).view(1, 1, 1, -1)
    anys, fulls = [], []
    for first in range(0, seq_q, tiles_per_chunk * block_m):
        last = min(seq_q, first + tiles_per_chunk * block_m)
        q = torch.arange(first, last, device=device, dtype=torch.int32).view(1, 1, -1, 1)
        with torch.no_grad():
            allowed = torch.as_tensor(mask_mod(b, h, q, kv), device=device).to(torch.bool)
        allowed = _as_4d(allowed).expand(-1, -1, last - first, seq_kv)
        pad = (0, n_kv * block_n - seq_kv, 0, -(-(last - first) // block_m) * block_m - (last - first))
        tiles = (allowed.shape[0], allowed.shape[1], -1, block_m, n_kv, block_n)
        anys.append(torch.nn.functional.pad(allowed, pad, value=False).view(tiles).any(5).any(3))
        fulls.append(torch.nn.functional.pad(allowed, pad, value=True).view(tiles).all(5).all(3))
    shape = torch.broadcast_shapes(*(a.shape[:2] for a in anys))
    expand = lambda parts: torch.cat([p.expand(*shape, -1, -1) for p in parts], dim=2)  # noqa: E731
    return expand(anys), expand(fulls)


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


def _index_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the count of selected columns and their indices first, ascending."""
    num = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), order.contiguous()


_cache: OrderedDict[tuple, BlockMask] = OrderedDict()


def _cache_key(mask_mod, *shape) -> tuple | None:
    if mask_mod is None or isinstance(mask_mod, MaskMod):
        return (mask_mod, *shape)
    return (id(mask_mod), *shape)  # opaque callables: the entry keeps the function alive (bounded LRU)


def build_block_mask(mask_mod: Callable | None, *, batch: int, heads: int, seq_q: int, seq_kv: int,
                     block_m: int, block_n: int, device: torch.device | str = "cpu") -> BlockMask:
    """The block-sparse lists of ``mask_mod`` for this problem shape and tile size (cached)."""
    key = _cache_key(mask_mod, batch, heads, seq_q, seq_kv, block_m, block_n, str(device))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    maybe_any, surely_full = tile_classes(mask_mod, batch, heads, seq_q, seq_kv, block_m, block_n, device)
    full = surely_full & maybe_any
    partial = maybe_any & ~full
    kv_num, kv_idx = _index_lists(partial)
    full_kv_num, full_kv_idx = _index_lists(full)
    q_num, q_idx = _index_lists(partial.transpose(-1, -2))
    full_q_num, full_q_idx = _index_lists(full.transpose(-1, -2))
    block_mask = BlockMask(
        block_m, block_n, seq_q, seq_kv, kv_num, kv_idx, full_kv_num, full_kv_idx,
        q_num, q_idx, full_q_num, full_q_idx,
        fraction_computed=float(maybe_any.float().mean()), fraction_partial=float(partial.float().mean()),
    )
    _cache[key] = block_mask
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    _cache[key] = block_mask
    return block_mask
