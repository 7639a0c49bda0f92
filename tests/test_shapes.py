"""Odd sizes, layouts, GQA, Dv != D, low precision and fully-masked rows on the CPU backends."""

from __future__ import annotations

import pytest
import torch

import dispatchattn as da
from dispatchattn.backends.reference import reference_attention

# Measured max abs error of correct fp32 runs against float64 over these shapes: 9e-7 (out), 2.1e-6 (grads).
TOL = {"out": 2e-6, "grad": 5e-6}


def _rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("sq,sk", [(1, 77), (77, 1), (100, 130), (130, 100), (1, 1)])
@pytest.mark.parametrize("d", [40, 72, 128])
def test_odd_sizes_forward_backward(backend, sq, sk, d):
    seed = sq * 1000 + sk * 10 + d
    q = _rand(1, 4, sq, d, seed=seed).requires_grad_()
    k = _rand(1, 2, sk, d, seed=seed + 1).requires_grad_()
    v = _rand(1, 2, sk, d, seed=seed + 2).requires_grad_()
    out = da.attention(q, k, v, enable_gqa=True, backend=backend, mask_mod=da.masks.causal(bottom_right=True))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference_attention(
        q64, k64, v64, mask_mod=da.masks.causal(bottom_right=True).bind(sq, sk), compute_dtype=torch.float64
    )
    assert (out.double() - ref).abs().max() <= TOL["out"]
    g = _rand(*out.shape, seed=seed + 3)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= TOL["grad"]


@pytest.mark.parametrize("backend", ["sdpa", "torch_flex", "reference"])
def test_bshd_layout_equals_bhsd(backend):
    q, k, v = (_rand(2, 67, 4, 32, seed=i) for i in range(3))  # (B, S, H, D)
    out = da.attention(q, k, v, layout="bshd", backend=backend, mask_mod=da.masks.sliding_window(5))
    ref = da.attention(
        *(t.transpose(1, 2) for t in (q, k, v)), backend="reference", mask_mod=da.masks.sliding_window(5)
    )
    assert out.shape == (2, 67, 4, 32)
    assert (out.transpose(1, 2) - ref).abs().max() <= TOL["out"]


@pytest.mark.parametrize("backend", ["sdpa", "torch_flex", "reference"])
@pytest.mark.parametrize("kind", ["mask_mod", "bool_mask", "float_mask"])
def test_fully_masked_rows_are_zero_with_lse_minus_inf(backend, kind):
    q, k, v = (_rand(1, 2, 96, 16, seed=10 + i) for i in range(3))
    if kind == "mask_mod":
        kwargs = {"mask_mod": lambda b, h, qi, kv: kv < qi - 5}  # rows 0..5 see no key
    elif kind == "bool_mask":
        mask = torch.rand(96, 96, generator=torch.Generator().manual_seed(3)) > 0.5
        mask[:6] = False
        kwargs = {"attn_mask": mask}
    else:
        bias = _rand(96, 96, seed=4)
        bias[:6] = float("-inf")
        kwargs = {"attn_mask": bias}
    if backend == "torch_flex" and kind != "mask_mod":
        kwargs["mask_mod"] = da.masks.full()
    out = da.attention(q, k, v, backend=backend, **kwargs)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    assert out[:, :, 6:].abs().amax(-1).min() > 0


def test_fully_masked_rows_lse_and_grads_reference():
    q, k, v = (_rand(1, 2, 24, 16, seed=20 + i).requires_grad_() for i in range(3))
    out, lse = da.attention(q, k, v, backend="reference", return_lse=True, mask_mod=lambda b, h, qi, kv: kv < qi - 5)
    assert torch.isneginf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all()
    (out.sum() + lse[:, :, 6:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :6], torch.zeros_like(q.grad[:, :, :6]))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_pytorch_error(backend, dtype):
    """flash-attn's rule: our error vs float64 is at most 2x (+ small atol) plain PyTorch's in the same dtype."""
    q, k, v = (_rand(2, 4, 100, 64, seed=30 + i) for i in range(3))
    mask = da.masks.sliding_window(17) & da.masks.causal()
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=mask, compute_dtype=torch.float64)
    lowp = (q.to(dtype), k.to(dtype), v.to(dtype))
    plain, _ = reference_attention(*lowp, mask_mod=mask, compute_dtype=dtype)
    ours = da.attention(*lowp, backend=backend, mask_mod=mask)
    assert ours.dtype == dtype
    plain_err = (plain.double() - ref).abs().max().item()
    assert (ours.double() - ref).abs().max().item() <= 2 * plain_err + 1e-4


def test_dropout_keeps_expectation_and_zeroes_entries():
    q, k, v = (_rand(1, 1, 64, 16, seed=40 + i) for i in range(3))
    torch.manual_seed(0)
    outs = torch.stack([da.attention(q, k, v, dropout_p=0.3, backend="sdpa") for _ in range(400)])
    plain = da.attention(q, k, v, backend="sdpa")
    assert not torch.allclose(outs[0], plain)
    # The mean over draws converges to the dropout-free output (unbiased 1/(1-p) rescaling).
    assert (outs.mean(0) - plain).abs().max() < 0.1
