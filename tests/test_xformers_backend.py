"""xformers backend: the attn_bias class chosen for each structure (real xFormers classes on a recording
double, float64 numerics) and decision tables predicted from vendor_tables."""

from __future__ import annotations

import pytest
import torch
from fakes.reference import attention64
from packaging.version import Version

import dispatchattn as da
from dispatchattn.backends.base import AttentionCall
from dispatchattn.backends.xformers import XformersBackend, library_reasons
from dispatchattn.capabilities import DeviceCaps, Libraries, pretend
from dispatchattn.spec import AttentionSpec, build_spec

try:  # the real bias classes (xFormers installs on CPU); translation tests skip without them
    from xformers.ops.fmha import attn_bias as ab
except ImportError:
    ab = None
from fakes.xformers_doubles import install  # noqa: E402  (skips the test when xFormers is absent)


def caps(arch="sm_80", xformers="0.0.35"):
    return DeviceCaps.synthetic(arch, libraries=Libraries(torch=Version("2.13"), xformers=Version(xformers)
                                                          if xformers else None))


def tensors(b, hq, hkv, sq, sk, d, dtype=torch.float16, layout="bhsd", seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda h, s, e: (b, h, s, e)) if layout == "bhsd" else (lambda h, s, e: (b, s, h, e))
    return [torch.randn(shape(h, s, e), generator=g).to(dtype)
            for h, s, e in ((hq, sq, d), (hkv, sk, d), (hkv, sk, dv or d))]


def run(q, k, v, device_caps=None, *, attn_mask=None, is_causal=False, mask_mod=None, score_mod=None,
        dropout_p=0.0, return_lse=True, enable_gqa=False, layout="bhsd"):
    device_caps = device_caps or caps()
    spec = build_spec(q, k, v, attn_mask, dropout_p, is_causal, None, enable_gqa, score_mod=score_mod,
                      mask_mod=mask_mod, layout=layout, return_lse=return_lse)
    call = AttentionCall(q, k, v, attn_mask, spec.mask, spec.score, spec.head_dim ** -0.5, dropout_p, is_causal,
                         enable_gqa, return_lse, layout)
    backend = XformersBackend()
    assert backend.why_not(spec, device_caps) == []
    with pretend(device_caps):
        return backend.run(call, spec)


def check(out, lse, q, k, v, keep=None, score_fn=None, layout="bhsd"):
    ref, ref_lse = attention64(q, k, v, scale=q.shape[-1] ** -0.5, keep=keep, score_fn=score_fn, layout=layout)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)


def ij(sq, sk):
    return torch.arange(sq).view(sq, 1), torch.arange(sk).view(1, sk)


def bias_of(calls):
    return calls[-1][2]["attn_bias"]


# ---------------------------------------------------------------------------------------------- translation
@pytest.mark.parametrize("sq,sk", [(77, 77), (30, 70), (70, 30)])
def test_top_left_causal_is_lower_triangular(monkeypatch, sq, sk):
    calls = install(monkeypatch)
    q, k, v = tensors(2, 2, 2, sq, sk, 40)
    out, lse = run(q, k, v, is_causal=True)
    assert type(bias_of(calls)) is ab.LowerTriangularMask
    i, j = ij(sq, sk)
    check(out, lse, q, k, v, j <= i)


@pytest.mark.parametrize("sq,sk", [(30, 70), (70, 30)])
def test_bottom_right_causal(monkeypatch, sq, sk):
    calls = install(monkeypatch, nan_rows=True)
    q, k, v = tensors(1, 2, 2, sq, sk, 32, seed=1)
    out, lse = run(q, k, v, mask_mod=da.masks.causal(bottom_right=True))
    assert type(bias_of(calls)) is ab.LowerTriangularFromBottomRightMask
    i, j = ij(sq, sk)
    check(out, lse, q, k, v, j <= i + sk - sq)
    if sq > sk:
        assert torch.isneginf(lse[:, :, : sq - sk]).all() and (out[:, :, : sq - sk] == 0).all()


def test_causal_window(monkeypatch):
    calls = install(monkeypatch)
    q, k, v = tensors(1, 2, 2, 64, 64, 32, seed=2, layout="bshd")
    out, lse = run(q, k, v, mask_mod=da.masks.sliding_window(10) & da.masks.causal(), layout="bshd")
    bias = bias_of(calls)
    assert type(bias) is ab.LowerTriangularFromBottomRightLocalAttentionMask and bias._window_size == 11
    i, j = ij(64, 64)
    check(out, lse, q, k, v, (j <= i) & (j >= i - 10), layout="bshd")


