"""``dispatchattn::flash4_fwd`` / ``flash4_bwd``: FA4's entry points as custom ops, on the FA4 test double.

The double (``fakes/flash_doubles.py::make_fa4``) computes FA4's forward and, from the saved ``out`` and
``lse``, its backward in float64, as the kernels do; so the ops' registration (schema, fake, autograd) and the
lse-gradient term are checked here, on CPU, against the float64 oracle (``oracle.py``).  Synthetic sm_100
caps with flash-attn 4 make ``backend="flash"`` choose FA4 for CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
from fakes.flash_doubles import install, make_fa4
from oracle import attention64
from packaging.version import Version
from torch._dynamo.utils import counters

import dispatchattn as da
from dispatchattn.backends import flash_ops
from dispatchattn.capabilities import DeviceCaps, Libraries, pretend

FA4_CAPS = DeviceCaps.synthetic("sm_100", libraries=Libraries(
    torch=Version("2.13"), flash_attn=None, flash_attn_3=None, flash_attn_4=Version("4.0.0")))

# (causal, window_left, window_right, softcap) as the ops take them, and the oracle's mask / score_mod
SETTINGS = {
    "none": ((False, -1, -1, 0.0), lambda i, j: None, None),
    "causal": ((True, -1, -1, 0.0), lambda i, j: j <= i, None),
    "window": ((False, 8, 3, 0.0), lambda i, j: (j >= i - 8) & (j <= i + 3), None),
    "softcap_causal": ((True, -1, -1, 2.0), lambda i, j: j <= i,
                       lambda s, b, h, qi, ki: 2.0 * torch.tanh(s / 2.0)),
}


@pytest.fixture
def fa4(monkeypatch):
    double = make_fa4()
    install(monkeypatch, fa4=double)
    return double


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _bshd(b=2, s=24, hq=4, hkv=2, d=16, dtype=torch.float32, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d))
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_(grad) for shape in shapes]


def _fwd_args(q, k, v, setting, scale=0.3):
    causal, left, right, softcap = SETTINGS[setting][0]
    return (q, k, v, scale, causal, left, right, softcap, False)


# ------------------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_fwd_passes_opcheck(fa4, setting, grad):
    torch.library.opcheck(flash_ops.flash4_fwd, _fwd_args(*_bshd(grad=grad, seed=1), setting))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_bwd_passes_opcheck(fa4, setting):
    q, k, v = _bshd(seed=2)
    out, lse = flash_ops.flash4_fwd(*_fwd_args(q, k, v, setting))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(flash_ops.flash4_bwd, (q, k, v, out, dout, lse, *_fwd_args(q, k, v, setting)[3:]))
    assert fa4.recorder.last[0] == "_flash_attn_bwd"


def test_bwd_on_bhsd_views_returns_grads_like_its_inputs(fa4):
    """flash.py hands FA4 (B, S, H, D) views of (B, H, S, D) tensors: FA4 allocates grads with empty_like,
    and the fake does the same (strides included)."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _bshd(seed=4))
    out, lse = flash_ops.flash4_fwd(*_fwd_args(q, k, v, "causal"))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    args = (q, k, v, out, dout, lse, *_fwd_args(q, k, v, "causal")[3:])
    torch.library.opcheck(flash_ops.flash4_bwd, args)
    dq, dk, dv = flash_ops.flash4_bwd(*args)
    assert (dq.stride(), dk.stride(), dv.stride()) == (q.stride(), k.stride(), v.stride())


# ---------------------------------------------------------------------------------------------------- values
def _oracle(q, k, v, setting, scale):
    """Float64 out (B, S, H, Dv), lse (B, H, S), differentiable, from (B, S, H, D) inputs."""
    _, mask_of, score_mod = SETTINGS[setting]
    s = q.shape[1]
    mask = mask_of(torch.arange(s).view(s, 1), torch.arange(s).view(1, s))
    out, lse = attention64(*(t.transpose(1, 2) for t in (q, k, v)), mask=mask, score_mod=score_mod, scale=scale)
    return out.transpose(1, 2), lse


