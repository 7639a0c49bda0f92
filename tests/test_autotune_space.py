"""Config space, resource pruning sentences, heuristic defaults, shipped defaults and the cache key."""

from __future__ import annotations

import json

import pytest
import torch

import dispatchattn as da
from dispatchattn.capabilities import DeviceCaps
from dispatchattn.spec import AttentionSpec
from dispatchattn.tools import defaults
from dispatchattn.tuning import (
    TileConfig,
    config_space,
    estimate_resources,
    heuristic_config,
    make_key,
    shipped,
    why_config_invalid,
)
from dispatchattn.tuning import key as key_module
from dispatchattn.tuning.space import (
    SHARED_OVERHEAD,
    heuristic_config_and_note,
    table_config,
    why_config_cannot_launch,
)
from dispatchattn.vendor_tables import AOT_TARGETS, ARCHS

HALF = (torch.float16, torch.bfloat16)


# --- why_config_invalid ---------------------------------------------------------------------------------


def test_shared_memory_sentence_names_value_limit_and_arch():
    sentence = why_config_invalid("fwd", TileConfig(128, 128, 8, 3), "sm_86", torch.float16, 128, 128)
    assert sentence == "fwd BLOCK_M=128 BLOCK_N=128 D=128 stages=3 needs 133,120 B shared memory > 101,376 B on sm_86"
    assert why_config_invalid("fwd", TileConfig(64, 128, 8, 3), "sm_90", torch.float16, 128, 128) is None


def test_register_sentence():
    sentence = why_config_invalid("fwd", TileConfig(128, 128, 4, 1), "sm_90", torch.float16, 256, 256)
    assert sentence.startswith("fwd BLOCK_M=128 BLOCK_N=128 D=256 warps=4 needs ~800 registers per thread > 255")


@pytest.mark.parametrize(
    ("kernel", "config", "arch", "expected"),
    [
        ("fwd", TileConfig(8, 64), "sm_90", "BLOCK_M=8 must be a power of two >= 16"),
        ("fwd", TileConfig(64, 96), "sm_90", "BLOCK_N=96 must be a power of two >= 16"),
        ("fwd", TileConfig(64, 64, num_warps=3), "sm_90", "num_warps=3 must be one of"),
        ("fwd", TileConfig(64, 64, waves_per_eu=2), "sm_80", "waves_per_eu / matrix_instr_nonkdim / kpack are AMD"),
        ("fwd", TileConfig(64, 64), "sm_61", "arch 'sm_61' is not in the arch table"),
        ("side", TileConfig(64, 64), "sm_90", "kernel 'side' is not one of"),
    ],
)
def test_shape_sentences(kernel, config, arch, expected):
    assert why_config_invalid(kernel, config, arch, torch.float16, 64, 64).startswith(expected)


def test_estimate_grows_with_stages_head_dim_and_dtype():
    base = estimate_resources("fwd", TileConfig(64, 64, 4, 2), torch.float16, 64, 64)
    assert estimate_resources("fwd", TileConfig(64, 64, 4, 3), torch.float16, 64, 64).shared_memory > base.shared_memory
    assert estimate_resources("fwd", TileConfig(64, 64, 4, 2), torch.float16, 96, 96).shared_memory == (
        estimate_resources("fwd", TileConfig(64, 64, 4, 2), torch.float16, 128, 128).shared_memory
    )  # head dims are padded to a power of two
    fp32 = estimate_resources("fwd", TileConfig(64, 64, 4, 2), torch.float32, 64, 64)
    assert fp32.shared_memory - SHARED_OVERHEAD == 2 * (base.shared_memory - SHARED_OVERHEAD)


