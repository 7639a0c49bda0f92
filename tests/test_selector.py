"""Selection: decision tables over synthetic devices, policy (backend=, env, use_backends), memoisation,
the Decision record and UnsupportedError."""

from __future__ import annotations

import json

import pytest
import torch
from packaging.version import Version

import dispatchattn as da
from dispatchattn import api
from dispatchattn.backends import BACKEND_NAMES
from dispatchattn.capabilities import DeviceCaps, Libraries, pretend

LIBS = Libraries(torch=Version("2.13.0"), triton=Version("3.9.0"), flash_attn=Version("2.8.3"),
                 xformers=Version("0.0.35"))
NO_LIBS = Libraries(torch=Version("2.13.0"), triton=Version("3.9.0"))

PROBLEMS = {
    "causal": lambda: {"is_causal": True},
    "window": lambda: {"mask_mod": da.masks.sliding_window(64) & da.masks.causal()},
    "lambda_score": lambda: {"score_mod": lambda s, b, h, q, kv: s * 0.5},
    "softcap_causal": lambda: {"score_mod": da.scores.softcap(30.0), "is_causal": True},
    "documents": lambda: {"mask_mod": da.masks.document(torch.arange(256) // 64)},
    "alibi_noncausal": lambda: {"score_mod": da.scores.alibi(torch.rand(8))},
}

# arch -> problem -> backend chosen for bf16 (2, 8, 256, 64) with flash-attn 2.8.3 + xformers 0.0.35 installed.
EXPECTED = {
    "sm_75": {"causal": "sdpa", "window": "triton_flex", "lambda_score": "triton_flex",
              "softcap_causal": "triton_flex", "documents": "triton_flex", "alibi_noncausal": "triton_flex"},
    "sm_80": {"causal": "flash", "window": "flash", "lambda_score": "triton_flex", "softcap_causal": "flash",
              "documents": "flash", "alibi_noncausal": "xformers"},
    "sm_89": {"causal": "flash", "window": "flash", "lambda_score": "triton_flex", "softcap_causal": "flash",
              "documents": "flash", "alibi_noncausal": "xformers"},
    "sm_90": {"causal": "flash", "window": "flash", "lambda_score": "triton_flex", "softcap_causal": "flash",
              "documents": "flash", "alibi_noncausal": "xformers"},
    # xFormers 0.0.35's cutlass op stops at sm_90, so a tensor bias on sm_100 goes to the flex kernel.
    "sm_100": {"causal": "flash", "window": "flash", "lambda_score": "triton_flex", "softcap_causal": "flash",
               "documents": "flash", "alibi_noncausal": "triton_flex"},
    "gfx90a": {"causal": "flash", "window": "flash", "lambda_score": "triton_flex",
               "softcap_causal": "triton_flex", "documents": "flash", "alibi_noncausal": "xformers"},
    "gfx942": {"causal": "flash", "window": "flash", "lambda_score": "triton_flex",
               "softcap_causal": "triton_flex", "documents": "flash", "alibi_noncausal": "xformers"},
    "cpu": {"causal": "sdpa", "window": "sdpa", "lambda_score": "reference", "softcap_causal": "reference",
            "documents": "sdpa", "alibi_noncausal": "sdpa"},
}


def _bf16():
    return torch.randn(2, 8, 256, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_decision_table(arch, problem):
    q = _bf16()
    with pretend(DeviceCaps.synthetic(arch, libraries=LIBS)):
        decision = da.explain(q, q, q, **PROBLEMS[problem]())
    assert decision.backend == EXPECTED[arch][problem], str(decision)
    assert set(decision.reasons) == set(BACKEND_NAMES)
    assert decision.reasons[decision.backend] == [] and decision.eligible[0] == decision.backend
    for name, reasons in decision.reasons.items():
        if name in decision.eligible:  # could run: no rejection, and a sentence saying why it lost
            assert reasons == [] and (name == decision.backend or "comes first" in decision.lost[name]), name
        else:
            assert reasons and all(r.code and len(r) > 10 for r in reasons), (name, reasons)


@pytest.mark.parametrize("arch", ["sm_90", "gfx942"])
def test_without_vendor_libraries_gpus_fall_back_to_sdpa_and_flex(arch):
    q = _bf16()
    with pretend(DeviceCaps.synthetic(arch, libraries=NO_LIBS)):
        assert da.explain(q, q, q, is_causal=True).backend == "sdpa"
        window = da.explain(q, q, q, mask_mod=da.masks.sliding_window(32) & da.masks.causal())
    assert window.backend == "triton_flex"
    assert "not installed" in " ".join(window.reasons["flash"])


def test_gpu_masked_training_prefers_the_faster_measured_backward():
    """H200 (docs/performance.md): torch_flex's backward beat triton_flex's on every masked case; inference keeps
    triton_flex first."""
    q = _bf16().requires_grad_()
    with pretend(DeviceCaps.synthetic("sm_90", libraries=NO_LIBS)):
        training = da.explain(q, q, q, mask_mod=da.masks.sliding_window(32) & da.masks.causal())
        with torch.no_grad():
            inference = da.explain(q, q, q, mask_mod=da.masks.sliding_window(32) & da.masks.causal())
    assert training.backend == "torch_flex" and "backward measured" in training.rationale
    assert training.reasons["triton_flex"] == [] and "torch_flex comes first" in training.lost["triton_flex"]
    assert inference.backend == "triton_flex"


def test_gpu_decoding_with_a_bias_prefers_sdpa():
    """H200: decoding with ALiBi, SDPA with the bias materialised 0.142 ms vs the triton_flex decoding kernel's
    0.307 ms."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(8, 32, 1, 128, generator=gen).bfloat16()
    k = torch.randn(8, 8, 4096, 128, generator=gen).bfloat16()
    with pretend(DeviceCaps.synthetic("sm_90", libraries=NO_LIBS)):
        decision = da.explain(q, k, k, score_mod=da.scores.alibi(torch.rand(32, generator=gen)), enable_gqa=True)
        prefill = da.explain(k[:, :, :512], k, k, score_mod=da.scores.alibi(torch.rand(8, generator=gen)))
    assert decision.backend == "sdpa" and "decoding" in decision.rationale
    assert prefill.backend == "triton_flex"


def test_cpu_large_masked_inference_prefers_compiled_flex_and_says_why():
    q = torch.randn(1, 2, 2048, 64)
    decision = da.explain(q, q, q, mask_mod=da.masks.sliding_window(256) & da.masks.causal())
    assert decision.backend == "torch_flex"
    assert "compile" in decision.rationale and "several times faster" in decision.rationale
    small = da.explain(q[:, :, :256], q[:, :, :256], q[:, :, :256], mask_mod=da.masks.sliding_window(16))
    assert small.backend == "sdpa" and "dense mask" in small.rationale


def test_cpu_plain_causal_mask_stays_on_sdpa_at_any_length():
    """SDPA takes a top-left causal mask as is_causal: ~3x faster on CPU than compiled FlexAttention
    (bench/results/cpu-masks.json), so only masks SDPA would need densely go to torch_flex."""
    q = torch.randn(1, 2, 4096, 64)
    decision = da.explain(q, q, q, mask_mod=da.masks.causal())
    assert decision.backend == "sdpa" and "is_causal" in decision.rationale
    assert da.explain(q, q, q, mask_mod=da.masks.document(torch.arange(4096) // 512)).backend == "torch_flex"


def test_cpu_training_with_mods_never_routes_to_torch_flex():
    q = torch.randn(1, 2, 2048, 64, requires_grad=True)
    decision = da.explain(q, q, q, score_mod=da.scores.softcap(20.0))
    assert decision.backend != "torch_flex"
    assert any(r.code == "no_backward" for r in decision.reasons["torch_flex"])


def test_forced_backend_that_cannot_run_raises_with_every_reason():
    q = torch.randn(1, 2, 16, 32)
    with pytest.raises(da.UnsupportedError) as info:
        da.attention(q, q, q, score_mod=da.scores.softcap(5.0), backend="sdpa")
    message = str(info.value)
    assert "forced backend" in message and "not an additive bias" in message
    for name in BACKEND_NAMES:
        assert f"  {name}:" in message
    assert info.value.decision is not None


def test_allow_list_from_env_context_and_argument(monkeypatch):
    q = torch.randn(1, 2, 16, 32)
    monkeypatch.setenv("DISPATCHATTN_BACKEND", "reference,sdpa")
    decision = da.explain(q, q, q)
    assert decision.backend == "reference" and decision.decided_by == "user"
    assert "DISPATCHATTN_BACKEND" in decision.reasons["torch_flex"][0]
    with da.use_backends("sdpa"):
        assert da.explain(q, q, q).backend == "sdpa"
        assert da.explain(q, q, q, backend="reference").backend == "reference"
    monkeypatch.setenv("DISPATCHATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DISPATCHATTN_BACKEND.*'nonsense'"):
        da.explain(q, q, q)


def test_nothing_allowed_can_run():
    q = torch.randn(1, 2, 16, 32)
    with da.use_backends("flash", "xformers"), pytest.raises(da.UnsupportedError, match="no allowed backend"):
        da.attention(q, q, q)


def test_warm_call_does_not_reselect(monkeypatch):
    q = torch.randn(1, 2, 16, 32)
    da.attention(q, q, q, is_causal=True)
    calls = []
    decide = api.decide
    monkeypatch.setattr(api, "decide", lambda *a, **k: calls.append(a) or decide(*a, **k))
    for _ in range(3):
        da.attention(q, q, q, is_causal=True)
    assert calls == []
    da.attention(q[:, :, :8], q[:, :, :8], q[:, :, :8], is_causal=True)  # new shape: decided once
    assert len(calls) == 1


def _reference(q, k, v, is_causal):
    """float64 softmax(q k^T / sqrt(d)) v, top-left causal when asked."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


def test_warm_path_alternating_signatures_give_each_its_own_answer():
    gen = torch.Generator().manual_seed(1)
    small = [torch.randn(1, 2, 9, 16, generator=gen) for _ in range(3)]
    large = [torch.randn(2, 2, 33, 16, generator=gen) for _ in range(3)]
    for _ in range(3):  # each call evicts the other from the one-entry fast check
        for qkv, causal in ((small, True), (large, False), (small, False), (large, True)):
            out = da.attention(*qkv, is_causal=causal)
            torch.testing.assert_close(out.double(), _reference(*qkv, causal), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("bad, argument", [
    ({"key": "float64"}, "key"),
    ({"value": "short"}, "value"),
    ({"value": "meta"}, "value"),
    ({"scale": torch.tensor([1.0, 2.0])}, "scale"),
    ({"dropout_p": 1.5}, "dropout_p"),
])
def test_warm_path_still_validates_every_call(bad, argument):
    q, k, v = (torch.randn(1, 2, 16, 32) for _ in range(3))
    for _ in range(2):
        da.attention(q, k, v, scale=0.25)  # warm: this signature is memoised and is the latest
    kwargs = {"key": k, "value": v, "scale": 0.25}
    if bad.get("key") == "float64":
        kwargs["key"] = k.double()
    elif bad.get("value") == "short":
        kwargs["value"] = v[:, :, :8]
    elif bad.get("value") == "meta":
        kwargs["value"] = v.to("meta")
    else:
        kwargs.update(bad)
    with pytest.raises((TypeError, ValueError), match=argument):
        da.attention(q, **kwargs)


def test_warm_path_follows_policy_changes(monkeypatch, caplog):
    q = torch.randn(1, 2, 16, 32)
    monkeypatch.setenv("DISPATCHATTN_EXPLAIN", "2")
    ran = []
    for setting in ("", "reference", ""):
        monkeypatch.setenv("DISPATCHATTN_BACKEND", setting)
        caplog.clear()
        with caplog.at_level("INFO", logger="dispatchattn"):
            da.attention(q, q, q, is_causal=True)
        ran.append(caplog.records[-1].getMessage().split()[1])
    with da.use_backends("reference"), caplog.at_level("INFO", logger="dispatchattn"):
        da.attention(q, q, q, is_causal=True)
    ran.append(caplog.records[-1].getMessage().split()[1])
    assert ran == ["sdpa", "reference", "sdpa", "reference"]


def test_decision_is_data():
    q = torch.randn(1, 2, 16, 32)
    decision = da.explain(q, q, q, mask_mod=da.masks.causal())
    data = json.loads(decision.to_json())
    assert data["backend"] == decision.backend
    assert set(data["reasons"]) == set(BACKEND_NAMES)
    assert all({"code", "message"} == set(r) for rs in data["reasons"].values() for r in rs)
    text = str(decision)
    assert text.startswith(f"dispatchattn: {decision.backend} for ")
    assert f"Selected backend: {decision.backend}" in text
