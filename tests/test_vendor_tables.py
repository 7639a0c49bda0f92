"""vendor_tables: consistent, sourced, matching the installed xFormers; docs/backends.md matches the matrix."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from packaging.version import Version

from dispatchattn.matrix import BEGIN, END, render_matrix, splice
from dispatchattn.vendor_tables import (
    ARCHS,
    FLASH_FEATURES,
    FLASH_HEAD_DIM_RULES,
    FLASH_IMPLS,
    FLASH_ORDER,
    MATRIX_ARCHS,
    XFORMERS_OPS,
    XFORMERS_ORDER,
    xformers_op_runs_on,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "backends.md"


@pytest.mark.parametrize("key", sorted(FLASH_IMPLS))
def test_flash_impls_are_well_formed(key):
    impl = FLASH_IMPLS[key]
    assert impl.source and impl.archs <= set(ARCHS) and set(impl.features) == set(FLASH_FEATURES)
    assert all(ARCHS[a].vendor == impl.vendor for a in impl.archs)
    for since in impl.features.values():
        assert since is None or Version(since) >= Version("0")
    Version(impl.min_version)


def test_flash_order_and_rules_refer_to_known_entry_points():
    assert all(k in FLASH_IMPLS for keys in FLASH_ORDER.values() for k in keys)
    for rule in FLASH_HEAD_DIM_RULES:
        assert rule.impl in FLASH_IMPLS and rule.archs <= FLASH_IMPLS[rule.impl].archs and rule.source


def test_documented_archs_cover_the_issue():
    assert set(MATRIX_ARCHS) == {"sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120",
                                 "gfx90a", "gfx942", "gfx950", "gfx1100"} and set(MATRIX_ARCHS) <= set(ARCHS)


def test_fa2_needs_ampere_and_features_arrive_in_their_releases():
    fa2 = FLASH_IMPLS["fa2"]
    assert "sm_75" not in fa2.archs and "sm_70" not in fa2.archs and "sm_80" in fa2.archs
    assert (fa2.since("window"), fa2.since("alibi"), fa2.since("deterministic"), fa2.since("softcap")) == (
        "2.3.0", "2.4.0", "2.4.1", "2.6.0")
    assert FLASH_IMPLS["fa3"].since("dropout") is None and FLASH_IMPLS["fa4"].since("alibi") is None
    assert FLASH_IMPLS["fa2_ck"].since("softcap") is None


def test_xformers_op_ranges():
    assert xformers_op_runs_on(XFORMERS_OPS["cutlass"], "sm_75")
    assert not xformers_op_runs_on(XFORMERS_OPS["cutlass"], "sm_100")
    assert not xformers_op_runs_on(XFORMERS_OPS["fa2"], "sm_75")
    assert xformers_op_runs_on(XFORMERS_OPS["ck"], "gfx942") and not xformers_op_runs_on(XFORMERS_OPS["ck"], "gfx1100")
    assert all(k in XFORMERS_OPS for keys in XFORMERS_ORDER.values() for k in keys)


#: The attn_bias classes the xformers backend emits.
USED_BIASES = {"NoneType", "Tensor", "LowerTriangularMask", "LowerTriangularFromBottomRightMask",
               "LowerTriangularFromBottomRightLocalAttentionMask", "LocalAttentionFromBottomRightMask",
               "BlockDiagonalMask", "BlockDiagonalCausalMask", "BlockDiagonalCausalLocalAttentionMask"}


@pytest.mark.parametrize("key", sorted(XFORMERS_OPS))
def test_xformers_table_matches_installed_xformers(key):
    """The op table was read from xFormers 0.0.35's op classes; check it still says the same."""
    pytest.importorskip("xformers.ops.fmha.attn_bias")
    op = XFORMERS_OPS[key]
    module = importlib.import_module(f"xformers.ops.fmha.{op.module}")
    for cls, max_k, min_k, biases in ((module.FwOp, op.max_k_forward, op.min_k_forward, op.biases_forward),
                                      (module.BwOp, op.max_k_backward, op.min_k_backward, op.biases_backward)):
        assert cls.NAME.startswith(op.names[0 if cls is module.FwOp else 1])
        assert set(cls.SUPPORTED_DTYPES) == set(op.dtypes)
        assert (cls.SUPPORTED_MAX_K, getattr(cls, "SUPPORTED_MIN_K", 0)) == (max_k, min_k)
        assert op.dropout == cls.SUPPORTS_DROPOUT
        if op.vendor == "cuda":
            assert op.min_sm == cls.CUDA_MINIMUM_COMPUTE_CAPABILITY
            assert op.max_sm == cls.CUDA_MAXIMUM_COMPUTE_CAPABILITY
        real = {getattr(b, "__name__", str(b)) for b in cls.SUPPORTED_ATTN_BIAS_TYPES}
        for name in USED_BIASES:
            assert (name in real) == (name in biases), (cls.NAME, name)


@pytest.mark.parametrize("fmt", ["markdown", "text"])
def test_render_matrix(fmt):
    text = render_matrix(fmt)
    for arch in MATRIX_ARCHS:
        assert arch in text
    assert "fa3" in text and "cutlassF/cutlassB" in text
    with pytest.raises(ValueError, match="fmt"):
        render_matrix("html")


def test_matrix_does_not_depend_on_the_environment(monkeypatch):
    plain = render_matrix("markdown")
    monkeypatch.setenv("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE")
    assert render_matrix("markdown") == plain


def test_docs_matrix_is_generated():
    document = DOCS.read_text()
    assert BEGIN in document and END in document
    assert splice(document) == document, (
        "docs/backends.md's matrix differs from render_matrix(); regenerate it with "
        "dispatchattn.matrix.splice (python -m dispatchattn matrix prints it)")
