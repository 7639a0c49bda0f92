"""Every catalogue variant x every backend that can run it on CPU: forward, lse and backward against a
float64 reference on fresh random inputs (GQA, odd sizes, non-power-of-2 head dim)."""

from __future__ import annotations

import zlib

import pytest
import torch
from cases import CASES

import dispatchattn as da
from dispatchattn.backends.reference import reference_attention
from dispatchattn.selector import UnsupportedError

CPU_BACKENDS = ("sdpa", "torch_flex", "reference", "triton_flex")
B, HQ, HKV, SQ, SK, D, DV = 2, 4, 2, 77, 77, 40, 24
# Max abs error against float64 measured for correct fp32 runs (all cases, other seeds): out 8.1e-7,
# lse 7.3e-7, grads 2.4e-6; the bounds are ~2x the worst observed.
TOL_FP32 = {"out": 1.6e-6, "lse": 1.5e-6, "grad": 5e-6}


def _inputs(case: str, seed: int, dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, SQ, D, generator=gen).to(dtype)
    k = torch.randn(B, HKV, SK, D, generator=gen).to(dtype)
    v = torch.randn(B, HKV, SK, DV, generator=gen).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(grad)
    kwargs = CASES[case](B, HQ, SQ, SK, gen)
    return q, k, v, kwargs


def _can_run(case: str, backend: str, grad: bool = False, lse: bool = False) -> bool:
    q, k, v, kwargs = _inputs(case, 0, grad=grad)
    try:
        da.explain(q, k, v, enable_gqa=True, backend=backend, return_lse=lse, **kwargs)
        return True
    except UnsupportedError:
        return False


def _oracle(q, k, v, kwargs):
    kw = dict(kwargs)
    mask_mod = kw.pop("mask_mod", None)
    score_mod = kw.pop("score_mod", None)
    if isinstance(mask_mod, da.masks.MaskMod):
        mask_mod = mask_mod.bind(SQ, SK)
    if isinstance(score_mod, da.scores.ScoreMod):
        score_mod = score_mod.bind(SQ, SK)
    return reference_attention(q.double(), k.double(), v.double(), mask_mod=mask_mod, score_mod=score_mod,
                               compute_dtype=torch.float64, **kw)


FWD = [(c, b) for c in CASES for b in CPU_BACKENDS if _can_run(c, b)]
LSE = [(c, b) for c in CASES for b in CPU_BACKENDS if _can_run(c, b, lse=True)]
BWD = [(c, b) for c in CASES for b in CPU_BACKENDS if _can_run(c, b, grad=True)]


def _seed(case: str, tag: str) -> int:
    return zlib.crc32(f"{case}/{tag}".encode())


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("case,backend", FWD)
def test_forward(case, backend):
    q, k, v, kwargs = _inputs(case, seed=_seed(case, "fwd"))
    out = da.attention(q, k, v, enable_gqa=True, backend=backend, **kwargs)
    ref, _ = _oracle(q, k, v, kwargs)
    assert out.shape == (B, HQ, SQ, DV) and out.dtype == torch.float32
    assert _err(out, ref) <= TOL_FP32["out"]


@pytest.mark.parametrize("case,backend", LSE)
def test_lse(case, backend):
    q, k, v, kwargs = _inputs(case, seed=_seed(case, "lse"))
    out, lse = da.attention(q, k, v, enable_gqa=True, backend=backend, return_lse=True, **kwargs)
    ref, ref_lse = _oracle(q, k, v, kwargs)
    assert lse.shape == (B, HQ, SQ) and lse.dtype == torch.float32
    assert _err(out, ref) <= TOL_FP32["out"]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert _err(lse[finite], ref_lse[finite]) <= TOL_FP32["lse"]


@pytest.mark.parametrize("case,backend", BWD)
def test_backward(case, backend):
    q, k, v, kwargs = _inputs(case, seed=_seed(case, "bwd"), grad=True)
    out = da.attention(q, k, v, enable_gqa=True, backend=backend, **kwargs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = _oracle(q64, k64, v64, kwargs)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, got, want in zip("qkv", grads, ref_grads):
        assert _err(got, want) <= TOL_FP32["grad"], name


def test_every_case_has_a_fast_backend():
    """No catalogue case is left to the reference implementation alone on CPU (forward)."""
    for case in CASES:
        assert any(b != "reference" for c, b in FWD if c == case), case
