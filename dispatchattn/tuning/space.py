"""Which tile configs exist per vendor, which fit an arch, and the untuned default for each.

Forward, backward and decoding are separate kernels with separate configs.  The backward of ``triton_flex`` is two
launches sharing one ``TileConfig(m, n)`` (and one block mask at m x n tiles): dK/dV keeps a key tile of
``n`` rows and streams query tiles of ``m`` rows; dQ keeps a query tile of ``m`` rows and streams key
tiles of ``n`` rows.

Resources are *estimated* here from the tile shapes (``estimate_resources``, one small function); the
ahead-of-time compiler measures the real shared memory per target and may refine it.

The decoding kernel (split-KV, ``backends/triton_flex/decode.py``, Sq <= 16 without gradient) puts the
``Sq x groups`` query rows of one kv head in the M dimension of its dots: its ``block_m`` is the smallest row
tile (16; 64 on sm_90 / sm_100, whose wgmma / tcgen05 need 64 rows), padded up at run time to the rows of the
call; ``num_splits`` is chosen at run time from Sk, B x Hkv and the device's SM count (``decode.decoding_plan``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from ..capabilities import DeviceCaps
from ..vendor_tables import ARCHS, ArchInfo
from . import measured_space
from .config import TileConfig

KERNELS = ("fwd", "bwd", "decode")
MIN_BLOCK = 16  # the smallest M / N / K of tl.dot
#: Registers per thread assumed for pointers, loop counters and the softmax state besides the tiles.
REGISTER_OVERHEAD = 32
#: Registers MFMA layouts take per estimated register, by waves per SIMD (see ``_registers_and_budget``).
MFMA_REGISTER_FACTOR = {1: 1.6, 2: 2.5}
#: VGPRs one wave may use on CDNA: Triton 3.9 never allocates the accumulation VGPRs (AGPRs), so it spills
#: past the 256 architectural ones although ``ARCHS`` counts 512 (arch + accumulation) per lane.
CDNA_TRITON_VGPRS = 256
#: Shared memory besides the tiles on NVIDIA: barriers and layout-conversion scratch (1,032 B on sm_90).
SHARED_OVERHEAD = 2048


@dataclass(frozen=True)
class Resources:
    """Estimated per-block shared memory (bytes) and per-thread registers of one launch."""

    shared_memory: int
    registers: int


def pow2_at_least(value: int, floor: int = MIN_BLOCK) -> int:
    """The kernels pad head dims to a power of two (at least 16) with masked loads."""
    return max(floor, 1 << (max(int(value), 1) - 1).bit_length())


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_resources(
    kernel: str,
    config: TileConfig,
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int,
    warp_size: int = 32,
    vendor: str = "cuda",
) -> Resources:
    """Shared memory and registers one block of ``kernel`` needs with ``config`` (an upper-bound estimate).

    Shared memory: forward keeps ``max(stages - 1, 1)`` K+V tiles (BLOCK_N rows of D + Dv) in flight, or
    (one stage) the Q tile and a K tile.  Backward, the larger of its two launches: dK/dV streams
    ``stages`` Q+dO tiles (BLOCK_M rows) past one K+V tile (BLOCK_N rows); dQ the other way round.  On
    ROCm operands pass through LDS one at a time (the larger of the Q tile and ``stages`` K+V tiles
    forward; ``stages`` x the larger tile's rows of D + Dv backward).  Registers: the fp32 accumulators
    and score tiles plus the Q/K/V operand tiles passing through registers, over the block's threads.

    Checked against our kernels compiled ahead of time with Triton 3.9 (bf16, D=128 unless noted; measured
    shared bytes / estimate): fwd 128x64 st3 sm_90 66,568 / 67,584; fwd 64x32 D=256 st3 sm_90 66,568 /
    67,584; fwd 32x64 D=256 st3 sm_80 53,264 / 133,120; dK/dV 64x64 st2 sm_86 74,244 / 100,352; dK/dV
    64x128 st3 sm_90 116,744 / 165,888; gfx942 fwd 128x64 st1 32,768 / 32,768, bwd 64x64 16,384 / 32,768.  The register
    estimate told which of 8 NVIDIA compiles spilled (fwd 128x128 4 warps, bwd 64x64 4 warps, ...) and
    which did not (fwd 128x64 8 warps: 201 registers measured, 192 estimated).  On AMD it is 2-4x low
    (fwd 128x64 8 warps on gfx942: 256 VGPRs and a spill, 112 estimated).  ``python -m dispatchattn aot``
    measures the truth per target; this estimate only prunes before timing.
    """
    d, dv = pow2_at_least(head_dim), pow2_at_least(head_dim_v)
    element = _element_size(dtype)
    row_bytes = (d + dv) * element
    stages = max(config.num_stages, 1)
    m, n = config.block_m, config.block_n
    if kernel in ("fwd", "decode"):  # decoding: the forward's tiles, with the query rows of a GQA group as M
        q_tile = m * d * element
        shared = max(max(stages - 1, 1) * n * row_bytes, q_tile + n * d * element)  # K+V in flight, or Q+K
        if vendor == "rocm":
            shared = max(stages * n * row_bytes, q_tile)
        accumulators = m * dv + m * n  # output accumulator + score tile
        operands = m * d + n * (d + dv)  # Q, K, V tiles
    else:
        shared = max(stages * m + n, stages * n + m) * row_bytes  # dK/dV launch, dQ launch
        if vendor == "rocm":
            shared = stages * max(m, n) * row_bytes
        accumulators = max(n * (d + dv), m * d) + 2 * m * n  # dK + dV (or dQ) + score and dP tiles
        operands = (m + n) * (d + dv)  # Q, dO, K, V tiles
    words = accumulators + operands * element // 4
    threads = config.num_warps * warp_size
    overhead = SHARED_OVERHEAD if vendor == "cuda" else 0
    return Resources(shared + overhead, -(-words // threads) + REGISTER_OVERHEAD)


def _shape_text(kernel: str, config: TileConfig, head_dim: int, head_dim_v: int) -> str:
    dims = f"D={head_dim}" if head_dim == head_dim_v else f"D={head_dim} Dv={head_dim_v}"
    return f"{kernel} BLOCK_M={config.block_m} BLOCK_N={config.block_n} {dims}"


def _why_shape_invalid(kernel: str, config: TileConfig, vendor: str) -> str | None:
    m, n = config.block_m, config.block_n
    for name, value in (("BLOCK_M", m), ("BLOCK_N", n)):
        if value < MIN_BLOCK or value & (value - 1):
            return f"{name}={value} must be a power of two >= {MIN_BLOCK} (the smallest tl.dot tile)"
    if config.num_warps not in (1, 2, 4, 8, 16):
        return f"num_warps={config.num_warps} must be one of 1, 2, 4, 8, 16"
    if vendor == "cuda" and (config.waves_per_eu or config.matrix_instr_nonkdim or config.kpack != 1):
        return f"waves_per_eu / matrix_instr_nonkdim / kpack are AMD options; got {config.short()} for CUDA"
    return None


def why_config_invalid(
    kernel: str, config: TileConfig, arch: str, dtype: torch.dtype, head_dim: int, head_dim_v: int
) -> str | None:
    """None when ``config`` can run ``kernel`` on ``arch``, else a sentence with the value and the limit.

    >>> why_config_invalid("fwd", TileConfig(128, 128, 8, 3), "sm_86", torch.float16, 128, 128)
    'fwd BLOCK_M=128 BLOCK_N=128 D=128 stages=3 needs 133,120 B shared memory > 101,376 B on sm_86'
    """
    return _why_not_fit(kernel, config, arch, dtype, head_dim, head_dim_v, registers=True)


def why_config_cannot_launch(
    kernel: str, config: TileConfig, arch: str, dtype: torch.dtype, head_dim: int, head_dim_v: int
) -> str | None:
    """The part of ``why_config_invalid`` that stops a launch: the tile's shape rules and shared memory over the
    block's limit.  (An estimated register shortfall is left out: a spill costs speed, and a config timed on the
    device proved it runs.)"""
    return _why_not_fit(kernel, config, arch, dtype, head_dim, head_dim_v, registers=False)


def _why_not_fit(
    kernel: str, config: TileConfig, arch: str, dtype: torch.dtype, head_dim: int, head_dim_v: int, registers: bool
) -> str | None:
    if kernel not in KERNELS:
        return f"kernel {kernel!r} is not one of {KERNELS}"
    info = ARCHS.get(arch)
    if info is None:
        return f"arch {arch!r} is not in the arch table (known: {', '.join(sorted(ARCHS))})"
    problem = _why_shape_invalid(kernel, config, info.vendor)
    if problem:
        return problem
    need = estimate_resources(kernel, config, dtype, head_dim, head_dim_v, info.warp_size, info.vendor)
    shape = _shape_text(kernel, config, head_dim, head_dim_v)
    if need.shared_memory > info.smem_per_block:
        return (
            f"{shape} stages={config.num_stages} needs {need.shared_memory:,} B shared memory"
            f" > {info.smem_per_block:,} B on {arch}"
        )
    if registers:
        used, budget = _registers_and_budget(need, config, info)
        if used > budget:
            return (f"{shape} warps={config.num_warps} needs ~{used} registers per thread > {budget} on {arch}"
                    " (it would spill)")
    return None


def _registers_and_budget(need: Resources, config: TileConfig, info: ArchInfo) -> tuple[int, int]:
    """On CDNA (MFMA) a workgroup's waves share the 4 SIMDs of a CU, so 8 waves leave each 512 / 2
    VGPRs, and Triton uses at most the 256 architectural VGPRs of a wave (no AGPRs), so the budget is the
    smaller of the two; MFMA layouts need more registers than the tile count (factors fit on Triton 3.9
    compiles: 8 waves, fwd 128x64 spilled at 256 (112 estimated), bwd 32x32 used 241; 4 waves, fwd
    32x64 D=256 (152 estimated) and bwd 64x32 D=128 (128 estimated) fit in 256 on gfx90a/gfx942/gfx950)."""
    if info.vendor == "rocm" and info.matrix_instr == "mfma":
        waves_per_simd = max(1, config.num_warps // 4)
        budget = min(CDNA_TRITON_VGPRS, info.max_regs_per_thread // waves_per_simd)
        return int(need.registers * MFMA_REGISTER_FACTOR[min(waves_per_simd, 2)]), budget
    return need.registers, info.max_regs_per_thread


def _arch_of(arch_or_caps: str | DeviceCaps) -> str:
    if isinstance(arch_or_caps, DeviceCaps):
        if not arch_or_caps.arch:
            raise ValueError(f"config_space: {arch_or_caps.describe()} has no GPU arch to tune for")
        return arch_or_caps.arch
    return arch_or_caps


def _cuda_candidates() -> list[TileConfig]:
    tiles = [(m, n) for m in (32, 64, 128) for n in (32, 64, 128)]
    return [
        TileConfig(m, n, warps, stages)
        for (m, n), warps, stages in itertools.product(tiles, (4, 8), (1, 2, 3, 4))
        if warps == 4 or m >= 64  # 8 warps on a 32-row tile leave warps without rows
    ]


def decode_rows(arch: str, dtype: torch.dtype) -> int:
    """The decoding kernel's smallest row tile on ``arch``: 64 where the 16-bit matrix instruction needs a
    64-row warpgroup tile (wgmma, tcgen05), else tl.dot's 16 (fp32 dots run without matrix instructions)."""
    info = ARCHS.get(arch)
    if dtype != torch.float32 and info is not None and info.matrix_instr in ("wgmma", "tcgen05"):
        return 64
    return MIN_BLOCK