def test_two_sided_window(monkeypatch):
    calls = install(monkeypatch)
    q, k, v = tensors(1, 2, 2, 40, 60, 32, seed=3)
    out, lse = run(q, k, v, mask_mod=da.masks.sliding_window(5, 30))
    bias = bias_of(calls)
    assert type(bias) is ab.LocalAttentionFromBottomRightMask and (bias.window_left, bias.window_right) == (25, 10)
    i, j = ij(40, 60)
    check(out, lse, q, k, v, (j >= i - 5) & (j <= i + 30))


@pytest.mark.parametrize("causal", [False, True])
def test_documents_block_diagonal(monkeypatch, causal):
    calls = install(monkeypatch)
    ids = torch.tensor([[0] * 9 + [1] * 21 + [2] * 20, [4] * 25 + [5] * 25])
    mask = da.masks.document(ids) & da.masks.causal() if causal else da.masks.document(ids)
    q, k, v = tensors(2, 4, 2, 50, 50, 32, seed=4)
    out, lse = run(q, k, v, mask_mod=mask, enable_gqa=True)
    bias = bias_of(calls)
    assert type(bias) is (ab.BlockDiagonalCausalMask if causal else ab.BlockDiagonalMask)
    assert bias.q_seqinfo.seqstart_py == [0, 9, 30, 50, 75, 100]
    keep = ids[:, None, :, None] == ids[:, None, None, :]
    if causal:
        i, j = ij(50, 50)
        keep = keep & (j <= i)
    check(out, lse, q, k, v, keep)


def test_document_causal_window(monkeypatch):
    calls = install(monkeypatch)
    ids = torch.tensor([0] * 20 + [1] * 24)
    q, k, v = tensors(1, 2, 2, 44, 44, 32, seed=5)
    out, lse = run(q, k, v, mask_mod=da.masks.document(ids) & da.masks.causal() & da.masks.sliding_window(6))
    assert type(bias_of(calls)) is ab.BlockDiagonalCausalLocalAttentionMask
    i, j = ij(44, 44)
    check(out, lse, q, k, v, (ids[:, None] == ids[None, :]) & (j <= i) & (j >= i - 6))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_dense_attn_mask_is_tensor_bias(monkeypatch, kind):
    calls = install(monkeypatch, nan_rows=True)
    q, k, v = tensors(2, 2, 2, 20, 30, 32, seed=6)
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 1, 20, 30, generator=g) > 0.3
    keep[0, 0, 3] = False  # one row with no key
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).half()
    out, lse = run(q, k, v, attn_mask=mask)
    bias = bias_of(calls)
    assert isinstance(bias, torch.Tensor) and bias.shape == (2, 2, 20, 30) and bias.dtype == torch.float16
    check(out, lse, q, k, v, keep)
    assert torch.isneginf(lse[0, :, 3]).all() and (out[0, :, 3] == 0).all()


def test_alibi_and_prefix_lm_as_tensor_bias(monkeypatch):
    calls = install(monkeypatch)
    slopes = torch.tensor([0.5, 0.25])
    q, k, v = tensors(1, 2, 2, 24, 24, 32, seed=8)
    out, lse = run(q, k, v, mask_mod=da.masks.prefix_lm(6), score_mod=da.scores.alibi(slopes))
    assert isinstance(bias_of(calls), torch.Tensor)
    i, j = ij(24, 24)
    check(out, lse, q, k, v, (j < 6) | (j <= i),
          score_fn=lambda s, h, i, j: s + slopes.double().view(1, -1, 1, 1) * (j - i))


def test_gqa_forward_uses_bmghk_without_copies(monkeypatch):
    calls = install(monkeypatch)
    q, k, v = tensors(2, 6, 2, 16, 40, 32, seed=9, layout="bshd")
    out, lse = run(q, k, v, enable_gqa=True, layout="bshd", mask_mod=da.masks.causal(bottom_right=True))
    xq, xk, _ = calls[-1][1]
    assert xq.shape == (2, 16, 2, 3, 32) and xk.stride(3) == 0 and xk.data_ptr() == k.data_ptr()
    i, j = ij(16, 40)
    check(out, lse, q, k, v, j <= i + 24, layout="bshd")


