"""flash backend: exact translation (recorded calls on test doubles, float64 numerics) and decision tables."""

from __future__ import annotations

import pytest
import torch
from fakes.flash_doubles import install, make_fa2, make_fa3, make_fa4
from fakes.reference import attention64
from packaging.version import Version

import dispatchattn as da
from dispatchattn.backends.base import AttentionCall
from dispatchattn.backends.flash import FlashBackend
from dispatchattn.capabilities import DeviceCaps, Libraries, pretend
from dispatchattn.spec import AttentionSpec, build_spec

V = Version


def libs(fa2="2.8.3", fa3=None, fa4=None):
    return Libraries(torch=V("2.13"), flash_attn=V(fa2) if fa2 else None,
                     flash_attn_3=V(fa3) if fa3 else None, flash_attn_4=V(fa4) if fa4 else None)


def caps(arch="sm_90", **kw):
    return DeviceCaps.synthetic(arch, libraries=libs(**kw))


def tensors(b, hq, hkv, sq, sk, d, dtype=torch.float16, layout="bhsd", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda h, s: (b, h, s, d)) if layout == "bhsd" else (lambda h, s: (b, s, h, d))
    return [torch.randn(shape(h, s), generator=g).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk))]


def run(q, k, v, device_caps, *, layout="bhsd", is_causal=False, mask_mod=None, score_mod=None, dropout_p=0.0,
        return_lse=True, enable_gqa=False):
    spec = build_spec(q, k, v, None, dropout_p, is_causal, None, enable_gqa, score_mod=score_mod,
                      mask_mod=mask_mod, layout=layout, return_lse=return_lse)
    call = AttentionCall(q, k, v, None, spec.mask, spec.score, spec.head_dim ** -0.5, dropout_p, is_causal,
                         enable_gqa, return_lse, layout)
    backend = FlashBackend()
    assert backend.why_not(spec, device_caps) == []
    with pretend(device_caps):
        return backend.run(call, spec)


def check(out, lse, q, k, v, keep, score_fn=None, layout="bhsd"):
    d = q.shape[-1]
    ref, ref_lse = attention64(q, k, v, scale=d ** -0.5, keep=keep, score_fn=score_fn, layout=layout)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    assert not torch.isnan(out).any()
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)


def ij(sq, sk):
    return torch.arange(sq).view(sq, 1), torch.arange(sk).view(1, sk)


# ---------------------------------------------------------------------------------------------- translation
@pytest.mark.parametrize("sq,sk", [(77, 77), (40, 100)])
def test_no_mask(monkeypatch, sq, sk):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    q, k, v = tensors(2, 3, 3, sq, sk, 40)
    out, lse = run(q, k, v, caps())
    name, args, kw = fa2.recorder.last
    assert name == "flash_attn_func" and not kw["causal"] and kw["window_size"] == (-1, -1)
    check(out, lse, q, k, v, None)


def test_top_left_causal_square_is_flash_causal(monkeypatch):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    q, k, v = tensors(1, 2, 2, 77, 77, 64, seed=1)
    out, lse = run(q, k, v, caps(), is_causal=True)
    assert fa2.recorder.last[2]["causal"] is True
    i, j = ij(77, 77)
    check(out, lse, q, k, v, j <= i)


@pytest.mark.parametrize("mask", [None, da.masks.causal()])
def test_top_left_causal_rectangular(monkeypatch, mask):
    """Sq < Sk: not expressible (refused); Sq > Sk: window (-1, Sq-Sk), which FA2 clamps (refused) and FA3 runs."""
    install(monkeypatch, fa2=make_fa2())
    kw = dict(is_causal=mask is None, mask_mod=mask)
    q, k, v = tensors(1, 2, 2, 30, 50, 64)
    spec = build_spec(q, k, v, None, 0.0, kw["is_causal"], mask_mod=mask)
    reasons = FlashBackend().why_not(spec, caps())
    assert [r.code for r in reasons] == ["mask_alignment"] and "bottom-right" in reasons[0]
    q, k, v = tensors(1, 2, 2, 100, 50, 64, seed=2)
    spec = build_spec(q, k, v, None, 0.0, kw["is_causal"], mask_mod=mask)
    assert "window_clamped" in [r.code for r in FlashBackend().why_not(spec, caps("sm_80"))]
    fa3 = make_fa3()
    install(monkeypatch, fa3=fa3)
    out, lse = run(q, k, v, caps(fa2=None, fa3="3.0.0"), **kw)
    assert fa3.recorder.last[2]["window_size"] == (-1, 50)
    i, j = ij(100, 50)
    check(out, lse, q, k, v, j <= i)


