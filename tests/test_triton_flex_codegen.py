"""triton_flex code generation, block sparsity and the AOT entry: readable source, refusals naming the op,
in-memory and on-disk caches (a second process emits nothing), analytic vs evaluated block lists."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dispatchattn as da
from dispatchattn.backends.triton_flex import block_mask, codegen, kernels
from dispatchattn.tuning.config import TileConfig


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path / "cache"))


def test_source_is_readable_with_one_comment_per_op():
    table = torch.randn(2, 63)
    score_mod = lambda s, b, h, q, kv: torch.tanh(s + table[h, q - kv + 31])  # noqa: E731
    generated = codegen.generate(score_mod, da.masks.causal())
    source = generated.path.read_text()
    assert generated.path.parent.name == "kernels" and generated.key[:32] in generated.path.name
    for expected in ("# aten.tanh(", "# aten.index(bufs[0], [h, ", "def score_mod(score, b, h, q_idx, kv_idx",
                     "def score_mod_bwd(", "def mask_mod(b, h, q_idx, kv_idx", "v_ge = v_add >= kv_idx",
                     "# bufs[0]: captured float32 tensor [2, 63]"):
        assert expected in source, expected


@pytest.mark.parametrize(("score_mod", "mask_mod", "op"), [
    (lambda s, b, h, q, kv: torch.sort(s)[0], None, "aten.sort"),
    (None, lambda b, h, q, kv: torch.cumsum(q, 0) > kv, "aten.cumsum"),
])
def test_unsupported_op_is_named(score_mod, mask_mod, op):
    reason = codegen.unsupported_reason(score_mod, mask_mod, "cpu")
    kind = "score_mod" if score_mod is not None else "mask_mod"
    assert reason == f"{kind} uses {op}, which the Triton flex code generator does not support"


def test_supported_mods_have_no_reason_and_devices_are_checked():
    assert codegen.unsupported_reason(da.scores.softcap(5.0), da.masks.sliding_window(8), "cpu") is None
    table = torch.randn(2, 8, device="meta")
    reason = codegen.unsupported_reason(lambda s, b, h, q, kv: s + table[h, kv % 8], None, "cpu")
    assert "captured tensor on another device" in reason and "meta" in reason


def test_any_number_of_captured_tensors_becomes_one_tuple_argument():
    """Nine captured tensors (three dtypes): no refusal, and the kernels take exactly nine pointers in ``BUFS``."""
    dtypes = [torch.float32, torch.int32, torch.bfloat16] * 3
    tables = [torch.randn(5).to(dtype) for dtype in dtypes]
    score_mod = lambda s, b, h, q, kv: s + sum(t[kv % 5] for t in tables)  # noqa: E731
    assert codegen.unsupported_reason(score_mod, None, "cpu") is None
    generated = codegen.generate(score_mod, None)
    assert len(generated.buffers) == 9 and "_load(bufs[8], " in generated.path.read_text()
    _, signature, _, specialization = kernels.aot_entry("fwd", generated, torch.float16, 32, 32, TileConfig(32, 32))
    assert specialization["BUFS"] == ("D",) * 9  # each captured tensor aligned, as a launch on the device marks it
    assert signature["BUFS"] == ("*fp32", "*i32", "*bf16") * 3
    _, signature, _, _ = kernels.aot_entry("bwd_dq", codegen.generate(None, None), torch.float16, 32, 32,
                                           TileConfig(32, 32))
    assert signature["BUFS"] == () and signature["GBUFS"] == ()


def test_memory_cache_reuses_the_module():
    first = codegen.generate(da.scores.softcap(3.0), None)
    emitted = codegen.stats["emitted"]
    second = codegen.generate(da.scores.softcap(3.0), None)
    assert second.module is first.module and codegen.stats["emitted"] == emitted
    assert codegen.generate(da.scores.softcap(4.0), None).key != first.key


_CHILD = textwrap.dedent("""
    import torch, dispatchattn as da
    from dispatchattn.backends.triton_flex import codegen
    ids = torch.arange(64) // 16
    generated = codegen.generate(da.scores.softcap(7.0), da.masks.document(ids) & da.masks.causal())
    print(generated.key, codegen.stats["emitted"], codegen.stats["loaded_from_disk"])