def _decode_candidates(arch: str, dtype: torch.dtype) -> list[TileConfig]:
    rows = decode_rows(arch, dtype)
    if ARCHS[arch].vendor == "cuda":
        return [TileConfig(rows, n, warps, stages)
                for n, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3, 4))]
    cdna = ARCHS[arch].matrix_instr == "mfma"
    return [TileConfig(rows, n, warps, 1, wpe, nonk, 2 if cdna else 1)
            for n, warps, wpe, nonk in itertools.product((32, 64, 128), (4, 8), (0, 2), (0, 16) if cdna else (0,))]


def _rocm_candidates(kernel: str, arch: str) -> list[TileConfig]:
    cdna = ARCHS[arch].matrix_instr == "mfma"
    mfma = (0, 16) if cdna else (0,)  # matrix_instr_nonkdim and kpack only mean something on MFMA
    kpack = 2 if cdna else 1
    if kernel == "fwd":
        tiles = [(m, n) for m in (64, 128) for n in (32, 64, 128)]
        waves = (0, 2)
    else:
        tiles = [(m, n) for m in (32, 64) for n in (32, 64, 128)]
        waves = (0,)
    return [
        TileConfig(m, n, warps, 1, wpe, nonk, kpack)
        for (m, n), warps, wpe, nonk in itertools.product(tiles, (4, 8), waves, mfma)
    ]