@pytest.mark.parametrize("sq,sk", [(40, 100), (100, 40)])
def test_bottom_right_causal_and_empty_rows(monkeypatch, sq, sk):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    q, k, v = tensors(2, 2, 2, sq, sk, 32, seed=3)
    out, lse = run(q, k, v, caps(), mask_mod=da.masks.causal(bottom_right=True))
    assert fa2.recorder.last[2]["causal"] is True
    i, j = ij(sq, sk)
    check(out, lse, q, k, v, j <= i + sk - sq)
    if sq > sk:  # rows with no key: zeros and -inf, never +inf or NaN
        assert torch.isneginf(lse[:, :, : sq - sk]).all() and (out[:, :, : sq - sk] == 0).all()


@pytest.mark.parametrize("left,right,causal,window", [
    (16, 0, True, (16, 0)), (8, 4, False, (8, 4)), (5, 0, False, (5, 0)), (200, 3, False, (-1, 3)),
])
def test_sliding_window(monkeypatch, left, right, causal, window):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    mask = da.masks.sliding_window(left, right) & da.masks.causal() if causal else da.masks.sliding_window(left, right)
    q, k, v = tensors(1, 2, 2, 77, 77, 48, layout="bshd", seed=4)
    out, lse = run(q, k, v, caps(), mask_mod=mask, layout="bshd")
    kw = fa2.recorder.last[2]
    assert kw["window_size"] == window and not kw["causal"]
    i, j = ij(77, 77)
    keep = (j >= i - left) & (j <= i + right) & ((j <= i) if causal else True)
    check(out, lse, q, k, v, keep, layout="bshd")


def test_window_needs_2_3(monkeypatch):
    q, k, v = tensors(1, 2, 2, 16, 16, 32)
    spec = build_spec(q, k, v, mask_mod=da.masks.sliding_window(4))
    reasons = FlashBackend().why_not(spec, caps(fa2="2.2.5"))
    assert [r.code for r in reasons] == ["window_too_old"] and ">= 2.3.0" in reasons[0]


def test_window_rectangular_bottom_right_translation(monkeypatch):
    fa3 = make_fa3()
    install(monkeypatch, fa3=fa3)
    q, k, v = tensors(1, 2, 2, 30, 70, 64, seed=5)
    mask = da.masks.sliding_window(20, 50)
    out, lse = run(q, k, v, caps(fa2=None, fa3="3.0.0"), mask_mod=mask)
    assert fa3.recorder.last[2]["window_size"] == (60, 10)
    i, j = ij(30, 70)
    check(out, lse, q, k, v, (j >= i - 20) & (j <= i + 50))


def test_softcap(monkeypatch):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    q, k, v = tensors(1, 4, 2, 33, 33, 64, seed=6)
    q = q * 4
    out, lse = run(q, k, v, caps(), is_causal=True, score_mod=da.scores.softcap(2.5), enable_gqa=True)
    kw = fa2.recorder.last[2]
    assert kw["softcap"] == 2.5 and kw["causal"]
    i, j = ij(33, 33)
    check(out, lse, q, k, v, j <= i, score_fn=lambda s, h, i, j: 2.5 * torch.tanh(s / 2.5))


@pytest.mark.parametrize("sq,sk,mask", [(50, 50, None), (30, 64, da.masks.causal(bottom_right=True))])
def test_alibi_under_causal(monkeypatch, sq, sk, mask):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    q, k, v = tensors(2, 4, 4, sq, sk, 32, seed=7)
    out, lse = run(q, k, v, caps(), is_causal=mask is None, mask_mod=mask, score_mod=da.scores.alibi(slopes))
    kw = fa2.recorder.last[2]
    assert kw["causal"] and torch.equal(kw["alibi_slopes"], slopes) and kw["alibi_slopes"].dtype == torch.float32
    i, j = ij(sq, sk)
    check(out, lse, q, k, v, j <= i + sk - sq,
          score_fn=lambda s, h, i, j: s + slopes.double().view(1, -1, 1, 1) * (j - i))