# Shared memory our kernels requested when compiled ahead of time with Triton 3.9 (bf16; ``python -m
# dispatchattn aot`` records): the estimate must never be below it, or a pruned space could still fail.
MEASURED_SHARED = [
    ("fwd", TileConfig(128, 128, 4, 3), 128, 65_544),
    ("fwd", TileConfig(128, 64, 8, 3), 128, 66_568),
    ("fwd", TileConfig(64, 32, 4, 3), 256, 66_568),
    ("fwd", TileConfig(32, 64, 4, 3), 256, 53_264),
    ("fwd", TileConfig(128, 64, 8, 1), 128, 49_152),  # sm_86, one stage: Q and K tiles
    ("fwd", TileConfig(128, 64, 8, 3), 64, 24_584),
    ("bwd", TileConfig(32, 32, 8, 1), 256, 67_584),
    ("bwd", TileConfig(64, 64, 4, 2), 128, 74_244),  # the dK/dV launch; dQ needed 57,348
    ("bwd", TileConfig(64, 128, 8, 3), 128, 116_744),  # dK/dV; dQ 100,352
]
# On gfx942 (one stage, operands through LDS one at a time).
MEASURED_SHARED_AMD = [
    ("fwd", TileConfig(128, 64, 8, 1), 128, 32_768),
    ("fwd", TileConfig(128, 32, 8, 1), 128, 32_768),  # the Q tile
    ("bwd", TileConfig(64, 64, 4, 1), 128, 16_384),
]


@pytest.mark.parametrize(("kernel", "config", "head_dim", "measured"), MEASURED_SHARED)
def test_estimate_bounds_measured_shared_memory(kernel, config, head_dim, measured):
    estimate = estimate_resources(kernel, config, torch.bfloat16, head_dim, head_dim).shared_memory
    assert measured <= estimate <= 2.5 * measured


@pytest.mark.parametrize(("kernel", "config", "head_dim", "measured"), MEASURED_SHARED_AMD)
def test_estimate_bounds_measured_shared_memory_on_amd(kernel, config, head_dim, measured):
    estimate = estimate_resources(kernel, config, torch.bfloat16, head_dim, head_dim, 64, "rocm").shared_memory
    assert measured <= estimate <= 2 * measured


# --- config space -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", AOT_TARGETS)
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_space_is_valid_per_vendor(arch, kernel):
    space = config_space(kernel, arch, torch.bfloat16, 128, 128)
    assert space and len(space) == len(set(space)) and len(space) <= 64
    assert all(why_config_invalid(kernel, c, arch, torch.bfloat16, 128, 128) is None for c in space)
    if ARCHS[arch].vendor == "rocm":
        assert {c.num_stages for c in space} == {1}
    else:
        assert all(c.waves_per_eu == 0 and c.matrix_instr_nonkdim == 0 and c.kpack == 1 for c in space)


def test_space_rocm_sweeps_amd_knobs_and_accepts_caps():
    space = config_space("fwd", DeviceCaps.synthetic("gfx942"), torch.float16, 64, 64)
    assert {c.waves_per_eu for c in space} == {0, 2} and {c.matrix_instr_nonkdim for c in space} == {0, 16}


def test_space_is_pruned_by_the_smaller_shared_memory():
    h100 = config_space("fwd", "sm_90", torch.float16, 128, 128)
    rtx = config_space("fwd", "sm_86", torch.float16, 128, 128)
    assert set(rtx) < set(h100)
    assert TileConfig(64, 128, 8, 3) in h100 and TileConfig(64, 128, 8, 3) not in rtx
    fwd, bwd = (config_space(kernel, "sm_90", torch.float16, 256, 256) for kernel in ("fwd", "bwd"))
    assert fwd != bwd


# --- heuristic ------------------------------------------------------------------------------------------


def test_heuristic_follows_flexattention_tables():
    # KERNEL_NOTES section 4: H100 f16 d64 128,128,3,4; d128 128,64,3,8; A100 f16 d64 128,64,3,4.
    assert table_config("fwd", "sm_90", torch.float16, 64) == TileConfig(128, 128, 4, 3)
    assert heuristic_config("fwd", "sm_90", torch.bfloat16, 128) == TileConfig(128, 64, 8, 3)
    assert heuristic_config("fwd", "sm_80", torch.float16, 64) == TileConfig(128, 64, 4, 3)
    assert heuristic_config("bwd", "sm_90", torch.float16, 64) == TileConfig(64, 128, 8, 3)
    assert table_config("fwd", "gfx942", torch.float16, 128) == TileConfig(128, 64, 8, 1, 0, 0, 2)
    assert heuristic_config("fwd", "gfx942", torch.float16, 64) == TileConfig(128, 64, 8, 1, 0, 0, 2)