def test_dropout_and_grad_use_autograd_api(monkeypatch):
    calls = install(monkeypatch)
    q, k, v = tensors(1, 2, 2, 16, 16, 32, dtype=torch.float32)
    run(q, k, v, dropout_p=0.2, return_lse=False)
    assert calls[-1][0] == "memory_efficient_attention" and calls[-1][2]["p"] == 0.2
    q.requires_grad_()
    out, _ = run(q, k, v, is_causal=True, return_lse=False)
    assert calls[-1][0] == "memory_efficient_attention"
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_lse_with_gradients_is_refused(monkeypatch):
    """xFormers' lse comes from a second forward pass without a gradient: a loss that uses the lse would get a
    silently wrong gradient, so such calls go elsewhere (triton_flex / reference differentiate the lse)."""
    install(monkeypatch)
    q, k, v = tensors(1, 2, 2, 16, 16, 32, dtype=torch.float32)
    spec = build_spec(q.requires_grad_(), k, v, is_causal=True, return_lse=True)
    assert [r.code for r in XformersBackend().why_not(spec, caps())] == ["lse_grad_unsupported"]
    assert XformersBackend().why_not(build_spec(q, k, v, is_causal=True), caps()) == []


def test_value_head_dim_differs(monkeypatch):
    install(monkeypatch)
    q, k, v = tensors(1, 2, 2, 16, 16, 32, dtype=torch.float32, dv=48)
    out, lse = run(q, k, v)
    check(out, lse, q, k, v)


# ----------------------------------------------------------------------------------------- decision tables
def spec_for(dtype=torch.float16, hd=64, **kw):
    base = dict(batch=2, heads_q=4, heads_kv=4, seq_q=256, seq_kv=256, head_dim=hd, head_dim_v=hd, dtype=dtype,
                device_type="cuda")
    return AttentionSpec(**{**base, **kw})


ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120",
         "gfx90a", "gfx942", "gfx950", "gfx1100"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hd", [64, 256, 320, 1024])
def test_decision_arch_dtype_head_dim(arch, dtype, hd):
    sm = int(arch[3:]) if arch.startswith("sm_") else None
    if sm is not None:  # fa2/fa3 (sm80+, half, hd <= 256) or cutlass (sm50-90, any dtype; bf16 sm80+)
        flash_ok = sm >= 80 and dtype != torch.float32 and hd <= 256
        cutlass_ok = sm <= 90 and not (dtype == torch.bfloat16 and sm < 80)
        ok = flash_ok or cutlass_ok
    else:  # ck: CDNA, half, hd <= 512
        ok = arch != "gfx1100" and dtype != torch.float32 and hd <= 512
    reasons = XformersBackend().why_not(spec_for(dtype, hd), caps(arch))
    assert (reasons == []) is ok, reasons


FEATURES = {
    "two_sided_window": dict(mask=da.masks.sliding_window(16, 16)),
    "causal_window_grad": dict(mask=(da.masks.sliding_window(16) & da.masks.causal()).bind(256, 256),
                               requires_grad=True),
    "dense_mask": dict(attn_mask=("bool", (2, 4, 256, 256))),
    "dropout": dict(dropout_p=0.1),
    "softcap": dict(score=da.scores.softcap(20.0)),
    "opaque": dict(mask=lambda b, h, q, kv: q >= kv),
    "top_left_causal_rect": dict(is_causal=True, seq_q=128),
}
# feature -> (sm_90 fp16, sm_75 fp16, sm_100 fp32, gfx942 fp16)
EXPECTED = {
    "two_sided_window": (1, 0, 0, 0),
    "causal_window_grad": (1, 0, 0, 1),
    "dense_mask": (1, 1, 0, 1),
    "dropout": (1, 1, 0, 1),
    "softcap": (0, 0, 0, 0),
    "opaque": (0, 0, 0, 0),
    "top_left_causal_rect": (1, 1, 0, 1),
}
DEVICES = [("sm_90", torch.float16), ("sm_75", torch.float16), ("sm_100", torch.float32),
           ("gfx942", torch.float16)]


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("device", range(len(DEVICES)))
def test_decision_features(feature, device):
    arch, dtype = DEVICES[device]
    reasons = XformersBackend().why_not(spec_for(dtype, **FEATURES[feature]), caps(arch))
    assert (reasons == []) is bool(EXPECTED[feature][device]), reasons
    assert all(r.code and len(r) > 20 for r in reasons)


def test_reasons_name_each_op():
    reasons = XformersBackend().why_not(spec_for(torch.float32, 64, mask=da.masks.sliding_window(4, 4)),
                                        caps("sm_90"))
    text = " | ".join(reasons)
    assert "fa3F/fa3B: dtype=float32" in text and "cutlassF/cutlassB: forward attn_bias " \
        "LocalAttentionFromBottomRightMask" in text


def test_not_installed():
    assert [r.code for r in XformersBackend().why_not(spec_for(), caps(xformers=None))] == ["not_installed"]


