"""The ``@triton.jit`` kernels of split-KV decoding; the launch logic and the design are in ``decode.py``.

Kept apart from the launch code (as ``kernels.py`` is from ``autograd.py``): this file holds only device code.
"""

import triton
import triton.language as tl

from .kernels import INTERPRETED, LN2, load_cols, load_rows, one_pass_target, online_softmax_step, score_tile


@triton.jit
def _split_share(num_ptr, split, NUM_SPLITS):
    """(first, count) of this split's contiguous share of the ``num_ptr`` tiles of a list."""
    num_blocks = tl.load(num_ptr)
    per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    first = split * per_split
    return first, tl.maximum(tl.minimum(first + per_split, num_blocks) - first, 0)


@triton.jit
def _decode_blocks(acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                   num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, split, NUM_SPLITS, b, h, q_pos, offs_d, offs_dv,
                   SEQ_KV, sm_scale, BUFS, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_N: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,
                   HAS_SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
                   ONE_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over this split's contiguous share of the kv tiles listed at ``idx_ptr``, then, if
    ``ONE_PASS`` (RDNA3, as ``kernels.one_pass``), in the same loop over its share of those at ``full_idx_ptr``."""
    if ONE_PASS:
        first, num_masked = _split_share(num_ptr, split, NUM_SPLITS)
        full_first, num_full = _split_share(full_num_ptr, split, NUM_SPLITS)
        start, stop = 0, num_masked + num_full
    else:
        num_blocks = tl.load(num_ptr)
        per_split = tl.cdiv(num_blocks, NUM_SPLITS)
        start = split * per_split
        stop = tl.minimum(start + per_split, num_blocks)
        first, num_masked, full_first = start, stop, start  # unused outside a one-pass loop
    for i in range(start, stop):
        masked = (i < num_masked) if ONE_PASS else True  # constexpr True outside a one-pass loop
        if ONE_PASS:
            kv_tile = tl.load(tl.where(masked, idx_ptr + first, full_idx_ptr + full_first - num_masked) + i)
        else:
            kv_tile = tl.load(idx_ptr + i)
        offs_n = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if ONE_PASS:  # RDNA3: K through transposed pointers, no tl.trans in registers (as kernels._fwd_blocks)
            k = load_cols(K_head, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV, HEAD_DIM)
        else:
            k = load_rows(K_head, offs_n, stride_kn, offs_d, stride_kd, SEQ_KV, HEAD_DIM)
        v = load_rows(V_head, offs_n, stride_vn, offs_dv, stride_vd, SEQ_KV, HEAD_DIM_V)
        # The forward kernel's helper, with q_idx = each row's query index and h a column of q heads.
        _, score, _ = score_tile(q, k, sm_scale, b, h, q_pos, offs_n, SEQ_KV, BUFS, masked, SCORE_MOD,
                              MASK_MOD, HAS_SCORE_MOD, APPLY_MASK, CHECK_BOUNDS, DOT_PRECISION, ONE_PASS)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, score, v, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def decode_kernel(
    Q, K, V, OutPart, LsePart, BUFS, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
    stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd, mask_stride_z, mask_stride_h, NUM_KV_TILES,
    HEADS_KV, GROUPS, SEQ_Q, SEQ_KV, NUM_SPLITS, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,
    HAS_SCORE_MOD: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // HEADS_KV
    h_kv = pid_bh % HEADS_KV
    rows = GROUPS * SEQ_Q
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.minimum(offs_r, rows - 1)  # padding rows repeat the last real row: valid indices for the mods
    q_pos = row % SEQ_Q
    h_row = h_kv * GROUPS + row // SEQ_Q
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q_ptrs = (Q + b * stride_qz + h_row[:, None] * stride_qh + q_pos[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=(offs_r[:, None] < rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    K_head = K + b * stride_kz + h_kv * stride_kh
    V_head = V + b * stride_vz + h_kv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    lists = b * mask_stride_z + h_kv * mask_stride_h
    h = h_row[:, None]
    one_pass: tl.constexpr = one_pass_target()
    acc, l_i, m_i = _decode_blocks(
        acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, KV_NUM + lists,
        KV_IDX + lists * NUM_KV_TILES, (FULL_KV_NUM if one_pass else KV_NUM) + lists,
        (FULL_KV_IDX if one_pass else KV_IDX) + lists * NUM_KV_TILES, split, NUM_SPLITS, b, h, q_pos, offs_d,
        offs_dv, SEQ_KV, sm_scale, BUFS, HEAD_DIM, HEAD_DIM_V, BLOCK_N, SCORE_MOD, MASK_MOD, HAS_SCORE_MOD,
        True, True, one_pass, DOT_PRECISION)
    if not one_pass:
        acc, l_i, m_i = _decode_blocks(
            acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, FULL_KV_NUM + lists,
            FULL_KV_IDX + lists * NUM_KV_TILES, FULL_KV_NUM + lists, FULL_KV_IDX + lists * NUM_KV_TILES, split,
            NUM_SPLITS, b, h, q_pos, offs_d, offs_dv, SEQ_KV, sm_scale, BUFS, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
            SCORE_MOD, MASK_MOD, HAS_SCORE_MOD, False, not EVEN_N, False, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    # scratch (NUM_SPLITS, B, Hq, Sq, Dv) and (NUM_SPLITS, B, Hq, Sq), contiguous
    part_row = ((split * (tl.num_programs(0) // HEADS_KV) + b) * HEADS_KV * GROUPS + h_row) * SEQ_Q + q_pos
    keep_row = offs_r < rows
    tl.store(OutPart + part_row[:, None] * HEAD_DIM_V + offs_dv[None, :], out,
             mask=keep_row[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LsePart + part_row, lse2, mask=keep_row)


@triton.jit
def decode_reduce_kernel(OutPart, LsePart, Out, Lse, stride_oz, stride_oh, stride_om, stride_od,
                          HEADS_Q, SEQ_Q, ROWS, NUM_SPLITS, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
                          BLOCK_R: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Merge the splits of ``BLOCK_R`` rows (row = (b * Hq + h) * Sq + q) into out and lse (natural log)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, DV_PAD)
    keep_r = offs_r < ROWS
    keep = keep_r[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, DV_PAD], tl.float32)
    for split in range(0, NUM_SPLITS):
        lse2 = tl.load(LsePart + split * ROWS + offs_r, mask=keep_r, other=float("-inf"))
        part = tl.load(OutPart + (split * ROWS + offs_r[:, None]) * HEAD_DIM_V + offs_dv[None, :], mask=keep,
                       other=0.0)
        m_new = tl.maximum(m, lse2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        weight = tl.exp2(lse2 - m_safe)
        total = total * alpha + weight
        acc = acc * alpha[:, None] + part * weight[:, None]
        m = m_new
    t_safe = tl.where(total == 0.0, 1.0, total)
    out = acc / t_safe[:, None]
    b = offs_r // (HEADS_Q * SEQ_Q)
    h = (offs_r // SEQ_Q) % HEADS_Q
    q = offs_r % SEQ_Q
    out_ptrs = (Out + b[:, None] * stride_oz + h[:, None] * stride_oh + q[:, None] * stride_om
                + offs_dv[None, :] * stride_od)
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=keep)
    if WRITE_LSE:
        lse = tl.where(total == 0.0, float("-inf"), (m + tl.log2(t_safe)) * LN2)
        tl.store(Lse + offs_r, lse, mask=keep_r)
