"""Block-sparse FlashAttention-style Triton kernels with generated score_mod / mask_mod.

Forward (``_fwd_kernel``): one program per (q tile, batch, q head); online softmax in fp32 with exp2
over the partial kv tiles (score_mod + mask_mod) then the full ones (score_mod only); GQA by mapping
q head ``h`` to kv head ``h // groups``; head dims padded to a power of two with masked loads; writes
``lse`` (natural log) for the backward.  Fully-masked rows give 0 and ``lse = -inf``.

Backward: ``_bwd_preprocess`` (delta = rowsum(out * dout) - dlse), ``_bwd_dkdv_kernel`` (one program
per (kv tile, batch, kv head), looping over the q tiles of every q head of the group: no atomics) and
``_bwd_dq_kernel`` (one program per (q tile, batch, q head)); P is recomputed from the saved lse and
gradients of captured tensors are accumulated atomically (fp32) in the dQ pass only.

The generated mods arrive as ``tl.constexpr`` arguments (``SCORE_MOD``, ``SCORE_MOD_BWD``, ``MASK_MOD``);
see ``codegen.py``.  The tensors they capture arrive as one tuple argument, ``BUFS`` (in ``generated.buffers``
order), and the fp32 gradient buffers of the captured tensors that require grad as another, ``GBUFS`` (in
``generated.grad_slots`` order).  Triton specialises a kernel on the length and element types of a tuple
argument, so each mod set compiles with exactly as many pointer parameters as it captures (none for the plain
kernel) while this source stays one static file: no fixed slot count, no placeholder tensors, and the AOT checks
compile the same functions (a tuple's signature is the tuple of its elements' types).

The launch arguments of each kernel are built by one function at the bottom (``fwd_launch``,
``preprocess_launch``, ``dkdv_launch``, ``dq_launch``), shared by the launchers in ``autograd.py`` and by
``aot_entry`` for ahead-of-time compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ... import envs
from ...tuning.config import TileConfig

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Triton's CPU interpreter has no bf16 arithmetic (numpy): there, tiles are widened to fp32 on load.
INTERPRETED = tl.constexpr(envs.triton_interpret())
#: Tests set this to force ``one_pass_target()`` under the interpreter (None: decided by the compile target).
FORCE_ONE_PASS: bool | None = None

if INTERPRETED:

    def one_pass_target():
        return tl.constexpr(bool(FORCE_ONE_PASS))

else:

    @tl.core.builtin
    def one_pass_target(_semantic=None):
        """Compile-time: walk the masked and the full tile lists in one loop (RDNA3 targets) instead of two.

        RDNA3 (gfx11, wave32, 256 VGPRs) WMMA needs each operand replicated in both half-waves, so the
        q / k tiles alone take most of the register file; with two loops LLVM keeps a second copy of the
        loop-invariant operands live and every tile config spills (fwd D=128 16x16 w2: 65 spills).  One loop
        with a uniform branch for the mask fits.  NVIDIA (sm_80 spills, sm_90 +19..35 registers) and CDNA keep
        two loops.  Read from the compile options, so ``triton.compile(..., target=gfx1100)`` AOT sees it too.

        The same switch loads K (and in the backward V) through transposed pointers (``load_cols``, the ``K_T``
        flags) instead of ``tl.trans`` of a row tile in registers: on gfx1100 that takes dQ at D=128 from 34
        spilled VGPRs (16x16 w8) to none (239 VGPRs), and with the one-pass decoding loop the decoding kernel
        fits at D=128 and D=256.  Callers bind it as ``one_pass: tl.constexpr = one_pass_target()``: a plain assignment
        turns the constexpr into a runtime i1 (Triton 3.9), so both branches were type-checked and merely folded.
        """
        arch = getattr(getattr(_semantic.builder, "options", None), "arch", None)
        if FORCE_ONE_PASS is not None:
            return tl.constexpr(FORCE_ONE_PASS)
        return tl.constexpr(isinstance(arch, str) and arch.startswith("gfx11"))


@triton.jit
def score_tile(q, k, sm_scale, b, h, offs_m, offs_n, SEQ_KV, BUFS, masked, SCORE_MOD: tl.constexpr,
            MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr,
            CHECK_BOUNDS: tl.constexpr, DOT_PRECISION: tl.constexpr, K_T: tl.constexpr = False):
    """(raw scaled scores, modded scores with -inf where not kept, keep) of one tile.

    ``masked`` is ``True`` (constexpr) except in a one-pass loop, where it says (at run time) whether the tile
    comes from the masked list (mask_mod applied) or the full one (bounds only).
    """
    if K_T:
        raw = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale
    else:
        raw = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
    q_idx = offs_m[:, None]
    kv_idx = offs_n[None, :]
    score = raw
    if HAS_SCORE_MOD:
        score = SCORE_MOD(raw, b, h, q_idx, kv_idx, BUFS)
    if APPLY_MASK:
        if masked:
            keep = MASK_MOD(b, h, q_idx, kv_idx, BUFS) & (kv_idx < SEQ_KV)
        else:
            keep = (kv_idx < SEQ_KV) & (q_idx >= 0)
    elif CHECK_BOUNDS:
        keep = (kv_idx < SEQ_KV) & (q_idx >= 0)
    else:
        keep = (kv_idx >= 0) & (q_idx >= 0)
    score = tl.where(keep, score, float("-inf"))
    return raw, score, keep


@triton.jit
def load_rows(base, offs, stride_row, offs_d, stride_d, ROWS, DIM):
    mask = (offs[:, None] < ROWS) & (offs_d[None, :] < DIM)
    tile = tl.load(base + offs[:, None] * stride_row + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    if INTERPRETED:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def load_cols(base, offs, stride_row, offs_d, stride_d, ROWS, DIM):
    """The transposed tile (DIM x rows) loaded through transposed pointers (no ``tl.trans`` in registers)."""
    mask = (offs[None, :] < ROWS) & (offs_d[:, None] < DIM)
    tile = tl.load(base + offs[None, :] * stride_row + offs_d[:, None] * stride_d, mask=mask, other=0.0)
    if INTERPRETED:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _tile_at(i, masked, num_masked, idx_ptr, full_idx_ptr, ONE_PASS: tl.constexpr):
    """Tile index of iteration ``i``: in a one-pass loop the full list follows the masked one."""
    if ONE_PASS:
        tile = tl.load(tl.where(masked, idx_ptr, full_idx_ptr - num_masked) + i)
    else:
        tile = tl.load(idx_ptr + i)
    return tile


@triton.jit
def _num_tiles(num_ptr, full_num_ptr, ONE_PASS: tl.constexpr):
    """(iterations, masked tiles): the one-pass loop walks both lists."""
    num_masked = tl.load(num_ptr)
    num_blocks = num_masked
    if ONE_PASS:
        num_blocks += tl.load(full_num_ptr)
    return num_blocks, num_masked


@triton.jit
def online_softmax_step(acc, l_i, m_i, score, v, DOT_PRECISION: tl.constexpr):
    """One kv tile of the online softmax in base 2: rescale the running sum and output to the new row max
    (0 while a row has seen no key, so fully-masked rows stay 0), then add this tile's ``p @ v``."""
    score2 = score * LOG2E
    m_new = tl.maximum(m_i, tl.max(score2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(score2 - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, b, h, offs_m, offs_d, offs_dv, SEQ_KV, sm_scale,
                BUFS, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
                APPLY_MASK: tl.constexpr, CHECK_BOUNDS: tl.constexpr, ONE_PASS: tl.constexpr,
                DOT_PRECISION: tl.constexpr, K_T: tl.constexpr):
    """Online-softmax accumulation over the kv tiles listed at ``idx_ptr`` (``num_ptr`` of them), then, if
    ``ONE_PASS``, over those at ``full_idx_ptr``.  ``K_T``: K loaded through transposed pointers."""
    num_blocks, num_masked = _num_tiles(num_ptr, full_num_ptr, ONE_PASS)
    for i in range(0, num_blocks):
        masked = (i < num_masked) if ONE_PASS else True  # constexpr True outside a one-pass loop
        kv_tile = _tile_at(i, masked, num_masked, idx_ptr, full_idx_ptr, ONE_PASS)
        offs_n = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if K_T:
            k = load_cols(K_head, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV, HEAD_DIM)
        else:
            k = load_rows(K_head, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV, HEAD_DIM)
        v = load_rows(V_head, offs_n, stride_vn, offs_dv, stride_vd, SEQ_KV, HEAD_DIM_V)
        _, score, _ = score_tile(q, k, sm_scale, b, h, offs_m, offs_n, SEQ_KV, BUFS, masked, SCORE_MOD,
                              MASK_MOD, HAS_SCORE_MOD, APPLY_MASK, CHECK_BOUNDS, DOT_PRECISION, K_T)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, score, v, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, BUFS, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
    stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd, stride_oz, stride_oh, stride_om, stride_od,
    mask_stride_z, mask_stride_h, NUM_KV_TILES, GROUPS, SEQ_Q, SEQ_KV, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, EVEN_N: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    h_kv = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = load_rows(Q + b * stride_qz + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd, SEQ_Q, HEAD_DIM)
    K_head = K + b * stride_kz + h_kv * stride_kh
    V_head = V + b * stride_vz + h_kv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    row = b * mask_stride_z + h * mask_stride_h + pid_m
    one_pass: tl.constexpr = one_pass_target()
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, KV_NUM + row,
        KV_IDX + row * NUM_KV_TILES, (FULL_KV_NUM if one_pass else KV_NUM) + row,
        (FULL_KV_IDX if one_pass else KV_IDX) + row * NUM_KV_TILES, b, h, offs_m, offs_d, offs_dv, SEQ_KV,
        sm_scale, BUFS, HEAD_DIM, HEAD_DIM_V, BLOCK_N, SCORE_MOD, MASK_MOD,
        HAS_SCORE_MOD, True, True, one_pass, DOT_PRECISION, one_pass)
    if not one_pass:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, FULL_KV_NUM + row,
            FULL_KV_IDX + row * NUM_KV_TILES, FULL_KV_NUM + row, FULL_KV_IDX + row * NUM_KV_TILES, b, h, offs_m,
            offs_d, offs_dv, SEQ_KV, sm_scale, BUFS, HEAD_DIM, HEAD_DIM_V, BLOCK_N, SCORE_MOD, MASK_MOD,
            HAS_SCORE_MOD, False, not EVEN_N, False, DOT_PRECISION, False)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_ptrs = Out + b * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < SEQ_Q) & (offs_dv[None, :] < HEAD_DIM_V))
    if WRITE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
        tl.store(Lse + (b * tl.num_programs(2) + h) * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)