def config_space(
    kernel: str,
    arch_or_caps: str | DeviceCaps,
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int | None = None,
) -> list[TileConfig]:
    """Every candidate config for ``kernel`` on the arch that passes ``why_config_invalid``, sorted.

    CUDA: BLOCK_M x BLOCK_N x num_warps {4, 8} x num_stages {1..4}.  ROCm (stages 1): the same tiles x
    num_warps x waves_per_eu x matrix_instr_nonkdim (forward), as FlexAttention's max-autotune sweeps
    (KERNEL_NOTES section 4).  The heuristic default is always included when it fits.  On the targets of
    ``measured_space`` (RDNA3) in 16-bit dtypes: the configs compiled for it ahead of time without a spill.
    """
    arch = _arch_of(arch_or_caps)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    if arch not in ARCHS:
        return []
    measured = measured_space.verdicts(kernel, arch, dtype, pow2_at_least(max(head_dim, head_dim_v)))
    if measured is not None:  # no estimate predicts spills there: the configs compiled without any
        return sorted(config for config, rejected in measured.items() if rejected is None)
    vendor = ARCHS[arch].vendor
    if kernel == "decode":
        candidates = set(_decode_candidates(arch, dtype))
    else:
        candidates = set(_cuda_candidates() if vendor == "cuda" else _rocm_candidates(kernel, arch))
    candidates.add(heuristic_config(kernel, arch, dtype, head_dim, head_dim_v))
    fits = [c for c in candidates if not why_config_invalid(kernel, c, arch, dtype, head_dim, head_dim_v)]
    return sorted(fits)


