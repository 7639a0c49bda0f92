"""The triton_flex backend adapter: declared limits and reason sentences, translation of is_causal /
attn_mask / layouts through ``da.attention``, the explanation's notes, and the benchmark's smoke mode."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_triton_flex_catalogue import reference

import dispatchattn as da
from dispatchattn.backends.triton_flex.backend import TritonFlexBackend
from dispatchattn.capabilities import DeviceCaps
from dispatchattn.spec import AttentionSpec

BACKEND = TritonFlexBackend()
SPEC = AttentionSpec(batch=1, heads_q=4, heads_kv=2, seq_q=128, seq_kv=128, head_dim=64, head_dim_v=64,
                     dtype=torch.bfloat16, device_type="cuda", mask=da.masks.causal())
H100 = DeviceCaps.synthetic("sm_90")


def _codes(spec, caps=H100):
    return [r.code for r in BACKEND.why_not(spec, caps)]


def _refusal_codes(spec, caps=H100):
    """The refusals read from measurements on disk (shipped compile checks, the user's tuning), not limits."""
    return [r.code for r in BACKEND.measured_refusals(spec, caps)]


def test_runs_mods_on_a_gpu():
    assert BACKEND.why_not(replace(SPEC, score=da.scores.softcap(30.0), requires_grad=True), H100) == []


def test_cpu_without_the_interpreter_gets_the_hint():
    caps = DeviceCaps.synthetic("cpu", triton_interpret=False)
    (reason,) = BACKEND.why_not(replace(SPEC, device_type="cpu"), caps)
    assert str(reason) == ("no GPU: set TRITON_INTERPRET=1 before importing dispatchattn to run it on CPU "
                           "through Triton's interpreter (slow; for tests)")
    assert BACKEND.why_not(replace(SPEC, device_type="cpu"), replace(caps, triton_interpret=True)) == []


def test_missing_triton_is_named():
    caps = replace(H100, libraries=replace(H100.libraries, triton=None))
    assert _codes(SPEC, caps) == ["not_installed"]


@pytest.mark.parametrize(("change", "code", "words"), [
    ({"head_dim": 8, "head_dim_v": 8}, "head_dim_too_small", "head_dim 8 is below 16"),
    ({"head_dim": 320}, "head_dim_too_large", "head_dim 320 exceeds 256"),
    ({"dropout_p": 0.1}, "dropout_unsupported", "dropout_p=0.1"),
    ({"dtype": torch.float64}, "dtype_unsupported", "dtype=float64"),
    ({"score": lambda s, b, h, q, kv: torch.sort(s)[0]}, "mod_unsupported", "aten.sort"),
])
def test_limits_are_sentences_with_the_value(change, code, words):
    reasons = BACKEND.why_not(replace(SPEC, **change), H100)
    assert [r.code for r in reasons] == [code] and words in str(reasons[0])


def _qkv(gen, layout="bhsd", grad=True):
    shapes = [(2, 4, 50, 32), (2, 2, 50, 32), (2, 2, 50, 24)]
    if layout == "bshd":
        shapes = [(b, s, h, d) for b, h, s, d in shapes]
    return [torch.randn(s, generator=gen).requires_grad_(grad) for s in shapes]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_attention_call_with_is_causal_and_bool_mask(layout):
    gen = torch.Generator().manual_seed(21)
    q, k, v = _qkv(gen, layout)
    keep = torch.rand(2, 1, 50, 50, generator=gen) > 0.3
    out = da.attention(q, k, v, attn_mask=keep, is_causal=True, enable_gqa=True, layout=layout,
                       backend="triton_flex")
    to_bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    causal_keep = lambda b, h, qi, ki: keep[b, 0 * h, qi, ki] & (qi >= ki)  # noqa: E731
    ref, _ = reference(to_bhsd(q), to_bhsd(k), to_bhsd(v), None, causal_keep, 32**-0.5)
    assert (to_bhsd(out).double() - ref).abs().max() < 1e-6  # fp32, measured 6.5e-7 (3 seeds, both layouts)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all((g.double() - r).abs().max() < 4e-6 for g, r in zip(grads, ref_grads))  # measured 1.9e-6


def test_float_attn_mask_is_added_to_the_scores():
    gen = torch.Generator().manual_seed(22)
    q, k, v = _qkv(gen, grad=False)
    bias = torch.randn(1, 4, 50, 50, generator=gen)
    out, lse = da.attention(q, k, v, attn_mask=bias, enable_gqa=True, return_lse=True, backend="triton_flex")
    ref, ref_lse = reference(q, k, v, lambda s, b, h, qi, ki: s + bias[0 * b, h, qi, ki], None, 32**-0.5)
    # measured (3 seeds): out 6.1e-7, lse 7.0e-7
    assert (out.double() - ref).abs().max() < 1.2e-6 and (lse.double() - ref_lse).abs().max() < 1.4e-6


def test_explanation_names_kernel_sparsity_and_tiles():
    q, k, v = _qkv(torch.Generator().manual_seed(23))
    text = str(da.explain(q, k, v, enable_gqa=True, mask_mod=da.masks.sliding_window(8) & da.masks.causal(),
                          score_mod=da.scores.softcap(20.0), backend="triton_flex"))
    assert "generated kernel " in text and re.search(r"block sparsity: [\d.]+% of \d+x\d+ tiles computed", text)
    assert "backward tile config BLOCK_M=" in text


def test_benchmark_smoke_mode(tmp_path):
    """bench/flex.py --dry-run: tiny sizes through the interpreter, ratios printed, JSON written."""
    script = Path(__file__).resolve().parents[1] / "bench" / "flex.py"
    result = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "triton_flex" in result.stdout and "ratio" in result.stdout
    assert list(tmp_path.glob("flex_*.json"))


# --- kernels without a spill-free tile on a target (shipped entries with ``no_spill_free_tile``) ----------

GFX1100 = DeviceCaps.synthetic("gfx1100")


def _refusing(monkeypatch, *names):
    """gfx1100's shipped document with the entries ``names`` ("decode bfloat16 d128/128") shipping no config."""
    import json

    from dispatchattn.tuning import shipped

    real = shipped.load_target
    document = json.loads(json.dumps(real("gfx1100")))
    for name in names:
        entry = document["tile_configs"][name]
        config = entry.pop("config", None) or {"block_m": 16, "block_n": 16, "num_warps": 8, "num_stages": 1}
        launches = {"fwd": ["fwd"], "bwd": ["bwd_dkdv", "bwd_dq"], "decode": ["decode"]}[name.split()[0]]
        entry["no_spill_free_tile"] = {
            "least_spilling": {"config": config, "tile": "16x16 w8", "launches": {
                launch: {"spilled_registers": 7, "spill_bytes": 28, "registers": 256} for launch in launches}},
            "configs_tried": 30, "triton": "3.9.0"}
    monkeypatch.setattr(shipped, "load_target", lambda arch, *a: document if arch == "gfx1100" else real(arch, *a))


def test_decoding_falls_back_to_the_forward_kernel_where_only_decoding_spills(monkeypatch):
    from dispatchattn.backends.triton_flex.backend import decoding

    _refusing(monkeypatch, "decode bfloat16 d128/128")
    spec = replace(SPEC, seq_q=1, head_dim=128, head_dim_v=128, mask=None)
    assert BACKEND.measured_refusals(spec, GFX1100) == []
    assert decoding(spec) and not decoding(spec, GFX1100) and decoding(spec, H100)
    notes = " ".join(BACKEND.notes(spec, GFX1100))
    assert "the forward kernel runs instead of the decoding kernel: on gfx1100 every decoding tile spills" in notes
    assert "forward tile config" in notes and "decoding tile config" not in notes
    assert BACKEND.tile_config(spec, GFX1100) == BACKEND._config("fwd", spec, GFX1100)


def test_only_the_kernels_a_call_launches_are_refused(monkeypatch):
    _refusing(monkeypatch, "fwd bfloat16 d128/128", "decode bfloat16 d128/128", "bwd float16 d128/128")
    bf16 = replace(SPEC, head_dim=128, head_dim_v=128)
    assert _refusal_codes(bf16, GFX1100) == ["no_spill_free_tile"]
    (reason,) = BACKEND.measured_refusals(bf16, GFX1100)
    assert str(reason) == ("on gfx1100 every forward tile spills at head_dim 128 in bfloat16 (least: 16x16 w8, "
                           "forward 7 VGPRs "
                           "spilled; 30 configs compiled ahead of time with Triton 3.9.0); triton_flex is not "
                           "offered there")
    assert _refusal_codes(replace(bf16, seq_q=1), GFX1100) == ["no_spill_free_tile"] * 2  # decoding, then the forward
    fp16 = replace(bf16, dtype=torch.float16)
    assert _refusal_codes(fp16, GFX1100) == []  # inference: the forward kernel fits in fp16
    (reason,) = BACKEND.measured_refusals(replace(fp16, requires_grad=True), GFX1100)
    assert reason.code == "no_spill_free_tile" and "every backward tile spills at head_dim 128 in float16" in reason
    assert "dK/dV 7 VGPRs spilled, dQ 7 VGPRs spilled" in reason
    assert _refusal_codes(replace(bf16, requires_grad=True), H100) == []  # other targets: their own shipped entries


def test_forced_triton_flex_raises_the_spill_reason_and_the_selector_moves_on():
    """gfx1100 ships no backward config at head_dim 256 (every tile tried spills with Triton 3.9)."""
    from dispatchattn.capabilities import pretend

    q = torch.randn(1, 2, 64, 256, dtype=torch.bfloat16, requires_grad=True)
    with pretend(GFX1100):
        with pytest.raises(da.UnsupportedError, match="every backward tile spills at head_dim 256 in bfloat16"):
            da.explain(q, q, q, mask_mod=da.masks.causal(), backend="triton_flex")
        decision = da.explain(q, q, q, mask_mod=da.masks.causal())
        inference = da.explain(q.detach(), q.detach(), q.detach(), mask_mod=da.masks.causal(), backend="triton_flex")
    assert decision.backend != "triton_flex"
    assert [r.code for r in decision.reasons["triton_flex"]] == ["no_spill_free_tile"]
    assert "every backward tile spills at head_dim 256" in str(decision)
    assert inference.backend == "triton_flex"