def test_alibi_without_causal_is_refused():
    q, k, v = tensors(1, 2, 2, 16, 16, 32)
    spec = build_spec(q, k, v, score_mod=da.scores.alibi(torch.tensor([0.5, 0.25])))
    reasons = FlashBackend().why_not(spec, caps())
    assert [r.code for r in reasons] == ["alibi_not_causal"] and "signed" in reasons[0]


def _doc_ids():
    return torch.tensor([0] * 7 + [1] * 20 + [2] * 3 + [3] * 30)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_document_varlen(monkeypatch, causal, batched):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    ids = _doc_ids()
    if batched:
        ids = torch.stack([ids, torch.tensor([5] * 40 + [6] * 20)])
    mask = da.masks.document(ids) & da.masks.causal() if causal else da.masks.document(ids)
    q, k, v = tensors(2, 4, 2, 60, 60, 40, seed=8)
    out, lse = run(q, k, v, caps(), mask_mod=mask, enable_gqa=True)
    name, args, kw = fa2.recorder.last
    assert name == "flash_attn_varlen_func" and kw["causal"] is causal
    cu = args[3]
    assert cu.dtype == torch.int32
    expected = [0, 7, 27, 30, 60, 67, 87, 90, 120] if not batched else [0, 7, 27, 30, 60, 100, 120]
    assert cu.tolist() == expected and args[5] == max(b - a for a, b in zip(expected, expected[1:]))
    ids2 = ids.reshape(-1, 60).expand(2, 60)
    keep = (ids2[:, None, :, None] == ids2[:, None, None, :])
    if causal:
        i, j = ij(60, 60)
        keep = keep & (j <= i)
    check(out, lse, q, k, v, keep)


def test_document_non_contiguous(monkeypatch):
    """Runs of one id split apart: gathered into one run (exact for order-only masks), refused with a clear
    error when the mask depends on distances."""
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    ids = torch.tensor([0] * 10 + [1] * 15 + [0] * 12 + [2] * 8)
    q, k, v = tensors(1, 2, 2, 45, 45, 32, seed=9)
    out, lse = run(q, k, v, caps(), mask_mod=da.masks.document(ids) & da.masks.causal())
    assert fa2.recorder.last[1][3].tolist() == [0, 22, 37, 45]
    i, j = ij(45, 45)
    check(out, lse, q, k, v, (ids[:, None] == ids[None, :]) & (j <= i))
    with pytest.raises(ValueError, match="contiguous run"):
        run(q, k, v, caps(), mask_mod=da.masks.document(ids) & da.masks.sliding_window(4))


def test_layout_views_are_passed_without_copies(monkeypatch):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    for layout in ("bhsd", "bshd"):
        q, k, v = tensors(2, 2, 2, 20, 20, 32, layout=layout)
        out, _ = run(q, k, v, caps(), layout=layout, return_lse=False)
        args, kw = fa2.recorder.last[1:]
        assert all(a.data_ptr() == t.data_ptr() for a, t in zip(args, (q, k, v)))
        assert args[0].shape == (2, 20, 2, 32) and out.shape == q.shape and not kw["return_attn_probs"]


def test_dropout_goes_to_fa2_not_fa3(monkeypatch):
    fa2, fa3 = make_fa2(), make_fa3()
    install(monkeypatch, fa2=fa2, fa3=fa3)
    q, k, v = tensors(1, 2, 2, 16, 16, 64)
    run(q, k, v, caps(fa3="3.0.0"), dropout_p=0.1, return_lse=False)
    assert fa2.recorder.last[2]["dropout_p"] == 0.1 and not fa3.recorder.calls
    run(q, k, v, caps(fa3="3.0.0"), return_lse=False)
    assert fa3.recorder.calls, "without dropout FA3 is preferred on sm_90"
    spec = build_spec(q, k, v, None, 0.1)
    reasons = FlashBackend().why_not(spec, caps(fa2=None, fa3="3.0.0"))
    assert [r.code for r in reasons] == ["no_dropout"]


