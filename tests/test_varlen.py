"""``da.varlen_attention``: packed sequences against a float64 oracle that loops over the sequences (written here,
sharing no code with dispatchattn), on every backend that runs on CPU, and the flash / xFormers translations on
their recording test doubles.

Lengths per sequence differ between q and k and include an empty sequence, a sequence without keys and one with
more queries than keys (under causal, its first queries see no key: zeros, lse -inf, finite gradients).
Tolerances are about 2x the largest error measured over 5 seeds (noted per constant).
"""

from __future__ import annotations

import math

import pytest
import torch
from fakes.flash_doubles import install as install_flash
from fakes.flash_doubles import make_fa2
from fakes.xformers_doubles import install as install_xformers
from packaging.version import Version

import dispatchattn as da
from dispatchattn import packed
from dispatchattn.capabilities import DeviceCaps, Libraries, pretend

Q_LENS = [5, 0, 9, 6, 13]  # sequence 1 is empty, sequence 2 has no keys, sequence 3 has Lq > Lk
K_LENS = [7, 3, 0, 2, 17]
#: fp32 reference / triton_flex / sdpa against the float64 oracle, 5 seeds, with and without mods: measured <= 4.9e-7
#: (out), 4.3e-7 (lse), 2.1e-6 (grads, a captured table's included).
TOL = dict(atol=1e-6, rtol=0)
GRAD_TOL = dict(atol=4e-6, rtol=0)


def cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed_inputs(q_lens=Q_LENS, k_lens=K_LENS, hq=4, hkv=2, d=16, dv=24, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    k = torch.randn(sum(k_lens), hkv, d, generator=gen)
    v = torch.randn(sum(k_lens), hkv, dv, generator=gen)
    return [t.to(dtype).requires_grad_(grad) for t in (q, k, v)], cu(q_lens), cu(k_lens)


def oracle(q, k, v, cu_q, cu_k, causal, score_fn=None, keep_fn=None, scale=None):
    """Float64 (out (total_q, Hq, Dv), lse (Hq, total_q)), one sequence at a time, differentiable.
    ``score_fn(scores, s, h, i, j)`` / ``keep_fn(s, h, i, j)`` take the sequence index and local grids."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        qs = q[a:b].transpose(0, 1)
        ks, vs = (t[c:d].transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))
        scores = qs @ ks.transpose(-1, -2) * scale  # (H, Lq, Lk)
        h = torch.arange(q.shape[1]).view(-1, 1, 1)
        i, j = torch.arange(b - a).view(1, -1, 1), torch.arange(d - c).view(1, 1, -1)
        if score_fn is not None:
            scores = score_fn(scores, s, h, i, j)
        keep = torch.ones(scores.shape, dtype=torch.bool)
        if causal:
            keep = keep & (j <= i + (d - c) - (b - a))
        if keep_fn is not None:
            keep = keep & keep_fn(s, h, i, j)
        empty = ~keep.any(-1, keepdim=True)
        safe = scores.masked_fill(~keep, -math.inf).masked_fill(empty, 0.0)  # finite lse (and grads) on empty rows
        lse = torch.logsumexp(safe, -1, keepdim=True)
        probs = torch.exp(safe - lse).masked_fill(~keep, 0.0)
        outs.append((probs @ vs).transpose(0, 1))
        lses.append(lse.squeeze(-1).masked_fill(empty.squeeze(-1), -math.inf))
    return torch.cat(outs), torch.cat(lses, dim=1)


def check_forward_backward(backend, causal, lse=True, grad=True, seed=0, **kwargs):
    (q, k, v), cu_q, cu_k = packed_inputs(seed=seed, grad=grad)
    result = da.varlen_attention(q, k, v, cu_q, cu_k, max(Q_LENS), max(K_LENS), is_causal=causal, enable_gqa=True,
                                 return_lse=lse, backend=backend, **kwargs)
    out, got_lse = result if lse else (result, None)
    ref_inputs = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    ref, ref_lse = oracle(*ref_inputs, cu_q, cu_k, causal)
    assert out.shape == (sum(Q_LENS), 4, 24) and out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, **TOL)
    if lse:
        assert got_lse.shape == (4, sum(Q_LENS)) and got_lse.dtype == torch.float32
        torch.testing.assert_close(got_lse.double(), ref_lse, **TOL)
    if causal:  # sequence 2 (no keys) and the first 4 queries of sequence 3 see nothing
        assert (out[5:18] == 0).all() and (out[18:] != 0).any()
        if lse:
            assert torch.isneginf(got_lse[:, 5:18]).all()
    if grad:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        out.backward(dout)
        ref.backward(dout.double())
        for got, want in zip((q, k, v), ref_inputs):
            assert torch.isfinite(got.grad).all()
            torch.testing.assert_close(got.grad.double(), want.grad, **GRAD_TOL)


# ------------------------------------------------------------------------------------------ numerics per backend
@pytest.mark.parametrize("backend", ["reference", "triton_flex"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_lse_and_gradients(backend, causal):
    check_forward_backward(backend, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_forward_and_gradients(causal):
    check_forward_backward("sdpa", causal, lse=False)  # SDPA returns no lse


def test_torch_flex_forward():
    """Compiled FlexAttention on CPU: forward only (no backward or lse there), sequences >= 64 tokens in all."""
    q_lens, k_lens = [30, 0, 41], [50, 20, 30]
    (q, k, v), cu_q, cu_k = packed_inputs(q_lens, k_lens, dv=16, seed=3)
    with torch.no_grad():
        out = da.varlen_attention(q, k, v, cu_q, cu_k, 41, 50, is_causal=True, enable_gqa=True, backend="torch_flex")
    ref, _ = oracle(q, k, v, cu_q, cu_k, True)
    torch.testing.assert_close(out.double(), ref, **TOL)


def _bias_table():
    return torch.randn(len(Q_LENS), 4, generator=torch.Generator().manual_seed(7))  # (sequence, head)


@pytest.mark.parametrize("backend", ["reference", "triton_flex"])
def test_mods_see_sequence_index_and_local_positions(backend):
    """A per-sequence, per-head bias from a captured table indexed by ``b`` (with its gradient) and a local sliding
    window of 3."""
    table = _bias_table().requires_grad_()
    ref_table = table.detach().double().requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[b, h] - 0.1 * (q_idx - kv_idx).abs()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx).abs() <= 3

    (q, k, v), cu_q, cu_k = packed_inputs(seed=5, grad=True)
    out, lse = da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, is_causal=True, enable_gqa=True, score_mod=score_mod,
                                   mask_mod=mask_mod, return_lse=True, backend=backend)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = oracle(*ref_inputs, cu_q, cu_k, True,
                          score_fn=lambda s, b, h, i, j: s + ref_table[b].view(-1, 1, 1) - 0.1 * (i - j).abs(),
                          keep_fn=lambda b, h, i, j: (j - i).abs() <= 3)
    torch.testing.assert_close(out.double(), ref, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **TOL)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(dout)
    ref.backward(dout.double())
    for got, want in zip((q, k, v, table), (*ref_inputs, ref_table)):
        torch.testing.assert_close(got.grad.double(), want.grad, **GRAD_TOL)


def test_sdpa_takes_a_local_mask_mod_and_refuses_an_opaque_score_mod():
    (q, k, v), cu_q, cu_k = packed_inputs(seed=8)
    out = da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, backend="sdpa",
                              mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + b)
    ref, _ = oracle(q, k, v, cu_q, cu_k, False, keep_fn=lambda b, h, i, j: j <= i + b)
    torch.testing.assert_close(out.double(), ref, **TOL)
    with pytest.raises(da.UnsupportedError, match="sdpa: an arbitrary score_mod is not an additive bias"):
        da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, backend="sdpa",
                            score_mod=lambda s, b, h, q_idx, kv_idx: s * 0.5)


def test_softcap_object_is_passed_through_and_computed():
    (q, k, v), cu_q, cu_k = packed_inputs(seed=9)
    out = da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, is_causal=True,
                              score_mod=da.scores.softcap(2.0), backend="reference")
    ref, _ = oracle(q, k, v, cu_q, cu_k, True, score_fn=lambda s, b, h, i, j: 2.0 * torch.tanh(s / 2.0))
    torch.testing.assert_close(out.double(), ref, **TOL)


# ------------------------------------------------------------------------------------- flash-attn (test double)
def flash_caps(arch="sm_80"):
    return DeviceCaps.synthetic(arch, libraries=Libraries(torch=Version("2.13"), flash_attn=Version("2.8.3")))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_gets_the_callers_cu_seqlens(monkeypatch, causal):
    fa2 = make_fa2("2.8.3")
    install_flash(monkeypatch, fa2=fa2)
    (q, k, v), cu_q, cu_k = packed_inputs(dv=16, dtype=torch.float16, seed=10)
    with pretend(flash_caps()):
        out, lse = da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, is_causal=causal, enable_gqa=True, scale=0.3,
                                       return_lse=True, backend="flash")
    name, args, kwargs = fa2.recorder.last
    assert name == "flash_attn_varlen_func"
    assert args[3] is cu_q and args[4] is cu_k and args[5:] == (13, 17)
    assert args[0].shape == q.shape and args[1].shape == k.shape  # packed as given: no padding, no copy of GQA heads
    assert kwargs["causal"] is causal and kwargs["softmax_scale"] == 0.3 and kwargs["return_attn_probs"]
    ref, ref_lse = oracle(q, k, v, cu_q, cu_k, causal, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)  # fp16 rounding of the double's output
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)  # flash's lse +inf -> -inf on empty rows
    assert not out.isnan().any()


def test_flash_refuses_a_user_mod_with_the_reason(monkeypatch):
    install_flash(monkeypatch, fa2=make_fa2("2.8.3"))
    (q, k, v), cu_q, cu_k = packed_inputs(dv=16, dtype=torch.float16)
    with pretend(flash_caps()), pytest.raises(da.UnsupportedError, match="flash: an arbitrary score_mod/mask_mod"):
        da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, backend="flash",
                            mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)


def test_flash_is_chosen_by_default_on_a_gpu(monkeypatch):
    install_flash(monkeypatch, fa2=make_fa2("2.8.3"))
    (q, k, v), cu_q, cu_k = packed_inputs(dv=16, dtype=torch.float16)
    with pretend(flash_caps()):
        decision = da.varlen.explain(q, k, v, cu_q, cu_k, 13, 17, is_causal=True, enable_gqa=True)
    assert decision.backend == "flash"
    assert any("flash_attn_varlen_func with the caller's cu_seqlens" in note for note in decision.notes)


# ----------------------------------------------------------------------------------------- xFormers (test double)
def xformers_caps():
    return DeviceCaps.synthetic("sm_80", libraries=Libraries(torch=Version("2.13"), xformers=Version("0.0.35")))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_xformers_block_diagonal_from_the_lengths(monkeypatch, causal):
    ab = pytest.importorskip("xformers.ops.fmha.attn_bias")
    calls = install_xformers(monkeypatch, nan_rows=True)  # rows without keys come back NaN: the backend fixes them
    (q, k, v), cu_q, cu_k = packed_inputs(dtype=torch.float16, seed=11)
    with pretend(xformers_caps()):
        out, lse = da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, is_causal=causal, enable_gqa=True,
                                       return_lse=True, backend="xformers")
    bias = calls[-1][2]["attn_bias"]
    assert bias.k_seqinfo.seqstart_py == cu_k.tolist()
    if causal:  # bottom-right causal blocks need Lk >= Lq: the 4 queries of sequence 3 that see nothing are left out
        assert type(bias) is ab.BlockDiagonalCausalFromBottomRightMask
        assert bias.q_seqinfo.seqstart_py == cu([5, 0, 0, 2, 13]).tolist()
    else:
        assert type(bias) is ab.BlockDiagonalMask and bias.q_seqinfo.seqstart_py == cu_q.tolist()
    ref, ref_lse = oracle(q, k, v, cu_q, cu_k, causal)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- selection and errors
def test_explain_lists_every_backend_with_reasons():
    (q, k, v), cu_q, cu_k = packed_inputs()
    decision = da.varlen.explain(q, k, v, cu_q, cu_k, 13, 17, is_causal=True, enable_gqa=True, return_lse=True)
    assert decision.backend == "reference"  # CPU, lse wanted: SDPA has none
    assert set(decision.reasons) == set(da.backends.BACKEND_NAMES)
    for name, reasons in decision.reasons.items():  # rejected with reasons, or eligible with why it lost
        assert reasons or (name in decision.eligible and (name == "reference" or decision.lost[name])), name
    assert "mask_mod=packed_5_sequences_causal" in str(decision)


def test_policy_and_forced_backend_that_cannot_run(monkeypatch):
    (q, k, v), cu_q, cu_k = packed_inputs()
    with pytest.raises(da.UnsupportedError, match="forced backend cannot run this call") as error:
        da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, backend="flash")
    assert "flash: runs on NVIDIA CUDA / AMD ROCm" in str(error.value)
    with da.use_backends("sdpa", "reference"):
        assert da.varlen.explain(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True).backend == "sdpa"
    monkeypatch.setenv("DISPATCHATTN_BACKEND", "reference")
    assert da.varlen.explain(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True).backend == "reference"


def test_packing_tables_are_built_once_per_tensor_and_rechecked_after_an_edit():
    packed.clear_cache()
    (q, k, v), cu_q, cu_k = packed_inputs()
    for _ in range(3):
        da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, backend="reference")
    assert len(packed._INDEX_CACHE) == 1
    cu_k[-1] = 99  # edited in place: a new version, checked again
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected a last value equal to the packed length of key"):
        da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, backend="reference")


def _bad(case):
    (q, k, v), cu_q, cu_k = packed_inputs()
    args = dict(query=q, key=k, value=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=13, max_seqlen_k=17,
                enable_gqa=True)
    changes = {
        "int64": dict(cu_seqlens_q=cu_q.long()),
        "2-D": dict(cu_seqlens_k=cu_k.view(1, -1)),
        "start": dict(cu_seqlens_q=cu_q + 1),
        "decreasing": dict(cu_seqlens_k=torch.tensor([0, 7, 10, 9, 12, 29], dtype=torch.int32)),
        "last": dict(cu_seqlens_q=torch.tensor([0, 5, 5, 14, 20, 30], dtype=torch.int32)),
        "count": dict(cu_seqlens_k=cu_k[:-1]),
        "rank": dict(query=q[None]),
        "value tokens": dict(value=v[:-1]),
        "heads": dict(enable_gqa=False),
        "gqa": dict(key=k.repeat(1, 3, 1)[:, :3], value=v.repeat(1, 3, 1)[:, :3]),
        "max": dict(max_seqlen_k=16),
        "max type": dict(max_seqlen_q=13.0),
    }
    args.update(changes[case])
    return args


@pytest.mark.parametrize("case,error,message", [
    ("int64", TypeError, "cu_seqlens_q: expected dtype torch.int32 .*, got torch.int64"),
    ("2-D", ValueError, r"cu_seqlens_k: expected a 1-D tensor of B \+ 1 >= 2 cumulative lengths, got shape \(1, 6\)"),
    ("start", ValueError, "cu_seqlens_q: expected a first value of 0, got 1"),
    ("decreasing", ValueError, "cu_seqlens_k: expected non-decreasing values .*, got 10 then 9 at index 2"),
    ("last", ValueError, r"cu_seqlens_q: expected a last value equal to the packed length of query \(33\), got 30"),
    ("count", ValueError, "cu_seqlens_k: expected 6 entries like cu_seqlens_q .*, got 5 entries"),
    ("rank", ValueError, r"query: expected a 3-D packed tensor \(total_q, Hq, D\), got shape \(1, 33, 4, 16\)"),
    ("value tokens", ValueError, "value: expected total_k = 29 tokens like key, got 28 tokens"),
    ("heads", ValueError, r"key: expected 4 heads like query \(or enable_gqa=True"),
    ("gqa", ValueError, r"enable_gqa: expected query heads \(4\) divisible by key/value heads, got 3"),
    ("max", ValueError, r"max_seqlen_k: expected >= the longest sequence \(17, from cu_seqlens_k\), got 16"),
    ("max type", TypeError, "max_seqlen_q: expected an int"),
])
def test_validation_names_the_argument(case, error, message):
    with pytest.raises(error, match=message):
        da.varlen_attention(**_bad(case))


# ------------------------------------------------------------------------------------------------ torch.compile
def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    (q, k, v), cu_q, cu_k = packed_inputs(grad=True, seed=12)

    def fn(q, k, v, cu_q, cu_k):
        return da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, is_causal=True, enable_gqa=True, backend=backend)

    out = torch.compile(fn, fullgraph=True)(q, k, v, cu_q, cu_k)
    eager_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = fn(*eager_inputs, cu_q, cu_k)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)  # another schedule of the same fp32 math
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
    out.backward(dout)
    expected.backward(dout)
    for got, want in zip((q, k, v), eager_inputs):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=0)
    assert _graph_breaks() == 0
    torch._dynamo.reset()


def test_triton_flex_inside_compile_falls_back_or_is_refused():
    """The packing's tables are tensors the mask captures, which triton_flex's custom ops cannot take yet."""
    torch._dynamo.reset()
    (q, k, v), cu_q, cu_k = packed_inputs(seed=14)

    def allowed(q, k, v, cu_q, cu_k):
        with da.use_backends("triton_flex", "reference"):
            return da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True)

    out = torch.compile(allowed, fullgraph=True)(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(out.double(), oracle(q, k, v, cu_q, cu_k, False)[0], **TOL)

    def forced(q, k, v, cu_q, cu_k):
        return da.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, enable_gqa=True, backend="triton_flex")

    with pytest.raises(Exception, match="forced backend cannot run this call(.|\n)*triton_flex: "):
        torch.compile(forced, fullgraph=True)(q, k, v, cu_q, cu_k)
    torch._dynamo.reset()