def test_heuristic_shrinks_what_does_not_fit():
    # MI300X: 8 waves share a SIMD pair, 256 VGPRs each; our 128x64 forward at D=128 spilled there
    assert heuristic_config("fwd", "gfx942", torch.float16, 128) == TileConfig(128, 32, 8, 1, 0, 0, 2)
    # 4 warps on a 128x128 tile at D=64 would spill (a 128x128 forward at D=128 measured 2,512 B of spills)
    config, note = heuristic_config_and_note("fwd", "sm_90", torch.float16, 64)
    assert config == TileConfig(128, 128, 8, 3)
    assert note.startswith("FlexAttention default table for sm_90, shrunk from BLOCK_M=128 BLOCK_N=128 warps=4")
    # a 99 KB GPU cannot hold the sm_8x D=256 forward's 3 stages of 64-row K and V tiles
    config = heuristic_config("fwd", "sm_89", torch.float16, 256)
    assert config.num_stages < 3
    assert why_config_invalid("fwd", config, "sm_89", torch.float16, 256, 256) is None


@pytest.mark.parametrize("arch", AOT_TARGETS)
def test_heuristic_is_valid_for_half_precision_everywhere(arch):
    for kernel in ("fwd", "bwd"):
        for dtype in HALF:
            for head_dim in (32, 64, 96, 128, 256):
                config = heuristic_config(kernel, arch, dtype, head_dim)
                assert why_config_invalid(kernel, config, arch, dtype, head_dim, head_dim) is None


# --- shipped defaults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", AOT_TARGETS)
def test_shipped_defaults_exist_are_honest_and_valid(target):
    path = shipped.DEFAULTS_DIR / f"{target}.json"
    document = json.loads(path.read_text())
    assert shipped.store.why_document_invalid(document) is None
    assert {"device", "date", "dispatchattn", "triton", "how"} <= set(document["produced"])
    if not document["measured"]:
        assert document["source"] == "heuristic (FlexAttention defaults table), not timed on hardware"
        assert defaults.same_configs(document, shipped.heuristic_document(target)), \
            "run python -m dispatchattn defaults --write"
    for kernel in ("fwd", "bwd"):
        for dtype in ("float16", "bfloat16"):
            for head_dim in (64, 128):
                assert shipped.entry_name(kernel, dtype, head_dim, head_dim) in document["tile_configs"]
    for name, entry in document["tile_configs"].items():
        kernel, dtype, dims = name.split()
        head_dim, head_dim_v = (int(d) for d in dims.removeprefix("d").split("/"))
        if "config" not in entry:  # every config tried spills here: none ships (tests/test_aot_kernels.py)
            assert entry["no_spill_free_tile"]["least_spilling"]["tile"] and "spills" in entry["checked"], name
            continue
        config = TileConfig.from_dict(entry["config"])
        # a config compiled ahead of time ("checked") was measured: its registers are known, the estimate's are not
        why = why_config_cannot_launch if "checked" in entry else why_config_invalid
        assert why(kernel, config, target, getattr(torch, dtype), head_dim, head_dim_v) is None, name


def test_shipped_source_sentence():
    config, source = shipped.lookup("fwd", "sm_90", "bfloat16", 128, 128)
    assert source.startswith("shipped default (not measured) for sm_90")
    assert shipped.lookup("fwd", "sm_75", "bfloat16", 128, 128) is None