def test_fa4_window_uses_none_for_unbounded(monkeypatch):
    fa4 = make_fa4()
    install(monkeypatch, fa4=fa4)
    q, k, v = tensors(1, 2, 2, 64, 64, 64, seed=10)
    out, lse = run(q, k, v, caps("sm_100", fa2=None, fa4="4.0.0b8"), mask_mod=da.masks.sliding_window(10, 3))
    assert fa4.recorder.last[2]["window_size"] == (10, 3) and fa4.recorder.last[2]["return_lse"]
    i, j = ij(64, 64)
    check(out, lse, q, k, v, (j >= i - 10) & (j <= i + 3))


def test_deterministic_backward(monkeypatch):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    q, k, v = tensors(1, 2, 2, 16, 16, 64)
    q.requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        spec = build_spec(q, k, v)
        assert [r.code for r in FlashBackend().why_not(spec, caps(fa2="2.4.0"))] == ["deterministic_too_old"]
        run(q, k, v, caps(), return_lse=False)
        assert fa2.recorder.last[2]["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------------------- decision tables
CUDA_FA2 = {"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"}
ROCM_CK = {"gfx90a", "gfx942", "gfx950"}
ALL_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120",
             "gfx90a", "gfx942", "gfx950", "gfx1100"]


def spec_for(dtype=torch.float16, hd=128, **kw):
    base = dict(batch=2, heads_q=8, heads_kv=8, seq_q=512, seq_kv=512, head_dim=hd, head_dim_v=hd, dtype=dtype,
                device_type="cuda")
    return AttentionSpec(**{**base, **kw})


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hd", [64, 100, 256, 320])
def test_decision_arch_dtype_head_dim(arch, dtype, hd):
    ok = (arch in CUDA_FA2 or arch in ROCM_CK) and dtype != torch.float32 and hd <= 256
    reasons = FlashBackend().why_not(spec_for(dtype, hd), caps(arch))
    assert (reasons == []) is ok, reasons
    if hd == 320:
        assert "head_dim 320 exceeds 256, the flash-attn 2.8.3 limit" in reasons
    if arch == "sm_75":
        assert "flash-attn 2.8.3 FA2 needs sm_80+, device is sm_75 (T4)" in reasons


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decision_rocm_triton(monkeypatch, arch, dtype):
    monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")
    ok = arch.startswith("gfx") or (arch in CUDA_FA2 and dtype != torch.float32)  # the variable is ROCm-only
    assert (FlashBackend().why_not(spec_for(dtype, 64), caps(arch)) == []) is ok
    softcap = spec_for(score=da.scores.softcap(30.0), is_causal=True)
    if arch.startswith("gfx"):
        assert [r.code for r in FlashBackend().why_not(softcap, caps(arch))] == ["no_softcap"]


# (feature spec, arch, libraries) -> routes to flash?
def _alibi():
    return da.scores.alibi(torch.ones(8))


FEATURES = {
    "causal": dict(is_causal=True),
    "dropout": dict(dropout_p=0.1),
    "window": dict(mask=da.masks.sliding_window(64) & da.masks.causal()),
    "softcap": dict(score=da.scores.softcap(30.0)),
    "alibi_causal": dict(score=_alibi(), is_causal=True),
    "alibi_noncausal": dict(score=_alibi()),
    "document": dict(mask=da.masks.document(torch.zeros(512, dtype=torch.long))),
    "prefix_lm": dict(mask=da.masks.prefix_lm(16)),
    "opaque_lambda": dict(mask=lambda b, h, q, kv: q >= kv),
    "dense_mask": dict(attn_mask=("bool", (2, 8, 512, 512))),
    "grad": dict(requires_grad=True),
    "lse": dict(return_lse=True),
}
# feature -> (sm_80 FA2 2.8.3, sm_90 FA3 only, sm_100 FA4 only, gfx942 CK 2.8.3, sm_86 FA2 2.5.0)
EXPECTED = {
    "causal": (1, 1, 1, 1, 1),
    "dropout": (1, 0, 0, 1, 1),
    "window": (1, 1, 1, 1, 1),
    "softcap": (1, 1, 1, 0, 0),
    "alibi_causal": (1, 0, 0, 1, 1),
    "alibi_noncausal": (0, 0, 0, 0, 0),
    "document": (1, 1, 1, 1, 1),
    "prefix_lm": (0, 0, 0, 0, 0),
    "opaque_lambda": (0, 0, 0, 0, 0),
    "dense_mask": (0, 0, 0, 0, 0),
    "grad": (1, 1, 1, 1, 1),
    "lse": (1, 1, 1, 1, 1),
}
DEVICES = [("sm_80", dict()), ("sm_90", dict(fa2=None, fa3="3.0.0")), ("sm_100", dict(fa2=None, fa4="4.0.0")),
           ("gfx942", dict()), ("sm_86", dict(fa2="2.5.0"))]


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("device", range(len(DEVICES)))
def test_decision_features(feature, device):
    arch, lib = DEVICES[device]
    reasons = FlashBackend().why_not(spec_for(**FEATURES[feature]), caps(arch, **lib))
    assert (reasons == []) is bool(EXPECTED[feature][device]), reasons
    assert all(isinstance(r, str) and r.code and len(r) > 20 for r in reasons)


