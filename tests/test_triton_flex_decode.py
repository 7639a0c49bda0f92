"""The split-KV decoding kernel of triton_flex (``decode.py``), through Triton's interpreter on CPU.

Checked against the float64 oracle (``oracle.py``) for Sq in {1, 3}, Sk in {1, 77, 300}, GQA ratios 1 and 4,
head dims 64 and 72 (Dv != D), fp32 and bf16, the mods of the catalogue (bottom-right causal, sliding window,
document, a lambda mask_mod, softcap, ALiBi, a captured bias table), lse, fully-masked rows, and several
``num_splits``; plus the routing: the decoding kernel runs (and the explanation says so) only without gradient.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from oracle import attention64, dense_mask, score_bias

import dispatchattn as da
from dispatchattn.backends.triton_flex import decode, kernels
from dispatchattn.backends.triton_flex.backend import TritonFlexBackend
from dispatchattn.capabilities import DeviceCaps
from dispatchattn.spec import AttentionSpec
from dispatchattn.tuning.config import TileConfig

pytest.importorskip("triton")

# Tolerances: about twice the largest error measured over the cases below (3 seeds each).
FP32_OUT, FP32_LSE = 6e-7, 1.5e-6  # measured: out 3.2e-7, lse 7.4e-7
BF16_OUT, BF16_LSE = 7e-3, 1.5e-6  # measured: out 3.5e-3 (bf16 output and P), lse 8.5e-7 (fp32 from bf16 inputs)
#: ALiBi's scores reach slope x Sk ~ 150 here, so fp32 rounds them to ~1e-5; the forward kernel measures the
#: same errors on these inputs (out 7.1e-6, lse 1.1e-5).
ALIBI_OUT, ALIBI_LSE = 1.4e-5, 2.2e-5


def _inputs(seed, batch, heads_q, heads_kv, seq_q, seq_kv, dim, dim_v, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, seq_q, dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads_kv, seq_kv, dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads_kv, seq_kv, dim_v, generator=gen).to(dtype)
    return q, k, v


def _oracle(q, k, v, mask_mod=None, score_mod=None):
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    if isinstance(mask_mod, da.masks.MaskMod):
        mask_mod = mask_mod.bind(seq_q, seq_kv)
    if isinstance(score_mod, da.scores.ScoreMod):
        score_mod = score_mod.bind(seq_q, seq_kv)
    mask = dense_mask(mask_mod, batch, heads, seq_q, seq_kv) if mask_mod is not None else None
    return attention64(q, k, v, mask=mask, score_mod=score_mod)


def _errors(out, lse, ref, ref_lse):
    finite = torch.isfinite(ref_lse)
    lse_error = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    return (out.double() - ref).abs().max().item(), lse_error


def _decoded(*args, **kwargs):
    """``da.attention`` on triton_flex, asserting that the decoding kernel ran it."""
    before = decode.runs["decode"]
    out, lse = da.attention(*args, return_lse=True, backend="triton_flex", **kwargs)
    assert decode.runs["decode"] == before + 1, "the decoding kernel did not run"
    return out, lse


@pytest.mark.parametrize("seq_q", [1, 3])
@pytest.mark.parametrize("seq_kv", [1, 77, 300])
@pytest.mark.parametrize("groups", [1, 4])
def test_fp32_matches_the_oracle(seq_q, seq_kv, groups):
    q, k, v = _inputs(seq_q * 1000 + seq_kv + groups, 2, 4, 4 // groups, seq_q, seq_kv, 72, 40)
    out, lse = _decoded(q, k, v, enable_gqa=True)
    assert out.shape == (2, 4, seq_q, 40) and out.dtype == torch.float32 and lse.dtype == torch.float32
    out_error, lse_error = _errors(out, lse, *_oracle(q, k, v))
    assert out_error < FP32_OUT and lse_error < FP32_LSE, (out_error, lse_error)


@pytest.mark.parametrize(("seq_q", "seq_kv", "groups"), [(1, 77, 4), (3, 300, 1), (3, 300, 4)])
def test_bf16_matches_the_oracle(seq_q, seq_kv, groups):
    q, k, v = _inputs(7 + seq_q + groups, 1, 8, 8 // groups, seq_q, seq_kv, 64, 64, torch.bfloat16)
    out, lse = _decoded(q, k, v, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    out_error, lse_error = _errors(out, lse, *_oracle(q, k, v))
    assert out_error < BF16_OUT and lse_error < BF16_LSE, (out_error, lse_error)


def _bias_table_mod(heads, seq_q, seq_kv):
    table = torch.randn(heads, seq_q, seq_kv, generator=torch.Generator().manual_seed(5))
    return lambda score, b, h, q_idx, kv_idx: score + table[h, q_idx, kv_idx]


def _document_mod(seq_q, seq_kv):
    """Packed documents when decoding: the queries are the last Sq positions (``da.masks.document`` needs
    Sq == Sk); the last query starts a new document, so rows see different tiles."""
    ids = torch.cat([torch.arange(seq_kv - 1, dtype=torch.int32) * 3 // seq_kv, torch.tensor([3], dtype=torch.int32)])
    return lambda b, h, q_idx, kv_idx: ids[q_idx + (seq_kv - seq_q)] == ids[kv_idx]


MODS = {
    "causal_bottom_right": lambda h, sq, sk: (da.masks.causal(bottom_right=True), None),
    "sliding_window": lambda h, sq, sk: (da.masks.sliding_window(40, 150), None),
    "document": lambda h, sq, sk: (_document_mod(sq, sk), None),
    "lambda_mask": lambda h, sq, sk: ((lambda b, hh, q_idx, kv_idx: ((kv_idx + hh) % 3 != 0) | (kv_idx < q_idx)),
                                      None),
    "softcap": lambda h, sq, sk: (None, da.scores.softcap(2.0)),
    "alibi": lambda h, sq, sk: (da.masks.causal(bottom_right=True),
                                da.scores.alibi(2.0 ** -torch.arange(1, h + 1, dtype=torch.float32))),
    "bias_table": lambda h, sq, sk: (None, _bias_table_mod(h, sq, sk)),
}


#: ``one_pass``: the RDNA3 form of the decoding loop (its share of the masked and the full tile lists walked in
#: one loop), which the compiler picks for gfx11 targets; forced here so the interpreter runs it.
ONE_PASS = pytest.mark.parametrize("one_pass", [False, True], ids=["two_loops", "one_pass"])


@ONE_PASS
@pytest.mark.parametrize("name", list(MODS))
def test_mods_match_the_oracle(name, one_pass, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE_ONE_PASS", one_pass)
    heads, seq_q, seq_kv = 4, 3, 300
    q, k, v = _inputs(11, 1, heads, 1, seq_q, seq_kv, 64, 64)
    mask_mod, score_mod = MODS[name](heads, seq_q, seq_kv)
    out, lse = _decoded(q, k, v, enable_gqa=True, mask_mod=mask_mod, score_mod=score_mod)
    out_error, lse_error = _errors(out, lse, *_oracle(q, k, v, mask_mod, score_mod))
    out_tolerance, lse_tolerance = (ALIBI_OUT, ALIBI_LSE) if name == "alibi" else (FP32_OUT, FP32_LSE)
    assert out_error < out_tolerance and lse_error < lse_tolerance, (out_error, lse_error)


def test_is_causal_and_a_dense_bool_mask_fold_into_the_mods():
    q, k, v = _inputs(12, 1, 4, 2, 3, 77, 64, 64)
    keep = torch.rand(1, 1, 3, 77, generator=torch.Generator().manual_seed(3)) > 0.5
    out, lse = _decoded(q, k, v, attn_mask=keep, enable_gqa=True)
    out_error, lse_error = _errors(out, lse, *attention64(q, k, v, mask=keep))
    assert out_error < FP32_OUT and lse_error < FP32_LSE, (out_error, lse_error)
    out, lse = _decoded(q, k, v, is_causal=True, enable_gqa=True)  # SDPA's top-left causal: row i sees keys <= i
    out_error, lse_error = _errors(out, lse, *attention64(q, k, v, mask=torch.ones(3, 77).tril().bool()))
    assert out_error < FP32_OUT and lse_error < FP32_LSE, (out_error, lse_error)


def test_bshd_layout():
    q, k, v = _inputs(13, 2, 4, 2, 2, 77, 64, 64)
    out, lse = _decoded(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True, layout="bshd")
    out_error, lse_error = _errors(out.transpose(1, 2), lse, *_oracle(q, k, v))
    assert out_error < FP32_OUT and lse_error < FP32_LSE, (out_error, lse_error)


@ONE_PASS
def test_fully_masked_rows_give_zero_and_minus_infinity(one_pass, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE_ONE_PASS", one_pass)
    q, k, v = _inputs(14, 1, 4, 2, 3, 300, 64, 64)

    def mask_mod(b, h, q_idx, kv_idx):  # q head 1 sees nothing; row 2 of every head sees nothing
        return (h != 1) & (q_idx != 2) & (kv_idx >= q_idx)

    out, lse = _decoded(q, k, v, enable_gqa=True, mask_mod=mask_mod)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, 1] == 0).all() and (out[:, :, 2] == 0).all()
    assert (lse[:, 1] == -math.inf).all() and (lse[:, :, 2] == -math.inf).all()
    out_error, lse_error = _errors(out, lse, *_oracle(q, k, v, mask_mod))
    assert out_error < FP32_OUT and lse_error < FP32_LSE, (out_error, lse_error)


@ONE_PASS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_number_of_splits_does_not_change_the_result(dtype, one_pass, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE_ONE_PASS", one_pass)
    q, k, v = _inputs(15, 1, 8, 2, 3, 300, 64, 64, dtype)
    mask = da.masks.causal(bottom_right=True)
    caps = DeviceCaps.synthetic("cpu", triton_interpret=True)
    config = TileConfig(16, 32, num_warps=4, num_stages=1)  # 10 kv tiles
    results = [decode.decode_flex_attention(q, k, v, mask_mod=mask, scale=0.125, return_lse=True, config=config,
                                            caps=caps, num_splits=splits) for splits in (1, 2, 3, 10, 13)]
    out_1, lse_1 = results[0]
    for out, lse in results[1:]:  # measured: out fp32 1.1e-7, bf16 7.6e-6 (one rounding step); lse 9.5e-7 (2 ulp)
        assert (out.float() - out_1.float()).abs().max() <= (2.5e-7 if dtype == torch.float32 else 1.6e-5)
        assert (lse - lse_1).abs().max() <= 2e-6
    out_error, lse_error = _errors(out_1, lse_1, *attention64(q, k, v, mask=torch.ones(3, 300).tril(297).bool(),
                                                             scale=0.125))
    tolerance = FP32_OUT if dtype == torch.float32 else BF16_OUT
    assert out_error < tolerance and lse_error < max(tolerance, FP32_LSE), (out_error, lse_error)


def test_explanation_says_the_decoding_kernel_runs_with_its_splits():
    q, k, v = _inputs(16, 1, 8, 2, 1, 300, 64, 64)
    decision = da.explain(q, k, v, enable_gqa=True, backend="triton_flex")
    text = str(decision)
    assert re.search(r"decoding kernel \(split-KV\) with num_splits=2: 4 query rows", text), text
    assert "decoding tile config BLOCK_M=16" in text and decision.config == TileConfig(16, 64, 4, 1)


def test_gpu_explanation_pads_rows_to_the_matrix_instruction_and_splits_by_sms():
    backend = TritonFlexBackend()
    spec = AttentionSpec(batch=2, heads_q=32, heads_kv=8, seq_q=1, seq_kv=8192, head_dim=128, head_dim_v=128,
                         dtype=torch.bfloat16, device_type="cuda")
    h100 = replace(DeviceCaps.synthetic("sm_90"), multiprocessor_count=132)
    config, source = backend.tile_config(spec, h100)
    assert config.block_m == 64 and "shipped default" in source
    (note,) = [n for n in backend.notes(spec, h100) if n.startswith("decoding kernel")]
    # 2 x 8 (batch x kv heads) programs per split; 2 waves of 132 SMs -> 17 splits of 128 kv tiles
    assert "num_splits=17" in note and "BLOCK_M=64" in note and "132 SMs" in note, note
    a100 = replace(DeviceCaps.synthetic("sm_80"), multiprocessor_count=108)
    assert backend.tile_config(spec, a100)[0].block_m == 16
    assert backend.tile_config(replace(spec, seq_q=17), h100)[0] == backend._config("fwd", spec, h100)[0]
    with_grad = replace(spec, requires_grad=True)
    assert backend.tile_config(with_grad, h100) == backend._config("fwd", with_grad, h100)


def test_splits_heuristic():
    assert decode.num_splits_for(1, 1, 1, 300, 64, None) == decode.CPU_SPLITS
    assert decode.num_splits_for(1, 1, 1, 10, 64, None) == 1  # one kv tile
    assert decode.num_splits_for(64, 8, 1, 8192, 64, 132) == 1  # 512 programs already fill 132 SMs
    assert decode.num_splits_for(1, 1, 1, 1 << 20, 64, 132) == decode.MAX_SPLITS


def test_with_gradients_the_forward_kernel_runs_and_gradients_are_right():
    q, k, v = (t.requires_grad_(True) for t in _inputs(17, 1, 4, 2, 3, 77, 64, 64))
    mask = da.masks.causal(bottom_right=True)
    before = decode.runs["decode"]
    text = str(da.explain(q, k, v, enable_gqa=True, mask_mod=mask, backend="triton_flex"))
    assert "decoding kernel" not in text and "forward tile config" in text
    out = da.attention(q, k, v, enable_gqa=True, mask_mod=mask, backend="triton_flex")
    assert decode.runs["decode"] == before
    ref, _ = _oracle(*(t.double() for t in (q, k, v)), mask)
    assert (out.double() - ref).abs().max() < FP32_OUT
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.double())
    errors = [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    assert max(errors) < 4e-6, errors  # measured 1.1e-6
    with torch.no_grad():
        _decoded(q, k, v, enable_gqa=True, mask_mod=mask)


def test_more_query_rows_than_the_bound_use_the_forward_kernel():
    q, k, v = _inputs(18, 1, 2, 2, decode.MAX_DECODE_SEQ_Q + 1, 40, 64, 64)
    before = decode.runs["decode"]
    out = da.attention(q, k, v, backend="triton_flex")
    assert decode.runs["decode"] == before
    assert (out.double() - _oracle(q, k, v)[0]).abs().max() < FP32_OUT


def test_many_rows_per_kv_head_span_several_row_tiles():
    """16 x 8 = 128 query rows per kv head: four row tiles of 32."""
    q, k, v = _inputs(19, 1, 8, 1, 16, 77, 32, 32)
    out, lse = _decoded(q, k, v, enable_gqa=True, score_mod=lambda s, b, h, q_idx, kv_idx: s + (h - q_idx) * 0.1)
    ref, ref_lse = attention64(q, k, v, attn_bias=score_bias(
        lambda s, b, h, q_idx, kv_idx: s + (h - q_idx) * 0.1, torch.zeros(1, 8, 16, 77, dtype=torch.float64)))
    out_error, lse_error = _errors(out, lse, ref, ref_lse)
    assert out_error < FP32_OUT and lse_error < FP32_LSE, (out_error, lse_error)


def test_compiled_calls_run_the_decoding_kernels_custom_op():
    """Inside torch.compile triton_flex decodes through ``ops.triton_flex_decode``: same result as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = _inputs(20, 1, 4, 2, 1, 77, 32, 32)

    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=da.masks.causal(bottom_right=True), enable_gqa=True,
                            backend="triton_flex")

    with torch.no_grad():
        eager, _ = _decoded(q, k, v, mask_mod=da.masks.causal(bottom_right=True), enable_gqa=True)
        before = decode.runs["decode"]
        compiled = torch.compile(fn, backend="eager", fullgraph=True)(q, k, v)
    assert decode.runs["decode"] == before + 1
    assert (compiled - eager).abs().max() < FP32_OUT
    torch._dynamo.reset()