def test_write_heuristic_defaults_keeps_measured_files(tmp_path):
    measured = {**shipped.heuristic_document("sm_90"), "measured": True}
    (tmp_path / "sm_90.json").write_text(json.dumps(measured))
    written = defaults.write_heuristic_defaults(tmp_path)
    assert tmp_path / "sm_90.json" not in written and len(written) == len(AOT_TARGETS) - 1
    assert json.loads((tmp_path / "sm_90.json").read_text())["measured"] is True
    assert defaults.write_heuristic_defaults(tmp_path) == []  # nothing changed


def test_defaults_command_passes_its_options_on(monkeypatch, capsys):
    from dispatchattn.cli import main

    calls = []
    monkeypatch.setattr(defaults, "write_heuristic_defaults", lambda **kwargs: calls.append(kwargs) or [])
    assert main(["defaults"]) == 2 and "--compile-check" in capsys.readouterr().out  # no --write: the help
    assert main(["defaults", "--write", "--compile-check", "--targets", "sm_90,gfx1100", "--variants", "plain,causal",
                 "--triton-python", "self", "--triton-python", "/old/python", "--dtypes", "bfloat16,float32"]) == 0
    assert calls == [{"force": False, "compile_check": True, "targets": ["sm_90", "gfx1100"],
                      "variants": ["plain", "causal"], "dtypes": ["bfloat16", "float32"],
                      "pythons": [None, "/old/python"]}]
    assert main(["measured-space"]) == 2  # no --write: the help


# --- cache key ------------------------------------------------------------------------------------------