NEVER = {"alibi_noncausal", "prefix_lm", "opaque_lambda", "dense_mask"}


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_decision_features_every_arch(feature, arch):
    """FA2 2.8.3 everywhere, plus FA3 on sm_90 and FA4 on sm_100 (as a typical install would have)."""
    lib = dict(fa3="3.0.0" if arch == "sm_90" else None, fa4="4.0.0" if arch == "sm_100" else None)
    ok = (arch in CUDA_FA2 or arch in ROCM_CK) and feature not in NEVER
    if feature == "softcap" and arch in ROCM_CK:  # CK ignores softcap
        ok = False
    reasons = FlashBackend().why_not(spec_for(**FEATURES[feature]), caps(arch, **lib))
    assert (reasons == []) is ok, reasons


def test_opaque_and_dense_sentences():
    reasons = FlashBackend().why_not(spec_for(**FEATURES["opaque_lambda"]), caps())
    assert reasons == ["an arbitrary score_mod/mask_mod cannot be expressed as flash-attn arguments "
                       "(use da.masks / da.scores objects)"]


@pytest.mark.parametrize("arch,hd,dropout,grad,ok", [
    ("sm_86", 256, 0.1, True, False), ("sm_86", 256, 0.0, True, True), ("sm_89", 224, 0.1, True, False),
    ("sm_86", 256, 0.1, False, True), ("sm_80", 256, 0.1, True, True), ("sm_120", 256, 0.1, True, False),
    ("sm_86", 192, 0.1, True, True),
])
def test_consumer_gpu_backward_head_dim(arch, hd, dropout, grad, ok):
    reasons = FlashBackend().why_not(spec_for(hd=hd, dropout_p=dropout, requires_grad=grad), caps(arch))
    assert (reasons == []) is ok, reasons


def test_fa4_sm100_head_dim_and_fallback_to_fa2():
    big = spec_for(hd=256)
    assert [r.code for r in FlashBackend().why_not(big, caps("sm_100", fa2=None, fa4="4.0.0"))] == [
        "head_dim_too_large"]
    impl, _, _ = FlashBackend().choose(big, caps("sm_100", fa4="4.0.0"))
    assert impl.key == "fa2"


def test_lse_with_gradients_needs_the_fa4_ops():
    """FA2/FA3's autograd Functions give the lse no gradient: a loss using it would be silently wrong."""
    training = spec_for(return_lse=True, requires_grad=True)
    assert "lse_grad_unsupported" in [r.code for r in FlashBackend().why_not(training, caps("sm_90", fa3="3.0.0"))]
    assert FlashBackend().why_not(spec_for(return_lse=True), caps("sm_90")) == []
    assert FlashBackend().why_not(spec_for(requires_grad=True), caps("sm_90")) == []
    impl, _, _ = FlashBackend().choose(training, caps("sm_100", fa4="4.0.0"))  # its ops add the lse term
    assert impl.key == "fa4"


def test_not_installed_and_cpu():
    assert [r.code for r in FlashBackend().why_not(spec_for(), caps(fa2=None))] == ["not_installed"]
    assert [r.code for r in FlashBackend().why_not(spec_for(device_type="cpu"), caps("cpu"))] == [
        "device_unsupported"]
    assert [r.code for r in FlashBackend().why_not(spec_for(), caps(fa2="2.0.9"))] == ["version_too_old"]


