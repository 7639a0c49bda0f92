"""Bad input gets a clear error naming the argument, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch

import dispatchattn as da


def qkv(b=2, hq=4, hkv=4, sq=8, sk=8, d=16, dv=16, dtype=torch.float32, layout="bhsd"):
    g = torch.Generator().manual_seed(0)

    def make(h, s, dim):
        shape = (b, h, s, dim) if layout == "bhsd" else (b, s, h, dim)
        return torch.randn(shape, generator=g).to(dtype)

    return make(hq, sq, d), make(hkv, sk, d), make(hkv, sk, dv)


def _call(**overrides):
    shape_keys = {"b", "hq", "hkv", "sq", "sk", "d", "dv", "dtype"}
    shape = {key: overrides.pop(key) for key in list(overrides) if key in shape_keys}
    q, k, v = qkv(
        layout=overrides.get("layout", "bhsd") if overrides.get("layout") in ("bhsd", "bshd") else "bhsd", **shape
    )
    q = overrides.pop("query", q)
    k = overrides.pop("key", k)
    v = overrides.pop("value", v)
    return da.attention(q, k, v, **overrides)


def _mask_device_mismatch():
    return {"attn_mask": torch.ones(8, 8, dtype=torch.bool, device="meta")}


BAD = {
    # name: (kwargs, exception type, words the message must contain)
    "query_not_tensor": ({"query": [[1.0]]}, TypeError, ["query", "torch.Tensor", "list"]),
    "key_not_tensor": ({"key": 3.0}, TypeError, ["key", "torch.Tensor", "float"]),
    "query_rank": ({"query": torch.randn(2, 8, 16)}, ValueError, ["query", "4-D", "(2, 8, 16)"]),
    "value_rank": ({"value": torch.randn(2, 4, 8, 16, 1)}, ValueError, ["value", "4-D", "(2, 4, 8, 16, 1)"]),
    "int_dtype": ({"query": torch.ones(2, 4, 8, 16, dtype=torch.int64)}, TypeError, ["query", "floating", "int64"]),
    "dtype_mismatch": (
        {"key": torch.randn(2, 4, 8, 16, dtype=torch.float64)},
        TypeError,
        ["key", "float32", "float64"],
    ),
    "device_mismatch": ({"value": torch.empty(2, 4, 8, 16, device="meta")}, ValueError, ["value", "device", "meta"]),
    "batch_mismatch": ({"key": torch.randn(3, 4, 8, 16)}, ValueError, ["batch", "2", "3"]),
    "head_dim_mismatch": ({"key": torch.randn(2, 4, 8, 32)}, ValueError, ["key", "head dim 16", "32"]),
    "kv_seq_mismatch": ({"value": torch.randn(2, 4, 9, 16)}, ValueError, ["value", "sequence length 8", "9"]),
    "kv_heads_mismatch": ({"value": torch.randn(2, 2, 8, 16)}, ValueError, ["value", "4 heads", "2 heads"]),
    "gqa_without_flag": ({"hkv": 2}, ValueError, ["key", "enable_gqa=True", "2 heads"]),
    "gqa_not_divisible": ({"hq": 6, "hkv": 4, "enable_gqa": True}, ValueError, ["enable_gqa", "divisible", "4"]),
    "dropout_range": ({"dropout_p": 1.5}, ValueError, ["dropout_p", "[0, 1)", "1.5"]),
    "dropout_type": ({"dropout_p": "0.1"}, TypeError, ["dropout_p", "float", "'0.1'"]),
    "scale_negative": ({"scale": -1.0}, ValueError, ["scale", "> 0", "-1.0"]),
    "scale_type": ({"scale": "big"}, TypeError, ["scale", "float", "'big'"]),
    "mask_not_tensor": ({"attn_mask": [[True]]}, TypeError, ["attn_mask", "torch.Tensor", "list"]),
    "mask_int_dtype": ({"attn_mask": torch.ones(8, 8, dtype=torch.int32)}, TypeError, ["attn_mask", "bool", "int32"]),
    "mask_shape": (
        {"attn_mask": torch.ones(8, 7, dtype=torch.bool)},
        ValueError,
        ["attn_mask", "broadcastable", "(8, 7)"],
    ),
    "mask_device": (_mask_device_mismatch(), ValueError, ["attn_mask", "device", "meta"]),
    "layout": ({"layout": "sbhd"}, ValueError, ["layout", "bhsd", "'sbhd'"]),
    "unknown_backend": ({"backend": "flashy"}, ValueError, ["backend", "triton_flex", "'flashy'"]),
    "is_causal_type": ({"is_causal": 1}, TypeError, ["is_causal", "bool", "1"]),
    "return_lse_type": ({"return_lse": "yes"}, TypeError, ["return_lse", "bool", "'yes'"]),
    "score_mod_not_callable": ({"score_mod": 3}, TypeError, ["score_mod", "callable", "int"]),
    "mask_mod_not_callable": ({"mask_mod": "causal"}, TypeError, ["mask_mod", "callable", "str"]),
    "mask_mod_returns_float": (
        {"mask_mod": lambda b, h, q, kv: (q - kv).float()},
        TypeError,
        ["mask_mod", "bool", "float32"],
    ),
    "score_mod_returns_bool": (
        {"score_mod": lambda s, b, h, q, kv: q >= kv},
        TypeError,
        ["score_mod", "floating", "bool"],
    ),
    "score_mod_wrong_shape": (
        {"score_mod": lambda s, b, h, q, kv: s * torch.ones(3)},
        ValueError,
        ["score_mod", "0-d", "(3,)"],
    ),
    "mask_mod_raises": ({"mask_mod": lambda b, h, q: q > 0}, ValueError, ["mask_mod", "raised", "TypeError"]),
    "empty_tensor": ({"query": torch.randn(2, 4, 0, 16)}, ValueError, ["query", "non-empty", "(2, 4, 0, 16)"]),
    "document_length": (
        {"mask_mod": da.masks.document(torch.zeros(7, dtype=torch.long))},
        ValueError,
        ["document_ids", "Sk = 8", "7"],
    ),
    "document_batch": (
        {"mask_mod": da.masks.document(torch.zeros(3, 8, dtype=torch.long))},
        ValueError,
        ["document_ids", "B=2", "(3, 8)"],
    ),
    "alibi_slopes_shape": ({"score_mod": da.scores.alibi(torch.ones(3))}, ValueError, ["alibi slopes", "(4,)", "(3,)"]),
    "relative_table_width": (
        {"score_mod": da.scores.relative_bias(torch.ones(4, 5))},
        ValueError,
        ["relative_bias table", "W >= Sq + Sk - 1 = 15", "(4, 5)"],
    ),
    "bshd_rank_hint": ({"layout": "bshd", "query": torch.randn(2, 8, 16)}, ValueError, ["query", "(B, S, H, D)"]),
}

CONSTRUCTORS = {
    "window_negative": (lambda: da.masks.sliding_window(-1), ValueError, ["sliding_window", "left", "-1"]),
    "window_right_type": (lambda: da.masks.sliding_window(4, 1.5), ValueError, ["right", "1.5"]),
    "prefix_negative": (lambda: da.masks.prefix_lm(-3), ValueError, ["prefix_len", "-3"]),
    "document_float_ids": (
        lambda: da.masks.document(torch.zeros(8)),
        TypeError,
        ["document_ids", "integer", "float32"],
    ),
    "document_rank": (
        lambda: da.masks.document(torch.zeros(1, 2, 8, dtype=torch.long)),
        ValueError,
        ["document_ids", "(S,) or (B, S)", "(1, 2, 8)"],
    ),
    "softcap_zero": (lambda: da.scores.softcap(0.0), ValueError, ["softcap", "> 0", "0.0"]),
    "softcap_negative": (lambda: da.scores.softcap(-5), ValueError, ["softcap", "> 0", "-5"]),
    "alibi_not_tensor": (lambda: da.scores.alibi([0.5, 0.25]), ValueError, ["alibi", "1-D", "list"]),
    "relative_bias_rank": (
        lambda: da.scores.relative_bias(torch.ones(5)),
        ValueError,
        ["relative_bias", "2-D", "(5,)"],
    ),
    "combine_with_function": (
        lambda: da.masks.causal() & (lambda b, h, q, kv: q > kv),
        TypeError,
        ["mask combination", "da.masks", "function"],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_call_is_rejected_with_a_clear_message(name):
    kwargs, exc_type, words = BAD[name]
    with pytest.raises(exc_type) as info:
        _call(**dict(kwargs))
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_bad_structure_is_rejected_with_a_clear_message(name):
    build, exc_type, words = CONSTRUCTORS[name]
    with pytest.raises(exc_type) as info:
        build()
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_distinct_bad_inputs_cover_the_contract():
    assert len(BAD) + len(CONSTRUCTORS) >= 25


def test_explain_validates_like_attention():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout_p"):
        da.explain(q, k, v, dropout_p=-0.1)


def test_bottom_right_causal_needs_lengths_outside_dispatchattn():
    mask = da.masks.causal(bottom_right=True)
    idx = torch.tensor(0)
    with pytest.raises(RuntimeError, match="bind"):
        mask(idx, idx, idx, idx)
    assert bool(mask.bind(4, 8)(idx, idx, idx, torch.tensor(4)))
