"""GPU tier: flash and xformers on a real GPU (CUDA or ROCm) against a float64 reference, fp16 and bf16.

Skipped without a GPU by the ``gpu`` marker (tests/gpu_tier.py turns the skips into failures when
DISPATCHATTN_REQUIRE_GPU=1, a missing library included); a case a backend refuses on this arch by design
(its ``why_not`` reasons) is "not applicable here", the one skip strict mode keeps.
Tolerance (flash-attn's rule): our error against float64 is at most 2x plain PyTorch's error in the same
low precision, plus a small atol.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from gpu_tier import skip_refused

import dispatchattn as da
from dispatchattn.backends import get_backend
from dispatchattn.capabilities import probe
from dispatchattn.spec import build_spec

pytestmark = pytest.mark.gpu

LIBRARY = {"flash": "flash_attn", "xformers": "xformers"}


def _reference(q, k, v, keep, score_fn, dtype):
    """Attention in ``dtype`` math (dtype=float64: the reference); q/k/v (B, H, S, D)."""
    q, k, v = (t.detach().to(dtype) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5 if dtype != torch.float64 else \
        (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    h = torch.arange(q.shape[1], device=q.device).view(1, -1, 1, 1)
    i = torch.arange(q.shape[2], device=q.device).view(1, 1, -1, 1)
    j = torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1)
    if score_fn is not None:
        s = score_fn(s, h, i, j)
    if keep is not None:
        s = s.masked_fill(~keep(i, j), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p.to(v.dtype) @ v).double()


SLOPES = torch.tensor([2.0 ** -(n + 1) for n in range(8)])
IDS = torch.tensor([0] * 100 + [1] * 130 + [2] * 26)
CASES = {
    "plain": dict(sq=256, sk=256),
    "causal": dict(sq=256, sk=256, is_causal=True, keep=lambda i, j: j <= i),
    "bottom_right_sq_gt_sk": dict(sq=200, sk=130, mask=lambda: da.masks.causal(bottom_right=True),
                                  keep=lambda i, j: j <= i - 70),
    "window": dict(sq=256, sk=256, mask=lambda: da.masks.sliding_window(64) & da.masks.causal(),
                   keep=lambda i, j: (j <= i) & (j >= i - 64)),
    "softcap": dict(sq=256, sk=256, is_causal=True, score=lambda: da.scores.softcap(20.0),
                    keep=lambda i, j: j <= i, score_fn=lambda s, h, i, j: 20.0 * torch.tanh(s / 20.0)),
    "alibi": dict(sq=256, sk=256, is_causal=True, score=lambda: da.scores.alibi(SLOPES.cuda()),
                  keep=lambda i, j: j <= i, score_fn=lambda s, h, i, j: s + SLOPES.cuda().view(1, -1, 1, 1) * (j - i)),
    "document": dict(sq=256, sk=256, mask=lambda: da.masks.document(IDS.cuda()),
                     keep=lambda i, j: IDS.cuda()[i] == IDS.cuda()[j]),
}


@pytest.mark.parametrize("backend", ["flash", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("gqa", [False, True])
def test_backend_matches_float64(backend, dtype, case, gqa):
    if importlib.util.find_spec(LIBRARY[backend]) is None:
        pytest.skip(f"{LIBRARY[backend]} is not installed on this GPU machine")
    c = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)
    hkv = 4 if gqa else 8
    q = torch.randn(2, 8, c["sq"], 64, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(2, hkv, c["sk"], 64, device="cuda", generator=g).to(dtype) for _ in range(2))
    kwargs = dict(is_causal=c.get("is_causal", False), enable_gqa=gqa,
                  mask_mod=c["mask"]() if "mask" in c else None, score_mod=c["score"]() if "score" in c else None)
    spec = build_spec(q, k, v, **kwargs)
    reasons = get_backend(backend).why_not(spec, probe(q.device))
    if reasons:
        skip_refused(backend, reasons)
    out, lse = da.attention(q, k, v, backend=backend, return_lse=True, **kwargs)
    ref = _reference(q, k, v, c.get("keep"), c.get("score_fn"), torch.float64)
    low = _reference(q, k, v, c.get("keep"), c.get("score_fn"), dtype)
    err, base = (out.double() - ref).abs().max().item(), (low - ref).abs().max().item()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert err <= 2 * base + 1e-3, f"{backend} error {err:.2e} vs PyTorch {dtype} {base:.2e}"
    assert lse.dtype == torch.float32 and lse.shape == (2, 8, c["sq"])


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_backward_matches_float64(backend):
    if importlib.util.find_spec(LIBRARY[backend]) is None:
        pytest.skip(f"{LIBRARY[backend]} is not installed on this GPU machine")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 130, 64, device="cuda", generator=g).half().requires_grad_() for _ in range(3))
    out = da.attention(q, k, v, is_causal=True, backend=backend)
    out.float().pow(2).sum().backward()
    grads = [t.grad.double() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    ref.pow(2).sum().backward()
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert (got - want).abs().max().item() <= 5e-2 * want.abs().max().item() + 1e-2