# -------------------------------------------------------------------------------------------- end to end
def test_attention_end_to_end_with_double(monkeypatch):
    fa2 = make_fa2()
    install(monkeypatch, fa2=fa2)
    q, k, v = tensors(2, 4, 2, 50, 50, 64, seed=11)
    with pretend(caps("sm_80")):
        out, lse = da.attention(q, k, v, enable_gqa=True, backend="flash", return_lse=True,
                                mask_mod=da.masks.sliding_window(7) & da.masks.causal())
        decision = da.explain(q, k, v, enable_gqa=True, mask_mod=da.masks.sliding_window(7) & da.masks.causal())
    assert decision.backend == "flash" and fa2.recorder.last[2]["window_size"] == (7, 0)
    i, j = ij(50, 50)
    check(out, lse, q, k, v, (j <= i) & (j >= i - 7))


def test_forced_flash_raises_with_reasons(monkeypatch):
    install(monkeypatch, fa2=make_fa2())
    q, k, v = tensors(1, 2, 2, 16, 16, 64)
    with pretend(caps("sm_75")), pytest.raises(da.UnsupportedError, match="needs sm_80\\+, device is sm_75"):
        da.attention(q, k, v, backend="flash")


# ------------------------------------------------------------------------------------ property: exactness
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(sq=st.integers(1, 12), sk=st.integers(1, 12), left=st.none() | st.integers(0, 14),
                  right=st.none() | st.integers(0, 14), causal=st.sampled_from([None, "top_left", "bottom_right"]),
                  fa3=st.booleans())
def test_band_translation_is_exact_or_refused(sq, sk, left, right, causal, fa3):
    """Any window/causal combination either runs and equals the contract's mask, or is refused for its
    alignment (never silently different)."""
    parts = []
    if left is not None or right is not None:
        parts.append(da.masks.sliding_window(left if left is not None else 100, right or 0))
    if causal:
        parts.append(da.masks.causal(bottom_right=causal == "bottom_right"))
    mask = None
    for p in parts:
        mask = p if mask is None else mask & p
    q, k, v = tensors(1, 2, 2, sq, sk, 16, seed=sq * 31 + sk)
    spec = build_spec(q, k, v, mask_mod=mask, return_lse=True)
    lib = dict(fa2=None, fa3="3.0.0") if fa3 else dict()
    reasons = FlashBackend().why_not(spec, caps(**lib))
    if reasons:
        assert {r.code for r in reasons} <= {"mask_alignment", "window_clamped"}, reasons
        return
    with pytest.MonkeyPatch.context() as mp:
        install(mp, fa2=make_fa2(), fa3=make_fa3())
        out, lse = run(q, k, v, caps(**lib), mask_mod=mask)
    i, j = ij(sq, sk)
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left is not None or right is not None:
        keep &= (j >= i - (left if left is not None else 100)) & (j <= i + (right or 0))
    if causal:
        keep &= j <= i + (sk - sq if causal == "bottom_right" else 0)
    check(out, lse, q, k, v, keep)


@pytest.mark.parametrize("mask", ["bottom_right", "document"])
def test_gradients_flow_through_the_translation(monkeypatch, mask):
    """The doubles are differentiable, so this checks our packing/unpacking and fix-ups keep autograd exact."""
    install(monkeypatch, fa2=make_fa2())
    ids = torch.tensor([0] * 5 + [1] * 9 + [0] * 6 + [2] * 4)
    q, k, v = (t.float().requires_grad_() for t in tensors(1, 2, 2, 24, 24 if mask == "document" else 16, 32))
    mod = da.masks.document(ids) & da.masks.causal() if mask == "document" else da.masks.causal(bottom_right=True)
    spec = build_spec(q, k, v, mask_mod=mod)
    call = AttentionCall(q, k, v, None, spec.mask, None, 32 ** -0.5, 0.0, False, False, False, "bhsd")
    fp32_caps = DeviceCaps.synthetic("gfx942", libraries=libs())
    with pretend(fp32_caps):
        monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")  # the build that takes fp32
        out, _ = FlashBackend().run(call, spec)
    out.pow(2).sum().backward()
    i, j = ij(24, k.shape[2])
    keep = (ids[:, None] == ids[None, :]) & (j <= i) if mask == "document" else j <= i + k.shape[2] - 24
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2) * 32 ** -0.5).masked_fill(~keep, float("-inf"))
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v64
    ref.pow(2).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- the warm call's direct path
