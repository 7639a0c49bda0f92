"""GPU tier: ``torch.compile(fullgraph=True)`` around ``da.attention`` with the GPU backends, and the transformers
adapter on a GPU.  Skipped without a GPU (tests/conftest.py turns the skips into failures when
DISPATCHATTN_REQUIRE_GPU=1, except a case a backend refuses by design: see ``skip_refused``).

Oracle: the same call in eager mode (same backend, same inputs); fp16 tolerance 2e-3 (different fusion of the
surrounding graph only, the attention kernel is the same).
"""

from __future__ import annotations

import pytest
import torch
from gpu_tier import skip_refused
from llama import layers_ran
from torch._dynamo.utils import counters

import dispatchattn as da

pytestmark = pytest.mark.gpu

TOL = dict(atol=2e-3, rtol=2e-3)


def _usable(name: str, q, k, v, **kwargs) -> None:
    decision = da.explain(q, k, v, **kwargs)
    refused = decision.reasons.get(name) or []
    if refused:
        skip_refused(name, refused)


@pytest.mark.parametrize("backend", ["flash", "xformers", "sdpa", "torch_flex", "triton_flex"])
@pytest.mark.parametrize("mask", ["causal", "window"])
def test_compiled_gpu_backend_has_no_graph_break(backend, mask):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
    mod = da.masks.causal() if mask == "causal" else da.masks.sliding_window(64) & da.masks.causal()
    _usable(backend, q, k, v, mask_mod=mod)

    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=mod, backend=backend)

    torch._dynamo.reset()
    counters.clear()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = torch.compile(fn, fullgraph=True)(*leaves)
    out.float().sum().backward()
    expected = fn(q, k, v)
    torch.testing.assert_close(out, expected, **TOL)
    assert sum(counters["graph_break"].values()) == 0
    with torch.compiler.set_stance("fail_on_recompile"):
        torch.compile(fn, fullgraph=True)(q, k, v)


def test_compiled_triton_flex_decoding_runs_its_custom_op():
    """One query row against a 1,000-key cache: the compiled graph calls ``triton_flex_decode`` (split-KV)."""
    from dispatchattn.backends.triton_flex import decode

    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(2, 2, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    mod = da.masks.causal(bottom_right=True)
    _usable("triton_flex", q, k, v, mask_mod=mod, enable_gqa=True)

    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=mod, enable_gqa=True, backend="triton_flex")

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = fn(q, k, v)
        before = decode.runs["decode"]
        out = torch.compile(fn, fullgraph=True)(q, k, v)
    assert decode.runs["decode"] == before + 1
    torch.testing.assert_close(out, expected, atol=0, rtol=0)  # the same kernel with the same splits: bitwise
    assert sum(counters["graph_break"].values()) == 0


def test_transformers_llama_on_gpu_matches_sdpa(monkeypatch, caplog):
    ran = layers_ran(caplog, monkeypatch, "cuda", torch.float16, tol=2e-2)
    print("transformers Llama layers ran:", ran)  # for the run's log (-rA shows it)
    assert ran and "reference" not in ran, ran