@triton.jit
def _bwd_preprocess(Out, DOut, DLse, Delta, stride_oz, stride_oh, stride_om, stride_od,
                    stride_dz, stride_dh, stride_dm, stride_dd, SEQ_Q,
                    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    """delta = rowsum(out * dout) - dlse, fp32, (B, Hq, Sq) contiguous."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV_PAD)
    out = load_rows(Out + b * stride_oz + h * stride_oh, offs_m, stride_om, offs_dv, stride_od, SEQ_Q, HEAD_DIM_V)
    dout = load_rows(DOut + b * stride_dz + h * stride_dh, offs_m, stride_dm, offs_dv, stride_dd, SEQ_Q,
                      HEAD_DIM_V)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    row_ptrs = (b * tl.num_programs(2) + h) * SEQ_Q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row_ptrs, mask=offs_m < SEQ_Q, other=0.0)
    tl.store(Delta + row_ptrs, delta, mask=offs_m < SEQ_Q)


@triton.jit
def _row_stats(Lse, Delta, row_base, offs_m, SEQ_Q):
    """log2-domain lse (+inf for fully-masked rows and rows past the end, so P = 0) and delta."""
    lse = tl.load(Lse + row_base + offs_m, mask=offs_m < SEQ_Q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < SEQ_Q, other=0.0)
    return lse2, delta


@triton.jit
def _grad_tile(q, k, v, do, lse2, delta, sm_scale, b, h, offs_m, offs_n, SEQ_KV, BUFS, GBUFS, masked,
               SCORE_MOD: tl.constexpr, SCORE_MOD_BWD: tl.constexpr, MASK_MOD: tl.constexpr,
               HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
               ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr, K_T: tl.constexpr = False):
    """(P, dS w.r.t. the raw scaled score) of one tile, recomputed from the saved lse."""
    raw, score, keep = score_tile(q, k, sm_scale, b, h, offs_m, offs_n, SEQ_KV, BUFS, masked, SCORE_MOD,
                               MASK_MOD, HAS_SCORE_MOD, APPLY_MASK, CHECK_BOUNDS, DOT_PRECISION, K_T)
    p = tl.exp2(score * LOG2E - lse2[:, None])
    if K_T:
        dp = tl.dot(do, v, input_precision=DOT_PRECISION)
    else:
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SCORE_MOD:
        ds = SCORE_MOD_BWD(raw, b, h, offs_m[:, None], offs_n[None, :], ds, keep, BUFS, GBUFS, ACCUMULATE)
    ds = tl.where(keep, ds, 0.0)
    return p, ds


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q_head, DO_head, Lse, Delta, row_base, stride_qm, stride_qd, stride_dom,
                 stride_dod, num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, b, h, offs_n, offs_d, offs_dv, SEQ_Q,
                 SEQ_KV, sm_scale, BUFS, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_M: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_MOD_BWD: tl.constexpr, MASK_MOD: tl.constexpr,
                 HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
                 ONE_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr, K_T: tl.constexpr):
    """Accumulate dK, dV of one kv tile over the q tiles listed at ``idx_ptr`` (then ``full_idx_ptr``
    if ``ONE_PASS``).  ``K_T``: ``k`` and ``v`` are the transposed tiles (D x BLOCK_N)."""
    num_blocks, num_masked = _num_tiles(num_ptr, full_num_ptr, ONE_PASS)
    for i in range(0, num_blocks):
        masked = (i < num_masked) if ONE_PASS else True  # constexpr True outside a one-pass loop
        q_tile = _tile_at(i, masked, num_masked, idx_ptr, full_idx_ptr, ONE_PASS)
        offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        q = load_rows(Q_head, offs_m, stride_qm, offs_d, stride_qd, SEQ_Q, HEAD_DIM)
        do = load_rows(DO_head, offs_m, stride_dom, offs_dv, stride_dod, SEQ_Q, HEAD_DIM_V)
        lse2, delta = _row_stats(Lse, Delta, row_base, offs_m, SEQ_Q)
        # no gradient buffers here (ACCUMULATE is False): BUFS fills the slot
        p, ds = _grad_tile(q, k, v, do, lse2, delta, sm_scale, b, h, offs_m, offs_n, SEQ_KV, BUFS, BUFS, masked,
                           SCORE_MOD, SCORE_MOD_BWD, MASK_MOD, HAS_SCORE_MOD, APPLY_MASK,
                           CHECK_BOUNDS, False, DOT_PRECISION, K_T)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, BUFS, Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
    stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd, stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd, stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    mask_stride_z, mask_stride_h, NUM_Q_TILES, HEADS_Q, GROUPS, SEQ_Q, SEQ_KV, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_MOD_BWD: tl.constexpr,
    MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h_kv = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    one_pass: tl.constexpr = one_pass_target()
    if one_pass:  # RDNA3: K and V loaded through transposed pointers, no tl.trans in registers
        k = load_cols(K + b * stride_kz + h_kv * stride_kh, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV,
                       HEAD_DIM)
        v = load_cols(V + b * stride_vz + h_kv * stride_vh, offs_n, stride_vn, offs_dv, stride_vd, SEQ_KV,
                       HEAD_DIM_V)
    else:
        k = load_rows(K + b * stride_kz + h_kv * stride_kh, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV,
                       HEAD_DIM)
        v = load_rows(V + b * stride_vz + h_kv * stride_vh, offs_n, stride_vn, offs_dv, stride_vd, SEQ_KV,
                       HEAD_DIM_V)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    for g in range(0, GROUPS):
        h = h_kv * GROUPS + g
        Q_head = Q + b * stride_qz + h * stride_qh
        DO_head = DO + b * stride_doz + h * stride_doh
        row_base = (b * HEADS_Q + h) * SEQ_Q
        row = b * mask_stride_z + h * mask_stride_h + pid_n
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, Q_head, DO_head, Lse, Delta, row_base, stride_qm, stride_qd, stride_dom, stride_dod,
            Q_NUM + row, Q_IDX + row * NUM_Q_TILES, (FULL_Q_NUM if one_pass else Q_NUM) + row,
            (FULL_Q_IDX if one_pass else Q_IDX) + row * NUM_Q_TILES, b, h,
            offs_n, offs_d, offs_dv, SEQ_Q, SEQ_KV, sm_scale, BUFS, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
            SCORE_MOD, SCORE_MOD_BWD, MASK_MOD, HAS_SCORE_MOD, True, True, one_pass, DOT_PRECISION, one_pass)
        if not one_pass:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, Q_head, DO_head, Lse, Delta, row_base, stride_qm, stride_qd, stride_dom, stride_dod,
                FULL_Q_NUM + row, FULL_Q_IDX + row * NUM_Q_TILES, FULL_Q_NUM + row, FULL_Q_IDX + row * NUM_Q_TILES,
                b, h, offs_n, offs_d, offs_dv, SEQ_Q, SEQ_KV, sm_scale, BUFS, HEAD_DIM, HEAD_DIM_V,
                BLOCK_M, SCORE_MOD, SCORE_MOD_BWD, MASK_MOD, HAS_SCORE_MOD, False, not EVEN_N, False, DOT_PRECISION,
                False)
    dk = dk * sm_scale
    keep_n = offs_n[:, None] < SEQ_KV
    tl.store(DK + b * stride_dkz + h_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=keep_n & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * stride_dvz + h_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=keep_n & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
               num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, b, h, offs_m, offs_d, offs_dv, SEQ_KV, sm_scale,
               BUFS, GBUFS, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_N: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_MOD_BWD: tl.constexpr, MASK_MOD: tl.constexpr,
               HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
               ONE_PASS: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr, K_T: tl.constexpr):
    """Accumulate dQ of one q tile over the kv tiles listed at ``idx_ptr`` (then ``full_idx_ptr`` if
    ``ONE_PASS``) and captured-tensor grads.  ``K_T``: K and V enter the score and dP dots loaded through
    transposed pointers, and K is loaded again in rows for ``dS @ K`` (RDNA3)."""
    num_blocks, num_masked = _num_tiles(num_ptr, full_num_ptr, ONE_PASS)
    for i in range(0, num_blocks):
        masked = (i < num_masked) if ONE_PASS else True  # constexpr True outside a one-pass loop
        kv_tile = _tile_at(i, masked, num_masked, idx_ptr, full_idx_ptr, ONE_PASS)
        offs_n = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if K_T:
            kt = load_cols(K_head, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV, HEAD_DIM)
            vt = load_cols(V_head, offs_n, stride_vn, offs_dv, stride_vd, SEQ_KV, HEAD_DIM_V)
            _, ds = _grad_tile(q, kt, vt, do, lse2, delta, sm_scale, b, h, offs_m, offs_n, SEQ_KV, BUFS, GBUFS,
                               masked, SCORE_MOD, SCORE_MOD_BWD, MASK_MOD, HAS_SCORE_MOD, APPLY_MASK,
                               CHECK_BOUNDS, ACCUMULATE, DOT_PRECISION, True)
            k = load_rows(K_head, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV, HEAD_DIM)
        else:
            k = load_rows(K_head, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV, HEAD_DIM)
            v = load_rows(V_head, offs_n, stride_vn, offs_dv, stride_vd, SEQ_KV, HEAD_DIM_V)
            _, ds = _grad_tile(q, k, v, do, lse2, delta, sm_scale, b, h, offs_m, offs_n, SEQ_KV, BUFS, GBUFS,
                               masked, SCORE_MOD, SCORE_MOD_BWD, MASK_MOD, HAS_SCORE_MOD, APPLY_MASK,
                               CHECK_BOUNDS, ACCUMULATE, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, BUFS, GBUFS, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
    stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd, stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    mask_stride_z, mask_stride_h, NUM_KV_TILES, GROUPS, SEQ_Q, SEQ_KV, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_MOD_BWD: tl.constexpr,
    MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, EVEN_N: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    h_kv = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = load_rows(Q + b * stride_qz + h * stride_qh, offs_m, stride_qm, offs_d, stride_qd, SEQ_Q, HEAD_DIM)
    do = load_rows(DO + b * stride_doz + h * stride_doh, offs_m, stride_dom, offs_dv, stride_dod, SEQ_Q,
                    HEAD_DIM_V)
    lse2, delta = _row_stats(Lse, Delta, (b * tl.num_programs(2) + h) * SEQ_Q, offs_m, SEQ_Q)
    K_head = K + b * stride_kz + h_kv * stride_kh
    V_head = V + b * stride_vz + h_kv * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    row = b * mask_stride_z + h * mask_stride_h + pid_m
    one_pass: tl.constexpr = one_pass_target()
    # transposed K/V loads from D=128 on: at D=64 they cost dQ registers (gfx1100 32x16 w2: 230 -> 242, and the
    # causal variant then spills 68 B), at D=128 they save them (16x16 w8: 34 spilled VGPRs -> none)
    k_t: tl.constexpr = one_pass and D_PAD >= 128
    dq = _dq_blocks(dq, q, do, lse2, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                    KV_NUM + row, KV_IDX + row * NUM_KV_TILES, (FULL_KV_NUM if one_pass else KV_NUM) + row,
                    (FULL_KV_IDX if one_pass else KV_IDX) + row * NUM_KV_TILES, b, h, offs_m, offs_d, offs_dv,
                    SEQ_KV, sm_scale, BUFS, GBUFS, HEAD_DIM, HEAD_DIM_V, BLOCK_N, SCORE_MOD,
                    SCORE_MOD_BWD, MASK_MOD, HAS_SCORE_MOD, True, True, one_pass,
                    ACCUMULATE, DOT_PRECISION, k_t)
    if not one_pass:
        dq = _dq_blocks(dq, q, do, lse2, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                        FULL_KV_NUM + row, FULL_KV_IDX + row * NUM_KV_TILES, FULL_KV_NUM + row,
                        FULL_KV_IDX + row * NUM_KV_TILES, b, h, offs_m, offs_d, offs_dv, SEQ_KV, sm_scale,
                        BUFS, GBUFS, HEAD_DIM, HEAD_DIM_V, BLOCK_N, SCORE_MOD, SCORE_MOD_BWD,
                        MASK_MOD, HAS_SCORE_MOD, False, not EVEN_N, False, ACCUMULATE, DOT_PRECISION, False)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqz + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------------
# Launch arguments: one builder per kernel, shared by the launchers (autograd.py) and ``aot_entry``.
# ---------------------------------------------------------------------------------------------------

#: The kernels launched per call, by the names ``aot_entry`` accepts.
KERNELS: dict[str, str] = {
    "fwd": "forward: out and lse, grid (cdiv(Sq, BLOCK_M), B, Hq)",
    "bwd_preprocess": "backward pre-pass: delta = rowsum(out * dout) - dlse, grid (cdiv(Sq, BLOCK_M), B, Hq)",
    "bwd_dkdv": "backward: dK and dV of one kv tile over its group's q heads, grid (cdiv(Sk, BLOCK_N), B, Hkv)",
    "bwd_dq": "backward: dQ of one q tile (+ captured-tensor grads, atomic), grid (cdiv(Sq, BLOCK_M), B, Hq)",
}
_JIT = {"fwd": _fwd_kernel, "bwd_preprocess": _bwd_preprocess, "bwd_dkdv": _bwd_dkdv_kernel, "bwd_dq": _bwd_dq_kernel}


@dataclass
class Launch:
    """One kernel launch: runtime arguments (in order), constexprs, grid."""

    kernel: str
    args: list
    constexprs: dict
    grid: tuple[int, int, int]

    @property
    def jit_fn(self):
        return _JIT[self.kernel]

    def run(self, config: TileConfig, vendor: str) -> None:
        names = [n for n in self.jit_fn.arg_names if n not in self.constexprs]
        self.jit_fn[self.grid](**dict(zip(names, self.args)), **self.constexprs, **config.triton_options(vendor))


def padded(dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.dot's minimum); loads are masked."""
    return max(16, triton.next_power_of_2(dim))


def head_constexprs(q: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> dict:
    return {"HEAD_DIM": q.shape[-1], "HEAD_DIM_V": v.shape[-1], "D_PAD": padded(q.shape[-1]),
            "DV_PAD": padded(v.shape[-1]), "BLOCK_M": block_m, "BLOCK_N": block_n,
            # "ieee" for every dtype: fp32 keeps full precision, and for fp16/bf16 operands the setting changes
            # nothing on NVIDIA while HIP targets reject "tf32" (gfx90a/gfx950/gfx1100, found by the AOT checks).
            "DOT_PRECISION": "ieee"}


def mod_constexprs(generated) -> dict:
    return {"SCORE_MOD": generated.module.score_mod, "MASK_MOD": generated.module.mask_mod,
            "HAS_SCORE_MOD": generated.has_score_mod}


def mask_strides(num: torch.Tensor) -> list[int]:
    """Row strides of a (Bm, Hm, rows) count tensor: 0 on broadcast (size-1) dims."""
    mask_batch, mask_heads, rows = num.shape
    return [mask_heads * rows if mask_batch > 1 else 0, rows if mask_heads > 1 else 0]


def fwd_launch(q, k, v, out, lse, buffers, lists, scale, generated, config: TileConfig, write_lse: bool) -> Launch:
    """``lists`` = (kv_num, kv_idx, full_kv_num, full_kv_idx) of the block mask at the config's tiles."""
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    args = [q, k, v, out, lse, tuple(buffers), *lists, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *mask_strides(lists[0]), lists[1].shape[-1], heads // k.shape[1], seq_q, seq_kv, float(scale)]
    constexprs = {**head_constexprs(q, v, config.block_m, config.block_n), **mod_constexprs(generated),
                  "EVEN_N": seq_kv % config.block_n == 0, "WRITE_LSE": write_lse}
    return Launch("fwd", args, constexprs, (triton.cdiv(seq_q, config.block_m), batch, heads))


#: The backward pre-pass is a row reduction with no tile search of its own: one launch config for every problem.
#: Under the backward's tile config it spilled on some targets (fp16, 64x64 w8: 8-16 B of local memory on
#: sm_80/86/89); 32 rows x 4 warps compiles without spills for fp16/bf16/fp32, D 64/128/256, on every AOT target.
PREPROCESS_CONFIG = TileConfig(32, 64, num_warps=4, num_stages=1)


def preprocess_launch(out, dout, dlse, delta, block_m: int = PREPROCESS_CONFIG.block_m) -> Launch:
    batch, heads, seq_q, dim_v = out.shape
    args = [out, dout, dlse if dlse is not None else delta, delta, *out.stride(), *dout.stride(), seq_q]
    constexprs = {"HEAD_DIM_V": dim_v, "DV_PAD": padded(dim_v), "BLOCK_M": block_m, "HAS_DLSE": dlse is not None}
    return Launch("bwd_preprocess", args, constexprs, (triton.cdiv(seq_q, block_m), batch, heads))


def dkdv_launch(q, k, v, dout, lse, delta, dk, dv, buffers, q_lists, scale, generated, config) -> Launch:
    """``q_lists`` = (q_num, q_idx, full_q_num, full_q_idx) of the block mask at the config's tiles."""
    batch, heads, seq_q, _ = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    args = [q, k, v, dout, lse, delta, dk, dv, tuple(buffers), *q_lists, *q.stride(), *k.stride(), *v.stride(),
            *dout.stride(), *dk.stride(), *dv.stride(), *mask_strides(q_lists[0]), q_lists[1].shape[-1],
            heads, heads // heads_kv, seq_q, seq_kv, float(scale)]
    constexprs = {**head_constexprs(q, v, config.block_m, config.block_n), **mod_constexprs(generated),
                  "SCORE_MOD_BWD": generated.module.score_mod_bwd, "EVEN_N": seq_kv % config.block_n == 0}
    return Launch("bwd_dkdv", args, constexprs, (triton.cdiv(seq_kv, config.block_n), batch, heads_kv))


def dq_launch(q, k, v, dout, lse, delta, dq, buffers, grad_buffers, kv_lists, scale, generated, config,
              accumulate: bool) -> Launch:
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    args = [q, k, v, dout, lse, delta, dq, tuple(buffers), tuple(grad_buffers), *kv_lists, *q.stride(), *k.stride(),
            *v.stride(), *dout.stride(), *dq.stride(), *mask_strides(kv_lists[0]), kv_lists[1].shape[-1],
            heads // k.shape[1], seq_q, seq_kv, float(scale)]
    constexprs = {**head_constexprs(q, v, config.block_m, config.block_n), **mod_constexprs(generated),
                  "SCORE_MOD_BWD": generated.module.score_mod_bwd, "EVEN_N": seq_kv % config.block_n == 0,
                  "ACCUMULATE": accumulate}
    return Launch("bwd_dq", args, constexprs, (triton.cdiv(seq_q, config.block_m), batch, heads))




_SIGNATURE_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                    torch.int32: "*i32", torch.int64: "*i64", torch.int16: "*i16", torch.int8: "*i8",
                    torch.uint8: "*u8", torch.bool: "*i1"}


def _type_of(value) -> str | tuple:
    """Triton's signature type of a launch argument: a tuple argument (``BUFS``) is the tuple of its types."""
    if isinstance(value, tuple):
        return tuple(_type_of(item) for item in value)
    if isinstance(value, torch.Tensor):
        return _SIGNATURE_TYPES[value.dtype]
    return "fp32" if isinstance(value, float) else "i32"


def launch_signature(launch: Launch) -> dict[str, str | tuple]:
    names = [n for n in launch.jit_fn.arg_names if n not in launch.constexprs]
    signature = {}
    for name, value in zip(names, launch.args):
        signature[name] = _type_of(value)
    signature.update({name: "constexpr" for name in launch.constexprs})
    return {name: signature[name] for name in launch.jit_fn.arg_names}


def launch_specialization(launch: Launch) -> dict[str, str | tuple]:
    """How Triton's launcher specialises each runtime argument: "1" (an int equal to 1, compiled in as a constant),
    "D" (a tensor, 16-byte aligned as torch allocates it, or an int divisible by 16), "" (neither); a tuple argument
    (the captured tensors) as the tuple of its elements' kinds."""
    def kind(value) -> str | tuple:
        if isinstance(value, (tuple, list)):  # the captured tensors (``BUFS`` / ``GBUFS``): each element alike
            return tuple(kind(element) for element in value)
        if isinstance(value, torch.Tensor):
            return "D"
        if not isinstance(value, int) or isinstance(value, bool):
            return ""
        return "1" if value == 1 else "D" if value % 16 == 0 else ""

    names = [n for n in launch.jit_fn.arg_names if n not in launch.constexprs]
    return {name: kind(value) for name, value in zip(names, launch.args)}


def aot_entry(kernel: str, generated, dtype: torch.dtype, head_dim: int, head_dim_v: int, config: TileConfig,
              *, seq_divisible: bool = True, write_lse: bool = True, accumulate: bool | None = None,
              has_dlse: bool = False, gqa: bool = False) -> tuple[object, dict[str, str | tuple], dict, dict]:
    """(jit_fn, signature, constexprs, specialization) for ``triton.compile(ASTSource(fn, signature, constexprs),
    target)``; ``specialization`` (``launch_specialization``) is what a launch on the device adds to them.

    ``kernel`` is a key of ``KERNELS``; ``generated`` comes from ``codegen.generate(score_mod, mask_mod)``
    (``generate(None, None)`` for the plain kernel).  Needs a real ``triton.jit`` (TRITON_INTERPRET unset).
    Flags: ``seq_divisible`` (Sk % BLOCK_N == 0: full tiles skip bounds checks), ``write_lse``,
    ``accumulate`` (captured-tensor grads in bwd_dq; default: when ``generated`` has grad slots),
    ``has_dlse`` (the lse output itself receives a gradient), ``gqa`` (only changes runtime ints).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")
    meta = torch.device("meta")
    seq = config.block_n * 2 if seq_divisible else config.block_n * 2 + 1
    q = torch.empty(1, 2 if gqa else 1, seq, head_dim, dtype=dtype, device=meta)
    k = torch.empty(1, 1, seq, head_dim, dtype=dtype, device=meta)
    v = torch.empty(1, 1, seq, head_dim_v, dtype=dtype, device=meta)
    out = torch.empty(1, q.shape[1], seq, head_dim_v, dtype=dtype, device=meta)
    rows = torch.empty(1, 1, seq, dtype=torch.float32, device=meta)
    num = torch.empty(1, 1, 3, dtype=torch.int32, device=meta)
    lists = (num, torch.empty(1, 1, 3, 3, dtype=torch.int32, device=meta)) * 2
    buffers = [t.to(meta) for t in generated.buffers]
    grads = [torch.empty(generated.buffers[s].shape, dtype=torch.float32, device=meta) for s in generated.grad_slots]
    accumulate = bool(generated.grad_slots) if accumulate is None else accumulate
    launch = {
        "fwd": lambda: fwd_launch(q, k, v, out, rows, buffers, lists, 1.0, generated, config, write_lse),
        "bwd_preprocess": lambda: preprocess_launch(out, out, rows if has_dlse else None, rows),
        "bwd_dkdv": lambda: dkdv_launch(q, k, v, out, rows, rows, k, v, buffers, lists, 1.0, generated, config),
        "bwd_dq": lambda: dq_launch(q, k, v, out, rows, rows, q, buffers, grads, lists, 1.0, generated, config,
                                    accumulate),
    }[kernel]()
    return launch.jit_fn, launch_signature(launch), dict(launch.constexprs), launch_specialization(launch)