DIRECT_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "window": dict(mask_mod=da.masks.sliding_window(7) & da.masks.causal()),
    "softcap_gqa": dict(score_mod=da.scores.softcap(4.0), enable_gqa=True),
    "scale_bshd": dict(scale=0.3, layout="bshd"),
}


@pytest.mark.parametrize("impl", ["fa2", "fa3"])
@pytest.mark.parametrize("case", sorted(DIRECT_CASES))
def test_inference_calls_reach_the_library_exactly_as_run_does(monkeypatch, impl, case):
    """``da.attention`` runs an inference call through ``FlashBackend.direct`` (arguments translated once per
    signature): the library sees the same call as through ``run``, and the result is right."""
    double = make_fa2() if impl == "fa2" else make_fa3()
    install(monkeypatch, **{impl: double})
    kwargs = dict(DIRECT_CASES[case])
    layout = kwargs.get("layout", "bhsd")
    q, k, v = tensors(2, 4, 2 if kwargs.get("enable_gqa") else 4, 33, 33, 64, layout=layout, seed=5)
    device_caps = caps("sm_90", fa2="2.8.3" if impl == "fa2" else None, fa3="3.0.0" if impl == "fa3" else None)
    spec = build_spec(q, k, v, None, 0.0, kwargs.get("is_causal", False), kwargs.get("scale"),
                      kwargs.get("enable_gqa", False), score_mod=kwargs.get("score_mod"),
                      mask_mod=kwargs.get("mask_mod"), layout=layout)
    assert FlashBackend().direct(spec, device_caps) is not None
    with pretend(device_caps):
        out = da.attention(q, k, v, backend="flash", **kwargs)
        through_direct = double.recorder.last
        call = AttentionCall(q, k, v, None, spec.mask, spec.score, kwargs.get("scale", 64 ** -0.5), 0.0,
                             kwargs.get("is_causal", False), kwargs.get("enable_gqa", False), False, layout)
        expected, _ = FlashBackend().run(call, spec)
        through_run = double.recorder.last
    assert through_direct[0] == through_run[0] == "flash_attn_func"
    assert through_direct[2] == through_run[2]  # the same keywords, values included
    assert all(torch.equal(a, b) for a, b in zip(through_direct[1], through_run[1]))
    assert torch.equal(out, expected)


def test_calls_that_need_per_call_work_have_no_direct_path():
    sm90 = caps("sm_90", fa2="2.8.3", fa4="4.0.0b1")
    q, k, v = tensors(1, 2, 2, 16, 16, 64)
    cases = {
        "lse": dict(return_lse=True),
        "alibi": dict(score_mod=da.scores.alibi(torch.tensor([0.5, 0.25])), is_causal=True),
        "document": dict(mask_mod=da.masks.document(torch.arange(16) // 8)),
    }
    for name, kwargs in cases.items():
        spec = build_spec(q, k, v, **kwargs)
        assert FlashBackend().why_not(spec, sm90) == [], name  # flash runs it, through run
        assert FlashBackend().direct(spec, sm90) is None, name
    long_q = tensors(1, 2, 2, 16, 8, 64)[0]  # 16 queries, 8 keys: bottom-right causal leaves rows 0..7 empty
    spec = build_spec(long_q, k[:, :, :8], v[:, :, :8], mask_mod=da.masks.causal(bottom_right=True))
    assert FlashBackend().why_not(spec, sm90) == [] and FlashBackend().direct(spec, sm90) is None
    grad = [t.clone().requires_grad_(True) for t in (q, k, v)]
    spec = build_spec(*grad, is_causal=True)
    assert FlashBackend().why_not(spec, sm90) == [] and FlashBackend().direct(spec, sm90) is None
    fa4_only = caps("sm_100", fa2=None, fa4="4.0.0b1")  # FA4 runs as an op inside graphs: never direct
    spec = build_spec(q, k, v, is_causal=True)
    assert FlashBackend().why_not(spec, fa4_only) == [] and FlashBackend().direct(spec, fa4_only) is None