# --- heuristic defaults --------------------------------------------------------------------------------
# FlexAttention's default tile tables (torch/_inductor/template_heuristics/triton.py), as summarised in
# KERNEL_NOTES.md section 4.  Forward rows: (BLOCK_M, BLOCK_N, num_stages, num_warps) by head dim;
# the row of the next power of two at least D is used (the kernels pad D to it).
_FWD_SM90 = {
    "half": {64: (128, 128, 3, 4), 128: (128, 64, 3, 8), 256: (64, 32, 3, 4)},
    "fp32": {64: (128, 32, 3, 4), 128: (32, 64, 3, 4), 256: (32, 32, 3, 4)},
}
_FWD_SM80 = {
    "half": {64: (128, 64, 3, 4), 128: (128, 64, 3, 8), 256: (32, 64, 3, 4)},
    "fp32": {64: (128, 32, 3, 4), 128: (128, 32, 3, 4), 256: (64, 16, 3, 4)},
}
_FWD_ROCM = {
    "half": {64: (128, 64, 1, 8), 128: (128, 64, 1, 8), 256: (32, 64, 1, 4)},
    "fp32": {64: (128, 32, 1, 4), 128: (128, 32, 1, 4), 256: (64, 16, 1, 4)},
}
_FWD_OTHER = (64, 64, 3, 4)
# Backward rows: FlexAttention's (BLOCK_M1, BLOCK_N1, num_stages, num_warps), the dK/dV tiles; our dQ
# launch uses the same (m, n) instead of FlexAttention's transposed (M2, N2) = (N1, M1).
_BWD_FP32_OR_LARGE = (16, 16, 1, 4)


# Decoding rows (BLOCK_N, num_stages, num_warps) by padded head dim, BLOCK_M is ``decode_rows``: a
# memory-bound loop over kv tiles, so narrow kv tiles with a deep pipeline; 8 warps on the 64-row wgmma /
# tcgen05 tile (4 warps spilled at D=128 on sm_90 with Triton 3.9: 376 B at 64x64 s3).  At D=256 every 64-row
# tile spilled on sm_90 / sm_100 (64x16 w8 s1: 216 B / 80 B; 64x16 w4 s2: 440 B / 360 B), so that row is
# (BLOCK_M, BLOCK_N, stages, warps) = 16x32 w8 s3 with mma.sync (176 registers on both).
_DECODE_NVIDIA = {"half": {64: (64, 3, 4), 128: (32, 3, 4), 256: (32, 2, 4)}, "fp32": {64: (32, 2, 4), 128: (32, 2, 4),
                                                                                     256: (16, 2, 4)}}
_DECODE_WIDE = {64: (64, 3, 4), 128: (64, 3, 8), 256: (32, 3, 8)}  # sm_90 / sm_100, 16-bit
_DECODE_WIDE_D256 = (16, 32, 3, 8)
_DECODE_ROCM = {"half": {64: (64, 1, 4), 128: (64, 1, 4), 256: (32, 1, 4)}, "fp32": {64: (32, 1, 4), 128: (32, 1, 4),
                                                                                   256: (16, 1, 4)}}


