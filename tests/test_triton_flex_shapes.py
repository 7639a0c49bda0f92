"""triton_flex kernels on odd shapes, dtypes, layouts and edge cases, against the float64 reference of
``test_triton_flex_catalogue`` (plain PyTorch, no kernel code).  CPU, Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from test_triton_flex_catalogue import reference

import dispatchattn as da
from dispatchattn.backends.triton_flex.autograd import triton_flex_attention
from dispatchattn.tuning.config import TileConfig

CONFIG = TileConfig(32, 32)
# fp32 max abs errors measured on these cases (two seeds): out 4.6e-7, lse 6.0e-7, grads 1.5e-6 except
# Sk=1, where dK is exactly 0 in float64 and fp32 shows 6.0e-6 of cancellation (ds = p * (dp - delta)).
TOL_FP32 = {"out": 1e-6, "lse": 1.2e-6, "grad": 1.2e-5}


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()


def _check(q, k, v, score_mod, mask_mod, gen, tol, config=CONFIG):
    scale = q.shape[-1] ** -0.5
    out, lse = triton_flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=scale,
                                     return_lse=True, fwd_config=config, bwd_config=config)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*leaves, score_mod, mask_mod, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert out.shape == (*q.shape[:3], v.shape[-1])
    plain = _plain_errors(q, k, v, score_mod, mask_mod, scale, ref_out, gen)
    assert (out.double() - ref_out).abs().max() < 2 * plain[0] + tol["out"]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double() - ref_lse)[finite].abs().max() < tol["lse"]
    dout = _dout(out, gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout.double())
    for got, want, plain_error in zip(grads, ref_grads, plain[1:]):
        assert got.dtype == q.dtype and got.shape == want.shape
        assert (got.double() - want).abs().max() < 2 * plain_error + tol["grad"]
    return out, lse, grads


def _dout(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(gen.initial_seed() + 1)).to(out.dtype)


def _plain_errors(q, k, v, score_mod, mask_mod, scale, ref_out, gen) -> list[float]:
    """fp32: zeros (the tolerance alone bounds the error).  16-bit: the error of plain PyTorch computing
    in that dtype (out, dq, dk, dv) against float64 -- flash-attn's rule allows twice it."""
    if q.dtype == torch.float32:
        return [0.0] * 4
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    low, _ = reference(*leaves, score_mod, mask_mod, scale, dtype=q.dtype)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    high, _ = reference(*exact, score_mod, mask_mod, scale)
    dout = _dout(low, gen)
    low_grads = torch.autograd.grad(low, leaves, dout)
    high_grads = torch.autograd.grad(high, exact, dout.double())
    errors = [(low.double() - ref_out).abs().max().item()]
    return errors + [(a.double() - b).abs().max().item() for a, b in zip(low_grads, high_grads)]


ODD = [  # (Sq, Sk, Hq, Hkv, D, Dv, mask)
    (1, 77, 4, 2, 64, 64, da.masks.causal(bottom_right=True)),  # decoding
    (77, 100, 2, 1, 40, 24, da.masks.sliding_window(9, 5)),  # Dv != D, Sq != Sk
    (130, 1, 2, 2, 72, 72, None),  # a single key
    (33, 130, 2, 1, 128, 128, da.masks.causal(bottom_right=True)),
    (100, 100, 2, 2, 96, 40, lambda b, h, q, kv: (q - kv).abs() <= 40),
]


@pytest.mark.parametrize("shape", ODD, ids=lambda s: f"sq{s[0]}-sk{s[1]}-h{s[2]}/{s[3]}-d{s[4]}/{s[5]}")
def test_odd_shapes_fp32(shape):
    seq_q, seq_kv, heads_q, heads_kv, dim, dim_v, mask = shape
    gen = torch.Generator().manual_seed(seq_q * 1000 + seq_kv)
    q = _randn(gen, 1, heads_q, seq_q, dim)
    k = _randn(gen, 1, heads_kv, seq_kv, dim)
    v = _randn(gen, 1, heads_kv, seq_kv, dim_v)
    if isinstance(mask, da.masks.MaskMod):
        mask = mask.bind(seq_q, seq_kv)
    _check(q, k, v, None, mask, gen, TOL_FP32)


# bf16: flash-attn's rule, error <= 2 x (plain PyTorch in bf16 vs float64) + this atol; lse is fp32
# (measured 5.2e-7).  The interpreter widens bf16 tiles to fp32; on a GPU P and dS are rounded to bf16.
TOL_BF16 = {"out": 1e-3, "lse": 1.2e-6, "grad": 1e-3}