# Measured errors vs the float64 oracle, as max |got - want| / (1 + |want|): fp32 6e-8 out, 2.4e-7 lse and grads;
# fp16 4.9e-4 out, 7.6e-4 grads (fp16 rounding of outputs and gradients; the lse stays fp32).  Tolerances: ~2x.
TOLERANCES = {torch.float32: dict(atol=5e-7, rtol=5e-7), torch.float16: dict(atol=1.5e-3, rtol=1.5e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("cotangents", ["out_and_lse", "out_only", "lse_only"])
def test_values_and_gradients_match_oracle(fa4, dtype, setting, cotangents):
    """Forward, lse and the gradients through both outputs (the lse term comes from a second FA4 backward)."""
    scale = 0.3
    q, k, v = _bshd(dtype=dtype, grad=True, seed=6)
    out, lse = flash_ops.flash4_fwd(*_fwd_args(q, k, v, setting, scale))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = _oracle(q64, k64, v64, setting, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **TOLERANCES[torch.float32])

    gen = torch.Generator().manual_seed(7)
    dout, dlse = torch.randn(out.shape, generator=gen).to(dtype), torch.randn(lse.shape, generator=gen)
    loss = {"out_and_lse": lambda o, m: (o * dout).sum() + (m * dlse).sum(),
            "out_only": lambda o, m: (o * dout).sum(),
            "lse_only": lambda o, m: (m * dlse).sum()}[cotangents]
    loss(out.double(), lse.double()).backward()
    loss(ref_out, ref_lse.double()).backward()
    for got, want in zip((q, k, v), (q64, k64, v64)):
        want = want.grad if want.grad is not None else torch.zeros_like(want)  # v, from the lse alone
        torch.testing.assert_close(got.grad.double(), want, **tol)
    calls = [name for name, _, _ in fa4.recorder.calls]
    assert calls == ["_flash_attn_fwd"] + ["_flash_attn_bwd"] * (2 if cotangents == "out_and_lse" else 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_lse_term_rows_sum_to_minus_dlse(dtype):
    """The (O, dO) pair that makes FA4's backward compute the lse term: its fp32 row sums are -dlse to fp32
    precision, in every dtype, including loss-scaled gradients beyond fp16's range and zeros."""
    gen = torch.Generator().manual_seed(12)
    dlse = torch.randn(2, 3, 5, generator=gen) * torch.tensor([0.0, 1e-3, 1.0, 7e4, 1e8]).view(1, 1, 5)
    fake_out, fake_dout = flash_ops._lse_term(torch.empty(2, 5, 3, 8, dtype=dtype), dlse)
    assert fake_out.dtype == fake_dout.dtype == dtype and fake_out.shape == fake_dout.shape == (2, 5, 3, 8)
    row_sums = (fake_out.float() * fake_dout.float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(row_sums, -dlse, atol=0, rtol=2e-7)


def test_ops_pass_flash_arguments_through(fa4):
    q, k, v = _bshd(grad=True, seed=8)
    out, _ = flash_ops.flash4_attention(q, k, v, softmax_scale=0.25, window_size=(5, None), softcap=3.0,
                                        deterministic=True)
    name, _, kw = fa4.recorder.last
    assert name == "_flash_attn_fwd" and kw["return_lse"] and not kw["causal"]
    assert (kw["window_size_left"], kw["window_size_right"], kw["softcap"]) == (5, None, 3.0)
    out.sum().backward()
    name, _, kw = fa4.recorder.last
    assert name == "_flash_attn_bwd" and kw["deterministic"] and kw["softmax_scale"] == 0.25
    assert (kw["window_size_left"], kw["window_size_right"], kw["softcap"]) == (5, None, 3.0)


# ----------------------------------------------------------------------------------- through da.attention
def _bhsd(dtype=torch.float16, grad=True, seed=0, shape=(1, 4, 40, 16), kv_heads=2):
    gen = torch.Generator().manual_seed(seed)
    b, h, s, d = shape
    sizes = ((b, h, s, d), (b, kv_heads, s, d), (b, kv_heads, s, d))
    return [torch.randn(size, generator=gen).to(dtype).requires_grad_(grad) for size in sizes]


COMPILED = {
    "causal": dict(is_causal=True),
    "window_softcap": dict(mask_mod=da.masks.sliding_window(7) & da.masks.causal(),
                           score_mod=da.scores.softcap(4.0)),
    "bottom_right": dict(mask_mod=da.masks.causal(bottom_right=True)),
}


@pytest.mark.parametrize("case", sorted(COMPILED))
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out_lse"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_attention_compiles_through_the_ops(fa4, fresh_dynamo, case, return_lse, grad):
    """fullgraph compile of ``da.attention(backend="flash")`` on FA4: no graph break, the graph calls the ops
    (the recorder sees FA4's ``_flash_attn_fwd``/``_bwd``), results and gradients equal eager's."""
    kwargs = COMPILED[case]

    def fn(q, k, v):
        result = da.attention(q, k, v, backend="flash", enable_gqa=True, return_lse=return_lse, **kwargs)
        return result if return_lse else (result,)

    inputs = _bhsd(grad=grad, seed=9)
    eager_inputs = [t.detach().clone().requires_grad_(grad) for t in inputs]
    with pretend(FA4_CAPS):
        expected = fn(*eager_inputs)
        eager_calls = [name for name, _, _ in fa4.recorder.calls]
        fa4.recorder.calls.clear()
        compiled = torch.compile(fn, fullgraph=True)
        got = compiled(*inputs)
    assert eager_calls == (["_flash_attn_fwd"] if return_lse and grad else ["flash_attn_func"])
    traced_calls = [name for name, _, _ in fa4.recorder.calls]
    # The first call is the library tried once while tracing (compiled._launchable_library); the graph's own is last.
    assert len(traced_calls) == 2 and traced_calls[-1] == "_flash_attn_fwd", traced_calls
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if grad:
        gen = torch.Generator().manual_seed(10)
        cotangents = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in expected]
        fa4.recorder.calls.clear()
        torch.autograd.backward(got, cotangents)
        # the lse term's second backward runs only where the lse is an output (AOTAutograd gives it a gradient)
        assert [name for name, _, _ in fa4.recorder.calls] == ["_flash_attn_bwd"] * (1 + return_lse)
        torch.autograd.backward(expected, cotangents)
        for a, b in zip(inputs, eager_inputs):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-3, rtol=1e-3)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_eager_lse_gradient_is_exact(fa4):
    """Eager calls whose lse needs a gradient go through the ops: FA4's own autograd.Function gives the lse
    none, the ops add the exact term (compared with the float64 oracle)."""
    q, k, v = _bhsd(dtype=torch.float16, grad=True, seed=11, kv_heads=4)
    with pretend(FA4_CAPS):
        out, lse = da.attention(q, k, v, backend="flash", is_causal=True, return_lse=True)
    assert fa4.recorder.last[0] == "_flash_attn_fwd"
    s = q.shape[2]
    mask = torch.arange(s).view(1, s) <= torch.arange(s).view(s, 1)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention64(q64, k64, v64, mask=mask)
    (out.double().sum() + 3 * lse.double().sum()).backward()
    (ref_out.sum() + 3 * ref_lse.sum()).backward()
    for got, want in zip((q, k, v), (q64, k64, v64)):  # measured 2e-3 (fp16 out and grads, cotangents of 1)
        torch.testing.assert_close(got.grad.double(), want.grad, atol=4e-3, rtol=4e-3)