def spec(**overrides) -> AttentionSpec:
    fields = dict(batch=1, heads_q=8, heads_kv=8, seq_q=3000, seq_kv=3000, head_dim=64, head_dim_v=64,
                  dtype=torch.bfloat16, device_type="cuda")
    return AttentionSpec(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("overrides", "mask_class"),
    [
        ({}, "dense"),
        ({"mask": da.masks.full()}, "dense"),
        ({"is_causal": True}, "causal"),
        ({"mask": da.masks.causal()}, "causal"),
        ({"mask": da.masks.sliding_window(256) & da.masks.causal()}, "sparse:1/8"),
        ({"mask": da.masks.prefix_lm(2900)}, "dense"),
        ({"mask": da.masks.prefix_lm(64)}, "sparse:1/2"),
        ({"mask": da.masks.document(torch.arange(3000) // 500)}, "sparse:unknown"),
        ({"mask": lambda b, h, q, kv: q >= kv}, "sparse:unknown"),
    ],
)
def test_mask_class(overrides, mask_class):
    assert key_module.mask_class(spec(**overrides)) == mask_class


def test_key_fields_and_file_name():
    caps = DeviceCaps.synthetic("sm_90", device_name="NVIDIA H100 80GB HBM3")
    key = make_key("bwd", spec(heads_kv=2, enable_gqa=True, seq_kv=70000), caps)
    assert key.entry == "bwd bfloat16 d64/64 gqa4 dense q4096 kv131072"
    versions = f"triton-{caps.libraries.triton}_dispatchattn-{da.__version__}"
    assert key.file_name == f"sm_90-nvidia-h100-80gb-hbm3/{versions}.json"
    assert [key_module.seq_bucket(n) for n in (1, 16, 17, 1024, 1025)] == [16, 16, 32, 1024, 2048]
    assert [key_module.density_bucket(d) for d in (1.0, 0.6, 0.3, 0.2, 0.01, 0.0)] == [
        "dense", "sparse:1/2", "sparse:1/2", "sparse:1/4", "sparse:1/64", "sparse:1/64",
    ]


def test_compile_check_shrinks_what_the_compiler_rejects(monkeypatch):
    from types import SimpleNamespace

    from dispatchattn.tools import compile_check

    def fake_round(pending, target, workers):
        """Stands in for compiling: anything with BLOCK_N > 32 'spills'."""
        reasons, records = {}, {}
        for (name, config), (kernel, _dtype, _head_dim) in pending.items():
            launches = compile_check.LAUNCHES[kernel]
            bad = f"{kernel} spills registers on {target}" if config.block_n > 32 else None
            reasons[(name, config)] = [bad] * len(launches)
            records[(name, config)] = [
                SimpleNamespace(kernel=k, total_shared_bytes=1024, registers=99, spill_bytes=0, spill_count=None)
                for k in launches
            ]
        return reasons, records

    monkeypatch.setattr(compile_check, "_compile_round", fake_round)
    document = shipped.heuristic_document("sm_90")
    compile_check.verify_document(document, "sm_90")
    compile_check.copy_checked(document)
    for dtype in ("bfloat16", "float16"):
        entry = document["tile_configs"][f"fwd {dtype} d128/128"]
        assert TileConfig.from_dict(entry["config"]) == TileConfig(128, 32, 8, 3)  # the largest passing tile
        assert "fwd 1,024 B shared, 99 registers, no spills" in entry["checked"]
    assert "ahead-of-time compile rejected" in document["tile_configs"]["fwd bfloat16 d128/128"]["note"]
    assert "checked" not in document["tile_configs"]["fwd float32 d128/128"]
    assert defaults.same_configs(document, shipped.heuristic_document("sm_90"))  # checked entries may differ


def test_compile_check_ships_no_config_where_every_config_spills(monkeypatch, tmp_path):
    """Every config of the backward at D=256 'spills' dQ (fewer registers the smaller the tile and the more warps):
    the entry loses its config and records the least-spilling tile; fp16 gets the same; the rest still ship."""
    from types import SimpleNamespace

    from dispatchattn.tools import compile_check

    def fake_round(pending, target, workers):
        reasons, records = {}, {}
        for (name, config), (kernel, _dtype, head_dim) in pending.items():
            launches = compile_check.LAUNCHES[kernel]
            spilled = config.block_m * config.block_n // 8 - config.num_warps
            spilled = spilled if kernel == "bwd" and head_dim == 256 else 0
            reasons[(name, config)] = [f"{k} spills registers on {target}" if spilled and k == "bwd_dq" else None
                                       for k in launches]
            records[(name, config)] = [
                SimpleNamespace(kernel=k, total_shared_bytes=1024, registers=256, spill_count=spilled if k == "bwd_dq"
                                else 0, spill_bytes=4 * spilled if k == "bwd_dq" else 0) for k in launches
            ]
        return reasons, records

    monkeypatch.setattr(compile_check, "_compile_round", fake_round)
    document = shipped.heuristic_document("gfx1100")
    log = compile_check.verify_document(document, "gfx1100")
    compile_check.copy_checked(document)
    assert any("bwd bfloat16 d256/256: every config spills (least BLOCK_M=16 BLOCK_N=16 warps=16" in line
               for line in log), log
    (tmp_path / "gfx1100.json").write_text(json.dumps(document))
    for dtype in ("bfloat16", "float16"):
        entry = document["tile_configs"][f"bwd {dtype} d256/256"]
        assert "config" not in entry and "no config ships" in entry["checked"]
        least = entry["no_spill_free_tile"]["least_spilling"]
        assert TileConfig.from_dict(least["config"]) == TileConfig(16, 16, num_warps=16, num_stages=1)
        assert least["launches"] == {"bwd_dkdv": {"spilled_registers": 0, "spill_bytes": 0, "registers": 256},
                                     "bwd_dq": {"spilled_registers": 16, "spill_bytes": 64, "registers": 256}}
        assert shipped.refusal("bwd", "gfx1100", dtype, 256, 256, tmp_path) == entry["no_spill_free_tile"]
        assert shipped.lookup("bwd", "gfx1100", dtype, 256, 256, tmp_path) is None
    message = shipped.refusal_message("bwd", "gfx1100", 256, 256, shipped.refusal("bwd", "gfx1100", "bfloat16", 256,
                                                                                  256, tmp_path))
    assert message.startswith("on gfx1100 every backward (dQ) tile spills at head_dim 256 (least: 16x16 w16, "
                              "dQ 16 VGPRs spilled; ")
    assert "config" in document["tile_configs"]["bwd bfloat16 d128/128"]
    assert "config" in document["tile_configs"]["fwd bfloat16 d256/256"]