def test_bf16_softcap_causal():
    gen = torch.Generator().manual_seed(11)
    q = _randn(gen, 2, 2, 64, 64, dtype=torch.bfloat16)
    k = _randn(gen, 2, 1, 64, 64, dtype=torch.bfloat16)
    v = _randn(gen, 2, 1, 64, 64, dtype=torch.bfloat16)
    _check(q, k, v, da.scores.softcap(2.0), da.masks.causal(), gen, TOL_BF16, TileConfig(64, 64))


def test_fp16_forward():
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 50, 32, generator=gen).half() for _ in range(3))
    out, _ = triton_flex_attention(q, k, v, mask_mod=da.masks.causal(), scale=0.2, fwd_config=TileConfig(64, 64))
    ref, _ = reference(q, k, v, None, da.masks.causal(), 0.2)
    assert out.dtype == torch.float16 and (out.double() - ref).abs().max() < 2e-3  # measured 9e-4


def test_fully_masked_rows_are_zero_with_minus_inf_lse_and_finite_grads():
    gen = torch.Generator().manual_seed(13)
    q, k, v = _randn(gen, 1, 2, 70, 32), _randn(gen, 1, 2, 70, 32), _randn(gen, 1, 2, 70, 32)
    mask = lambda b, h, q_idx, kv_idx: (q_idx >= 40) & (kv_idx <= q_idx)  # noqa: E731 - rows 0..39 empty
    out, lse, grads = _check(q, k, v, None, mask, gen, TOL_FP32)
    assert torch.equal(out[:, :, :40], torch.zeros_like(out[:, :, :40]))
    assert torch.isneginf(lse[:, :, :40]).all() and torch.isfinite(lse[:, :, 40:]).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :, :40], torch.zeros_like(grads[0][:, :, :40]))


def test_bshd_views_keep_their_layout():
    """A (B, S, H, D) tensor arrives as a transposed view; out and grads come back in the same layout."""
    gen = torch.Generator().manual_seed(14)
    q = torch.randn(1, 45, 4, 32, generator=gen).requires_grad_()
    k = torch.randn(1, 45, 2, 32, generator=gen).requires_grad_()
    v = torch.randn(1, 45, 2, 16, generator=gen).requires_grad_()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out, lse, grads = _check(qt, kt, vt, None, da.masks.causal(), gen, TOL_FP32)
    assert out.transpose(1, 2).is_contiguous()
    assert grads[0].stride() == qt.stride()


def test_no_grad_and_scale():
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen) for _ in range(3))
    with torch.no_grad():
        out, lse = triton_flex_attention(q, k, v, scale=0.05, fwd_config=TileConfig(64, 64))
    ref, _ = reference(q, k, v, None, None, 0.05)
    assert lse is None and out.grad_fn is None
    assert (out.double() - ref).abs().max() < TOL_FP32["out"]


def test_rejects_heads_not_divisible():
    q = torch.randn(1, 3, 16, 16)
    k = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        triton_flex_attention(q, k, k, scale=1.0)


def test_batched_document_ids():
    """(B, S) document ids: the block lists get a batch dimension and each row keeps its own documents."""
    gen = torch.Generator().manual_seed(16)
    ids = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)) for lengths in
                       ([20, 30, 14], [40, 4, 20])])
    q, k, v = (_randn(gen, 2, 2, 64, 32) for _ in range(3))
    _check(q, k, v, da.scores.softcap(4.0), da.masks.document(ids), gen, TOL_FP32, TileConfig(32, 32))


def test_launch_functions_take_the_kernel_key_and_captured_tensors():
    """What a ``torch.library.triton_op`` wrapper would do: find the kernel by key, pass new tensors."""
    from dispatchattn.backends.triton_flex import codegen
    from dispatchattn.backends.triton_flex.autograd import flex_forward
    from dispatchattn.backends.triton_flex.block_mask import build_block_mask

    gen = torch.Generator().manual_seed(17)
    table = torch.randn(2, 40, generator=gen)
    key = codegen.generate(lambda s, b, h, q_idx, kv_idx: s + table[h, kv_idx], None).key
    other = torch.randn(2, 40, generator=gen)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen) for _ in range(3))
    block_mask = build_block_mask(None, batch=1, heads=2, seq_q=40, seq_kv=40, block_m=64, block_n=64)
    out, lse = flex_forward(q, k, v, codegen.generated_by_key(key), block_mask, 0.2, TileConfig(64, 64),
                            buffers=[other])
    ref, ref_lse = reference(q, k, v, lambda s, b, h, q_idx, kv_idx: s + other[h, kv_idx], None, 0.2)
    assert (out.double() - ref).abs().max() < TOL_FP32["out"] and (lse.double() - ref_lse).abs().max() < 1.2e-6