def _decode_row(arch: str, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    info = ARCHS.get(arch)
    precision = "fp32" if dtype == torch.float32 else "half"
    d = min(pow2_at_least(head_dim, 64), 256)
    rows = decode_rows(arch, dtype)
    if info is None:
        return (rows, 32, 2, 4)
    if info.vendor == "rocm":
        n, stages, warps = _DECODE_ROCM[precision][d]
    elif rows == 64 and d == 256:
        return _DECODE_WIDE_D256
    elif rows == 64:
        n, stages, warps = _DECODE_WIDE[d]
    else:
        n, stages, warps = _DECODE_NVIDIA[precision][d]
    return rows, n, stages, warps


def _fwd_row(arch: str, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    info = ARCHS.get(arch)
    precision = "fp32" if dtype == torch.float32 else "half"
    d = pow2_at_least(head_dim, 64)
    if info is None or d > 256:
        return _FWD_OTHER
    if info.vendor == "rocm":
        return _FWD_ROCM[precision][d]
    if arch == "sm_90":
        return _FWD_SM90[precision][d]
    if info.sm >= (8, 0):
        return _FWD_SM80[precision][d]
    return _FWD_OTHER


def _bwd_row(arch: str, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    info = ARCHS.get(arch)
    if info is None or dtype == torch.float32 or head_dim > 256:
        return _BWD_FP32_OR_LARGE
    if info.vendor == "rocm":
        if head_dim <= 64:
            return (64, 64, 1, 4)
        return (64, 128, 1, 8) if head_dim <= 128 else _BWD_FP32_OR_LARGE
    if arch == "sm_90":
        if head_dim < 64:
            return (64, 64, 3, 4)
        return (64, 128, 3, 8) if head_dim <= 128 else (64, 64, 2, 4)
    return (64, 64, 2, 4) if info.sm >= (8, 0) else _BWD_FP32_OR_LARGE


def table_config(kernel: str, arch: str, dtype: torch.dtype, head_dim: int) -> TileConfig:
    """The FlexAttention default table's config, as is (it may not fit; see ``heuristic_config``)."""
    row = {"fwd": _fwd_row, "bwd": _bwd_row, "decode": _decode_row}[kernel]
    m, n, stages, warps = row(arch, dtype, head_dim)
    info = ARCHS.get(arch)
    if info is not None and info.vendor == "rocm" and info.matrix_instr == "mfma":
        return TileConfig(m, n, warps, stages, waves_per_eu=0, matrix_instr_nonkdim=0, kpack=2)
    return TileConfig(m, n, warps, stages)


def shrink(config: TileConfig, kernel: str, registers_short: bool, measured: bool = False) -> TileConfig | None:
    """One step smaller, or None when nothing is left to shrink.

    Registers: more warps first.  Shared memory: fewer stages first.  Then a smaller tile (forward:
    BLOCK_N before BLOCK_M).  A register spill ``measured`` by a compile may also need fewer stages (the
    estimate ignores them): those go last, so pipelining is kept where a smaller tile suffices.
    """
    if registers_short and config.num_warps < 8:
        return replace(config, num_warps=8)
    if config.num_stages > 1 and not registers_short:
        return replace(config, num_stages=config.num_stages - 1)
    m, n = config.block_m, config.block_n
    if n > MIN_BLOCK and (kernel in ("fwd", "decode") or n >= m):  # backward: the larger side first
        return replace(config, block_n=n // 2)
    if m > MIN_BLOCK:  # decoding: fewer rows than wgmma / tcgen05 need fall back to mma.sync (a last resort)
        return replace(config, block_m=m // 2)
    if measured and config.num_stages > 1:
        return replace(config, num_stages=config.num_stages - 1)
    return None


def heuristic_config_and_note(
    kernel: str, arch: str, dtype: torch.dtype, head_dim: int, head_dim_v: int | None = None
) -> tuple[TileConfig, str]:
    """``heuristic_config`` and a note saying where it came from and whether it had to shrink to fit."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    table = table_config(kernel, arch, dtype, head_dim)
    config, problem = table, why_config_invalid(kernel, table, arch, dtype, head_dim, head_dim_v)
    first_problem = problem
    while problem is not None and arch in ARCHS:
        smaller = shrink(config, kernel, registers_short="registers" in problem)
        if smaller is None:
            break
        config, problem = smaller, why_config_invalid(kernel, smaller, arch, dtype, head_dim, head_dim_v)
    note = f"{'decoding' if kernel == 'decode' else 'FlexAttention'} default table for {arch}"
    if config != table:
        note += f", shrunk from {table.short()} because {first_problem}"
    return config, note


def heuristic_config(
    kernel: str, arch: str, dtype: torch.dtype, head_dim: int, head_dim_v: int | None = None
) -> TileConfig:
    """The untuned default: FlexAttention's table for the arch (KERNEL_NOTES section 4), shrunk (fewer
    stages, more warps, smaller tiles) until ``why_config_invalid`` accepts it."""
    return heuristic_config_and_note(kernel, arch, dtype, head_dim, head_dim_v)[0]