""")


def test_second_process_pays_no_codegen(tmp_path):
    env = {**os.environ, "DISPATCHATTN_CACHE_DIR": str(tmp_path / "shared"), "TRITON_INTERPRET": "1"}
    runs = [subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    (key1, emitted1, loaded1), (key2, emitted2, loaded2) = (r.stdout.split() for r in runs)
    assert key1 == key2 and (emitted1, loaded1) == ("1", "0") and (emitted2, loaded2) == ("0", "1")


SHAPE = dict(batch=2, heads=3, seq_q=100, seq_kv=130, block_m=32, block_n=16)


@pytest.mark.parametrize("mask", [
    da.masks.causal(), da.masks.causal(bottom_right=True), da.masks.sliding_window(20, 3), da.masks.prefix_lm(41),
], ids=lambda m: m.__name__)
def test_analytic_block_lists_equal_evaluated_ones(mask, monkeypatch):
    bound = mask.bind(100, 130)
    analytic = block_mask.build_block_mask(bound, **SHAPE)
    monkeypatch.setattr(block_mask, "CHUNK_ELEMENTS", 2 * 3 * 32 * 16 * 3)  # 3 tiles per chunk: both axes
    opaque = block_mask.build_block_mask(lambda b, h, q, kv: bound(b, h, q, kv), **SHAPE)
    assert (opaque.mask_batch, opaque.mask_heads) == (1, 1)  # the lambda ignores b and h
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "full_q_num_blocks"):
        assert torch.equal(getattr(analytic, name), getattr(opaque, name)), name
    assert analytic.fraction_computed == pytest.approx(opaque.fraction_computed)
    assert 0 < analytic.fraction_computed < 1


def test_document_classes_are_conservative():
    """Documents are classified from per-tile id ranges: never a tile skipped or called full wrongly."""
    mask = da.masks.document(torch.tensor([0] * 30 + [1] * 45 + [2] * 55)) & da.masks.causal()
    exact_any, exact_full = block_mask.tile_classes(lambda b, h, q, kv: mask(b, h, q, kv), 1, 1, 100, 130, 32, 16)
    any_, full = block_mask.tile_classes(mask, 1, 1, 100, 130, 32, 16)
    assert (any_ | ~exact_any).all() and (exact_full | ~full).all()


def test_block_lists_are_cached_and_list_ascending_tiles():
    mask = lambda b, h, q, kv: (q >= kv) & (h != 1)  # noqa: E731 - head-dependent
    first = block_mask.build_block_mask(mask, batch=1, heads=2, seq_q=64, seq_kv=64, block_m=16, block_n=16)
    assert first is block_mask.build_block_mask(mask, batch=1, heads=2, seq_q=64, seq_kv=64, block_m=16, block_n=16)
    assert first.mask_batch == 1 and first.mask_heads == 2
    assert first.kv_num_blocks[0, 1].sum() == 0 and first.full_kv_num_blocks[0, 1].sum() == 0
    assert first.full_kv_indices[0, 0, 3, :3].tolist() == [0, 1, 2]
    assert first.fraction_computed == pytest.approx(10 / 32)


@pytest.mark.parametrize("kernel", sorted(kernels.KERNELS))
def test_aot_entry_describes_every_argument(kernel):
    generated = codegen.generate(da.scores.relative_bias(torch.randn(2, 255, requires_grad=True)).bind(128, 128),
                                 da.masks.causal())
    jit_fn, signature, constexprs, specialization = kernels.aot_entry(kernel, generated, torch.bfloat16, 72, 40,
                                                      TileConfig(64, 32), seq_divisible=False)
    assert list(signature) == list(jit_fn.arg_names)
    assert {n for n, t in signature.items() if t == "constexpr"} == set(constexprs)
    assert list(specialization) == [n for n in signature if n not in constexprs]
    tuples = {name: kind for name, kind in specialization.items() if isinstance(kind, tuple)}
    assert {kind for kind in specialization.values() if not isinstance(kind, tuple)} <= {"D", "1", ""}
    assert all(len(kind) == len(signature[name]) and set(kind) <= {"D"} for name, kind in tuples.items())
    if kernel != "bwd_preprocess":
        assert constexprs["D_PAD"] == 128 and constexprs["HEAD_DIM"] == 72 and constexprs["EVEN_N"] is False
        assert signature["BUFS"] == ("*fp32",) and signature["Q"] == "*bf16"
    if kernel == "bwd_dq":
        assert constexprs["ACCUMULATE"] is True and signature["GBUFS"] == ("*fp32",)


def test_memo_skips_tracing_but_sees_replaced_tensors():
    def bias_mod(table):
        return lambda s, b, h, q, kv: s + table[h, kv % 8]

    table = torch.randn(2, 8)
    mod = bias_mod(table)
    first = codegen.generate(mod, None)
    assert codegen.generate(mod, None) is first
    relearnable = torch.randn(2, 8, requires_grad=True)
    replaced = codegen.generate(lambda s, b, h, q, kv: mod(s, b, h, q, kv) + 0 * relearnable[h, 0], None)
    assert replaced.grad_slots == (1,) and replaced.buffers[1] is relearnable
