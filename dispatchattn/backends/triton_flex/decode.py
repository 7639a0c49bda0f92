"""Split-KV ("flash-decoding") kernels of triton_flex for few query rows (decoding, speculative decoding).

With Sq <= ``MAX_DECODE_SEQ_Q`` the forward kernel's grid (q tiles x batch x q heads) has one tiny q tile per
program, and every q head of a GQA group re-reads the same keys.  Here one program takes all ``Sq x groups``
query rows of one kv head as the M dimension of ``tl.dot`` (padded to at least 16 rows, or to the target's
matrix-instruction minimum given by the config's ``block_m``), so GQA decoding uses the tensor cores and reads
each K/V tile once per group; the kv tiles of one (batch, kv head) are spread over ``num_splits`` programs.

- ``decode_kernel``: grid (B * Hkv, num_splits, row tiles); online softmax in fp32 over the split's share of
  the partial kv tiles (score_mod + mask_mod) then of the full ones (score_mod only), applying the same
  generated mods through the forward kernel's ``kernels.score_tile``, with ``h`` the q head of each row and ``q_idx``
  the query's own index 0..Sq-1 (FlexAttention semantics, exactly as the forward kernel passes it); writes a
  normalised partial output and its log2-domain lse per split to fp32 scratch.
- ``decode_reduce_kernel``: merges the splits into ``out`` (input dtype) and ``lse`` (fp32, natural log);
  rows no split saw a key of get ``out = 0`` and ``lse = -inf``.

Block sparsity: the block mask of the whole Sq (one q tile) is reduced over the q heads of each GQA group (a kv
tile is computed when any head of the group keeps a key of it, and skips the mask_mod only when it is full
for every head), so empty tiles are skipped and the mask is evaluated element-wise where needed.

Tile config: the "decode" kind of ``tuning`` (BLOCK_N, warps, stages; ``block_m`` the smallest row
tile).  ``num_splits`` comes from ``decoding_plan``: enough programs for ``WAVES`` per SM / CU, at most one
split per kv tile.  Ahead of time (``python -m dispatchattn aot --kernel decode,decode_reduce``) the kernel is
compiled at BLOCK_M = the config's ``block_m``, i.e. up to that many Sq x groups rows; calls with more rows pad
BLOCK_M up to ``MAX_BLOCK_ROWS`` (checked by hand, not by the tests), then use more row tiles.  With one split
the reduction still runs (a copy of out and lse: one small extra launch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton

from ...masks import MaskMod
from ...tuning.config import TileConfig
from .block_mask import cache_key, index_lists, tile_classes
from .decode_kernels import decode_kernel, decode_reduce_kernel
from .kernels import (
    Launch,
    head_constexprs,
    launch_signature,
    launch_specialization,
    mask_strides,
    mod_constexprs,
    padded,
)

__all__ = ["MAX_DECODE_SEQ_Q", "KERNELS", "decode_attention", "decode_flex_attention", "decoding_plan",
           "multiprocessors", "num_splits_for", "block_rows", "group_lists", "decode_launch", "reduce_launch",
           "launch_config", "aot_entry", "runs"]

#: Largest query length the decoding kernel takes (decoding: 1; speculative decoding: a few draft tokens).
MAX_DECODE_SEQ_Q = 16
#: Largest row tile beyond the config's ``block_m``: more rows (Sq x groups) are split over several row tiles of
#: the grid.  Measured with Triton 3.9 (bf16 D=128, the shipped 16x32 w4 s3 on sm_80): 32 rows fit (255 registers,
#: no spill), 64 rows spill 320 B; on gfx942 (16x64 w4) 32 and 64 rows fit.
MAX_BLOCK_ROWS = 32
#: Splits on CPU (Triton's interpreter): fixed, so the split path is exercised; the number of GPU SMs is unknown.
CPU_SPLITS = 2
#: Most splits of one (batch, kv head): the reduction reads every split's partial output.
MAX_SPLITS = 64
#: Programs per SM / CU the split heuristic aims for (two resident blocks hide each other's loads).
WAVES = 2
#: SMs assumed for a GPU whose count is unknown (a synthetic ``DeviceCaps`` in an explanation).
UNKNOWN_GPU_MULTIPROCESSORS = 108
#: Calls that ran the decoding kernel (for tests and benchmarks: which kernel really ran).
runs = {"decode": 0}


# ---------------------------------------------------------------------------------------------------
# Launch arguments (shared by the launcher below and ``aot_entry``)
# ---------------------------------------------------------------------------------------------------

#: The decoding launches, by the names ``aot_entry`` (and ``python -m dispatchattn aot --kernel``) accept.
KERNELS: dict[str, str] = {
    "decode": "decoding: partial out/lse of Sq x groups rows per split of the kv tiles, grid (B * Hkv, splits, "
              "row tiles)",
    "decode_reduce": "decoding: merge the splits into out and lse, grid (cdiv(B * Hq * Sq, BLOCK_R))",
}
_JIT = {"decode": decode_kernel, "decode_reduce": decode_reduce_kernel}
REDUCE_ROWS = 16


class DecodeLaunch(Launch):
    @property
    def jit_fn(self):
        return _JIT[self.kernel]


def multiprocessors(caps) -> int | None:
    """SMs / CUs of the device (``caps``), a typical count for a GPU that did not report one, None on CPU."""
    if not caps.is_gpu:
        return None
    return caps.multiprocessor_count or UNKNOWN_GPU_MULTIPROCESSORS


def decoding_plan(batch: int, heads_q: int, heads_kv: int, seq_q: int, seq_kv: int, config: TileConfig,
                  caps) -> tuple[int, int, int]:
    """(BLOCK_M, row tiles, num_splits) of a decoding call with ``config`` on ``caps``'s device."""
    rows = seq_q * (heads_q // heads_kv)
    block_m = block_rows(seq_q, heads_q // heads_kv, config)
    row_tiles = triton.cdiv(rows, block_m)
    return block_m, row_tiles, num_splits_for(batch, heads_kv, row_tiles, seq_kv, config.block_n,
                                              multiprocessors(caps))


def block_rows(seq_q: int, groups: int, config: TileConfig) -> int:
    """BLOCK_M of the decoding kernel: Sq x groups rows padded to a power of two, at least the config's
    ``block_m`` (16, or the 64 rows wgmma / tcgen05 need), else at most ``MAX_BLOCK_ROWS`` (more rows: more tiles)."""
    return max(config.block_m, min(MAX_BLOCK_ROWS, padded(seq_q * groups)))


def num_splits_for(batch: int, heads_kv: int, row_tiles: int, seq_kv: int, block_n: int,
                   multiprocessors: int | None) -> int:
    """Splits of the kv tiles: enough programs for ``WAVES`` per SM / CU, at most one per kv tile and
    ``MAX_SPLITS``; ``CPU_SPLITS`` when the SM count is unknown (CPU)."""
    kv_tiles = max(1, triton.cdiv(seq_kv, block_n))
    if not multiprocessors:
        return min(CPU_SPLITS, kv_tiles)
    programs = batch * heads_kv * row_tiles
    return max(1, min(triton.cdiv(WAVES * multiprocessors, programs), kv_tiles, MAX_SPLITS))


@dataclass(frozen=True)
class GroupLists:
    """Block-sparse kv lists per (batch, kv head): (num (Bm, Hm, 1), idx (Bm, Hm, 1, nKV)) x (partial, full)."""

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: torch.Tensor
    full_kv_idx: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.kv_num, self.kv_idx, self.full_kv_num, self.full_kv_idx


_lists_cache: OrderedDict[tuple, tuple[object, GroupLists]] = OrderedDict()
_CACHE_SIZE = 32


def group_lists(mask_mod, *, batch: int, heads_q: int, heads_kv: int, seq_q: int, seq_kv: int, block_n: int,
                device) -> GroupLists:
    """The kv tiles each GQA group computes: partial where any q head of the group may keep a key and not all
    of them keep every key, full where every head keeps every key of the tile (cached per mask and shape)."""
    key = cache_key(mask_mod, "decode", batch, heads_q, heads_kv, seq_q, seq_kv, block_n, str(device))
    hit = _lists_cache.get(key)
    if hit is not None and (hit[0] is mask_mod or isinstance(mask_mod, MaskMod)):
        _lists_cache.move_to_end(key)
        return hit[1]
    maybe_any, surely_full = tile_classes(mask_mod, batch, heads_q, seq_q, seq_kv, padded(seq_q), block_n, device)
    full = surely_full & maybe_any
    if maybe_any.shape[1] > 1:  # head-dependent: reduce over each group's q heads
        bm, _, n_q, n_kv = maybe_any.shape
        maybe_any = maybe_any.reshape(bm, heads_kv, -1, n_q, n_kv).any(2)
        full = full.reshape(bm, heads_kv, -1, n_q, n_kv).all(2)
    full = full & maybe_any
    partial = maybe_any & ~full
    kv_num, kv_idx = index_lists(partial.contiguous())
    full_num, full_idx = index_lists(full.contiguous())
    lists = GroupLists(kv_num, kv_idx, full_num, full_idx)
    _lists_cache[key] = (mask_mod, lists)
    if len(_lists_cache) > _CACHE_SIZE:
        _lists_cache.popitem(last=False)
    return lists


def decode_launch(q, k, v, out_part, lse_part, buffers, lists, scale, generated, config: TileConfig,
                  num_splits: int) -> DecodeLaunch:
    """``lists`` = (kv_num, kv_idx, full_kv_num, full_kv_idx) per (batch, kv head) (``group_lists``)."""
    batch, heads, seq_q, _ = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    groups = heads // heads_kv
    block_m = block_rows(seq_q, groups, config)
    args = [q, k, v, out_part, lse_part, tuple(buffers), *lists, *q.stride(), *k.stride(), *v.stride(),
            *mask_strides(lists[0]), lists[1].shape[-1], heads_kv, groups, seq_q, seq_kv, num_splits, float(scale)]
    constexprs = {**head_constexprs(q, v, block_m, config.block_n), **mod_constexprs(generated),
                  "EVEN_N": seq_kv % config.block_n == 0}
    grid = (batch * heads_kv, num_splits, triton.cdiv(seq_q * groups, block_m))
    return DecodeLaunch("decode", args, constexprs, grid)


def reduce_launch(out_part, lse_part, out, lse, num_splits: int, write_lse: bool = True) -> DecodeLaunch:
    batch, heads, seq_q, dim_v = out.shape
    rows = batch * heads * seq_q
    args = [out_part, lse_part, out, lse, *out.stride(), heads, seq_q, rows, num_splits]
    constexprs = {"HEAD_DIM_V": dim_v, "DV_PAD": padded(dim_v), "BLOCK_R": REDUCE_ROWS, "WRITE_LSE": write_lse}
    return DecodeLaunch("decode_reduce", args, constexprs, (triton.cdiv(rows, REDUCE_ROWS), 1, 1))


def launch_config(kernel: str, config: TileConfig) -> TileConfig:
    """The config a decoding launch runs with: the decode config, or for the reduction (a row-wise merge) 4 warps
    and one stage whatever the main kernel's tiles."""
    if kernel == "decode_reduce":
        return TileConfig(REDUCE_ROWS, REDUCE_ROWS, num_warps=4, num_stages=1)  # BLOCK_N: unused
    return config


def decode_attention(q, k, v, generated, lists: GroupLists, scale: float, config: TileConfig, num_splits: int,
                     vendor: str, buffers: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both decoding launches over ``lists`` (``group_lists`` at ``config.block_n``): (out (B, Hq, Sq, Dv)
    in q's dtype, lse (B, Hq, Sq) fp32 natural log).  ``buffers``: the captured tensors when they come from
    elsewhere than ``generated`` (an op boundary), as ``autograd.flex_forward``.  A config that cannot launch retries
    with fewer stages (the lists fix the tile); ``failures.LaunchFailed`` when none launches (the caller runs the
    forward kernel)."""
    from . import ladder
    from .autograd import captured_buffers, out_like

    buffers = captured_buffers(generated, buffers)
    batch, heads, seq_q, _ = q.shape
    dim_v = v.shape[-1]

    def attempt(config: TileConfig, _block_mask) -> tuple[torch.Tensor, torch.Tensor]:
        out_part = torch.empty(num_splits, batch, heads, seq_q, dim_v, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(num_splits, batch, heads, seq_q, dtype=torch.float32, device=q.device)
        decode_launch(q, k, v, out_part, lse_part, buffers, lists.as_tuple(), scale, generated, config,
                      num_splits).run(config, vendor)
        out = out_like(q, dim_v, q.dtype)
        lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
        reduce_launch(out_part, lse_part, out, lse, num_splits).run(launch_config("decode_reduce", config), vendor)
        return out, lse

    out, lse = ladder.run("decode", config, None, ladder.launch_problem(q, v, generated), q.device, attempt,
                          tile_fixed=True)
    runs["decode"] += 1
    return out, lse


def decode_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score_mod=None, mask_mod=None,
                          scale: float, return_lse: bool = False, config: TileConfig, caps,
                          num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``autograd.triton_flex_attention``'s contract (no gradient) on the decoding kernels: ``num_splits`` by
    ``decoding_plan`` unless given."""
    from .autograd import prepare_mods, vendor_of

    score_mod, mask_mod, generated = prepare_mods(q, k, v, score_mod, mask_mod)
    if num_splits is None:
        num_splits = decoding_plan(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], config, caps)[2]
    lists = group_lists(mask_mod, batch=q.shape[0], heads_q=q.shape[1], heads_kv=k.shape[1], seq_q=q.shape[2],
                        seq_kv=k.shape[2], block_n=config.block_n, device=q.device)
    out, lse = decode_attention(q, k, v, generated, lists, scale, config, num_splits, vendor_of(q.device))
    return out, (lse if return_lse else None)


def aot_entry(kernel: str, generated, dtype: torch.dtype, head_dim: int, head_dim_v: int, config: TileConfig,
              *, seq_divisible: bool = True, write_lse: bool = True, gqa: bool = False,
              **_ignored) -> tuple[object, dict[str, str | tuple], dict, dict]:
    """(jit_fn, signature, constexprs, specialization) of a decoding launch, as ``kernels.aot_entry``; BLOCK_M is
    the config's ``block_m`` (one decoding query of a GQA group of up to ``block_m`` heads)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")
    meta = torch.device("meta")
    seq = config.block_n * 2 if seq_divisible else config.block_n * 2 + 1
    q = torch.empty(1, 2 if gqa else 1, 1, head_dim, dtype=dtype, device=meta)
    k = torch.empty(1, 1, seq, head_dim, dtype=dtype, device=meta)
    v = torch.empty(1, 1, seq, head_dim_v, dtype=dtype, device=meta)
    out = torch.empty(1, q.shape[1], 1, head_dim_v, dtype=dtype, device=meta)
    part = torch.empty(2, 1, q.shape[1], 1, head_dim_v, dtype=torch.float32, device=meta)
    rows = torch.empty(2, 1, q.shape[1], 1, dtype=torch.float32, device=meta)
    num = torch.empty(1, 1, 1, dtype=torch.int32, device=meta)
    lists = (num, torch.empty(1, 1, 1, 3, dtype=torch.int32, device=meta)) * 2
    buffers = [t.to(meta) for t in generated.buffers]
    if kernel == "decode":
        launch = decode_launch(q, k, v, part, rows, buffers, lists, 1.0, generated, config, 2)
    else:
        launch = reduce_launch(part, rows, out, rows[0], 2, write_lse)
    return launch.jit_fn, launch_signature(launch), dict(launch.constexprs), launch_specialization(launch)