def test_bias_budget(monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_DENSE_MASK_BUDGET_MB", "1")
    reasons = XformersBackend().why_not(spec_for(mask=da.masks.prefix_lm(8), seq_q=4096, seq_kv=4096), caps())
    assert [r.code for r in reasons] == ["bias_too_large"]


def test_library_reasons_are_xformers_own_sentences():
    """On a GPU these come from xFormers' ops; here the same call on CPU shows they are surfaced verbatim."""
    pytest.importorskip("xformers.ops.fmha")
    reasons = library_reasons(spec_for(torch.float32, 64, device_type="cpu"), "NoneType", torch.device("cpu"))
    assert reasons and all(r.code == "xformers_reasons" for r in reasons)
    assert any("device=cpu" in r for r in reasons)


# -------------------------------------------------------------------------------------------- end to end
def test_attention_end_to_end_with_double(monkeypatch):
    calls = install(monkeypatch)
    q, k, v = tensors(1, 2, 2, 40, 40, 32, seed=12)
    ids = torch.tensor([0] * 15 + [1] * 25)
    with pretend(caps("sm_80")):
        out, lse = da.attention(q, k, v, backend="xformers", return_lse=True,
                                mask_mod=da.masks.document(ids) & da.masks.causal())
    assert type(bias_of(calls)) is ab.BlockDiagonalCausalMask
    i, j = ij(40, 40)
    check(out, lse, q, k, v, (ids[:, None] == ids[None, :]) & (j <= i))


def test_forced_xformers_raises_with_reasons():
    q, k, v = tensors(1, 2, 2, 16, 16, 64)
    with pretend(caps("gfx1100")), pytest.raises(da.UnsupportedError, match="ckF/ckB: device gfx1100"):
        da.attention(q, k, v, backend="xformers")


# ------------------------------------------------------------------------------------ property: exactness
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(sq=st.integers(1, 12), sk=st.integers(1, 12), left=st.none() | st.integers(0, 14),
                  right=st.none() | st.integers(0, 14), causal=st.sampled_from([None, "top_left", "bottom_right"]))
def test_bias_class_materialises_to_the_contract_mask(sq, sk, left, right, causal):
    """The attn_bias built for a band, materialised by xFormers itself, keeps exactly the contract's keys."""
    pytest.importorskip("xformers.ops.fmha.attn_bias")
    from dispatchattn.backends.flash import mask_plan
    from dispatchattn.backends.xformers import _band_bias, bias_kind

    parts = []
    if left is not None or right is not None:
        parts.append(da.masks.sliding_window(left if left is not None else 100, right or 0))
    if causal:
        parts.append(da.masks.causal(bottom_right=causal == "bottom_right"))
    mask = None
    for p in parts:
        mask = (p if mask is None else mask & p).bind(sq, sk)
    spec = spec_for(seq_q=sq, seq_kv=sk, mask=mask)
    kind, problem = bias_kind(spec, mask_plan(spec))
    assert problem is None
    i, j = ij(sq, sk)
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left is not None or right is not None:
        keep &= (j >= i - (left if left is not None else 100)) & (j <= i + (right or 0))
    if causal:
        keep &= j <= i + (sk - sq if causal == "bottom_right" else 0)
    if kind == "Tensor":  # built from the mask itself; nothing class-specific to check
        return
    bias = _band_bias(ab, kind, mask_plan(spec), sq, sk)
    got = torch.ones(sq, sk, dtype=torch.bool) if bias is None else torch.isfinite(bias.materialize((sq, sk)))
    assert torch.equal(got, keep), (kind, got, keep)


@pytest.mark.parametrize("mask", ["bottom_right", "document"])
def test_gradients_flow_through_the_translation(monkeypatch, mask):
    install(monkeypatch)
    ids = torch.tensor([0] * 5 + [1] * 9 + [0] * 6 + [2] * 4)
    sk = 24 if mask == "document" else 16
    q, k, v = (t.requires_grad_() for t in tensors(1, 4, 2, 24, sk, 32, dtype=torch.float32))
    mod = da.masks.document(ids) & da.masks.causal() if mask == "document" else da.masks.causal(bottom_right=True)
    spec = build_spec(q, k, v, enable_gqa=True, mask_mod=mod)
    call = AttentionCall(q, k, v, None, spec.mask, None, 32 ** -0.5, 0.0, False, True, False, "bhsd")
    with pretend(caps("sm_80")):
        out, _ = XformersBackend().run(call, spec)
    out.pow(2).sum().backward()
    i, j = ij(24, sk)
    keep = (ids[:, None] == ids[None, :]) & (j <= i) if mask == "document" else j <= i + sk - 24
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.repeat_interleave(2, 1).transpose(-1, -2) * 32 ** -0.5).masked_fill(~keep, float("-inf"))
    empty = ~keep.any(-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    ref = probs @ v64.repeat_interleave(2, 1)
    ref.pow(2).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
