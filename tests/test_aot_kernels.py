"""Every shipped default tile config of the triton_flex kernels, compiled for every GPU target without a GPU.

Each (variant, kernel, target, dtype, head dim) is its own test id.  A compile of the real kernels costs
10-60 s of CPU (spilling configs the most), so the default suite compiles a representative set: the plain
kernels for every target at the most common shape, the mods on one target per vendor.  Everything else is
``@pytest.mark.slow`` (the scheduled CI job), as is the sweep over the whole autotune config space.
Records are cached under ``cache_root()/aot/`` by kernel source, config, target and Triton version, so a
warm run reads JSON and compiles nothing.

Where a shipped entry holds no config because every config tried spills (``REFUSED``), no compile case exists:
the refusal tests check that triton_flex refuses exactly those kernels on that target, with the reason.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from dispatchattn.backends.triton_flex.backend import TritonFlexBackend, decoding, spill_refusals  # noqa: E402
from dispatchattn.capabilities import DeviceCaps  # noqa: E402
from dispatchattn.spec import AttentionSpec  # noqa: E402
from dispatchattn.tools import aot, aot_cache, aot_report, compile_check, defaults  # noqa: E402
from dispatchattn.tuning import shipped  # noqa: E402
from dispatchattn.tuning.config import TileConfig  # noqa: E402
from dispatchattn.vendor_tables import AOT_TARGETS, ARCHS  # noqa: E402

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "decode")
#: Launches that do not read the mods: compiled for the plain variant only.
MOD_FREE_KERNELS = ("bwd_preprocess", "decode_reduce")
#: The autotuned kernel whose shipped config each launch runs with.
TUNE_KERNEL = {"fwd": "fwd", "decode": "decode", "decode_reduce": "decode"}
DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (64, 128, 256)
#: Where the mods are compiled in the default suite: one target per vendor's newest matrix instruction.
MOD_TARGETS = ("sm_90", "gfx942")
#: (target, kernel, head dim) whose shipped default uses the older matrix instruction on purpose: every
#: tile that gets the fast one spills, with the plain kernels or some checked variant (measured with Triton 3.9; the
#: entry's ``checked`` says so), so the
#: largest non-spilling config ships instead.
SLOWER_INSTRUCTION_ON_PURPOSE = {
    ("sm_90", "bwd_dkdv", 256): "wgmma tiles (64 rows) spill at D=256: 64x32 w8 s2 832 B; 32x32 w8 s2 uses mma.sync",
    ("sm_90", "bwd_dq", 256): "the same config as bwd_dkdv (one backward config); BLOCK_M=32 uses mma.sync",
    ("sm_100", "fwd", 256): "every tcgen05 tile tried spilled at D=256; 32x64 w8 s3 fits with mma.sync",
    ("sm_100", "bwd_dkdv", 256): "every tcgen05 tile tried spilled at D=256; 32x32 w8 s2 fits with mma.sync",
    ("sm_100", "bwd_dq", 256): "the same config as bwd_dkdv (one backward config); 32x32 uses mma.sync",
    ("sm_90", "decode", 256): "every 64-row (wgmma) decoding tile spills at D=256; 32x32 w8 s1 fits with mma.sync",
    ("sm_100", "decode", 256): "every 64-row (tcgen05) decoding tile spills at D=256; 32x32 w8 s1 uses mma.sync",
}
#: (target, tuned kernel, head dim, dtype) whose shipped entry holds no config: every config tried spills
#: (measured with Triton 3.9 by ``shipped --write --compile-check``; the entry's ``no_spill_free_tile`` records the
#: least-spilling tile), so the triton_flex backend refuses that kernel on that target, with this reason (its
#: start; the rest names the least-spilling tile and what it spilled).  gfx1100 (RDNA3, 256 VGPRs): in bf16 and
#: fp16 (WMMA) the forward fits at every head dim (D=256: 16x32 w16), the decoding kernel too (one-pass loop, K
#: through transposed pointers), the backward up to D=128 (16x16 w8); at D=256 every backward tile spills.  fp32
#: multiplies with FMA there (no fp32 WMMA), which needs more registers: the forward and decoding kernels fit up to
#: D=128, the backward at D=64 only.
REFUSED = {
    **{("gfx1100", "bwd", 256, dtype): "on gfx1100 every backward tile spills at head_dim 256 in {dtype} (least: "
       for dtype in ("bf16", "fp16", "fp32")},
    ("gfx1100", "bwd", 128, "fp32"): "on gfx1100 every backward tile spills at head_dim 128 in float32 (least: ",
    ("gfx1100", "fwd", 256, "fp32"): "on gfx1100 every forward tile spills at head_dim 256 in float32 (least: ",
    ("gfx1100", "decode", 256, "fp32"): "on gfx1100 every decoding tile spills at head_dim 256 in float32 (least: ",
}

#: (target, variant, launch, head dim, dtype) that spill on the shipped tile, each an xfail naming what spills, after
#: asserting that it spills exactly what the entry records (so a fix or a change fails the case): the compile check
#: (``shipped --write --compile-check``, every variant of ``CHECKED_VARIANTS``) found no tile that fits every
#: variant, but the plain kernels fit, so the entry ships the tile the other variants spill least with and records
#: them in ``variant_spills`` (``test_variant_spills_are_recorded_exactly`` keeps the two in step; Triton 3.9).
#: gfx1100 backward at D=128 (bf16, fp16): 16x16 w8 is the only small tile whose plain dK/dV and dQ fit the 256
#: VGPRs (246 and 239); a mask or score adds the registers that tip dK/dV over.  gfx1100 fp32 (FMA) forward and
#: decoding at D=128: 16x32 w16 fits the plain kernels, softcap, ALiBi and causal; a sliding window or a bias table
#: tips them over.
_GFX1100_DKDV = "gfx1100 bwd D=128 16x16 w8 (no tile fits every variant; the plain kernels fit only with this one): "
_GFX1100_FP32 = "gfx1100 fp32 (FMA) D=128 16x32 w16 (no tile fits every variant; the plain kernels fit): "
VARIANT_SPILLS: dict[tuple[str, str, str, int, str], str] = {
    **{(target, variant, launch, head_dim, dtype): why
       for (target, variant, launch, head_dim), why in {
           ("gfx1100", "causal", "bwd_dkdv", 128): _GFX1100_DKDV + "dK/dV with causal spills 37 VGPRs (152 B per lane)",
           ("gfx1100", "sliding_window", "bwd_dkdv", 128): _GFX1100_DKDV + "dK/dV with sliding_window spills 30 VGPRs",
           ("gfx1100", "alibi", "bwd_dkdv", 128): _GFX1100_DKDV + "dK/dV with alibi spills 38 VGPRs (156 B per lane)",
           ("gfx1100", "relative_bias", "bwd_dkdv", 128): _GFX1100_DKDV + "dK/dV with relative_bias spills 54 VGPRs "
                                                                          "(fp16 59)",
       }.items()
       for dtype in ("bf16", "fp16")},
    ("gfx1100", "sliding_window", "fwd", 128, "fp32"): _GFX1100_FP32 + "forward with sliding_window spills 29 VGPRs",
    ("gfx1100", "relative_bias", "fwd", 128, "fp32"): _GFX1100_FP32 + "forward with relative_bias spills 31 VGPRs",
    ("gfx1100", "sliding_window", "decode", 128, "fp32"): _GFX1100_FP32 + "decoding, sliding_window: 37 VGPRs",
    ("gfx1100", "relative_bias", "decode", 128, "fp32"): _GFX1100_FP32 + "decoding, relative_bias: 39 VGPRs",
}


def in_default_suite(variant: str, kernel: str, target: str, dtype: str, head_dim: int) -> bool:
    """The representative set compiled by the default (not slow) suite; keep it within a few minutes cold."""
    if (variant, kernel, target, dtype, head_dim) == ("clamped_bias", "fwd", "sm_90", "bf16", 64):
        return True  # the H200's OutOfResources (issue 16): the shipped tile must fit the shared memory
    if head_dim != 128:
        return False
    if dtype == "fp32":  # FMA on NVIDIA and RDNA3, MFMA on CDNA; its compiles take longest: the plain forward
        return variant == "plain" and kernel == "fwd" and target in MOD_TARGETS
    if kernel == "decode":  # the plain decoding kernel on every target, its mods on one target per vendor
        return dtype == "bf16" and (variant == "plain" or target in MOD_TARGETS)
    if kernel == "decode_reduce":  # no dot, no mods: one target per vendor (~3 s a compile)
        return dtype == "bf16" and target in MOD_TARGETS
    if variant == "plain":
        if kernel in ("fwd", "bwd_preprocess"):
            return dtype == "bf16" or target in MOD_TARGETS
        return dtype == "bf16" and target in MOD_TARGETS
    return kernel == "fwd" and dtype == "bf16" and target in MOD_TARGETS


def _cases() -> list:
    cases = []
    for variant in aot_report.CHECKED_VARIANTS:
        kernels = (*MOD_FREE_KERNELS, *KERNELS) if variant == "plain" else KERNELS
        for kernel in kernels:
            for target in AOT_TARGETS:
                for dtype in DTYPES:
                    for head_dim in HEAD_DIMS:
                        if (target, TUNE_KERNEL.get(kernel, "bwd"), head_dim, dtype) in REFUSED:
                            continue  # never launched there: test_kernel_without_a_spill_free_tile_is_refused
                        marks = [] if in_default_suite(variant, kernel, target, dtype, head_dim) else [pytest.mark.slow]
                        case_id = f"{variant}-{kernel}-{target}-{dtype}-d{head_dim}"
                        cases.append(pytest.param(variant, kernel, target, dtype, head_dim, marks=marks, id=case_id))
    return cases


def _selected(session, function_name: str) -> list[tuple]:
    """The parameter tuples of this file's ``function_name`` items that will run in this session."""
    names = ("variant", "kernel", "target", "dtype", "head_dim")
    return [
        tuple(item.callspec.params[n] for n in names)
        for item in session.items
        if getattr(item, "originalname", None) == function_name and hasattr(item, "callspec")
    ]


@pytest.fixture(scope="session")
def shipped_records(request) -> dict[tuple, aot.AotRecord | None]:
    """All selected cases compiled in one parallel batch (or read from the cache); None: nothing ships."""
    cases = _selected(request.session, "test_shipped_default_compiles_fits_and_uses_matrix_instructions")
    jobs, keys = [], []
    for variant, kernel, target, dtype, head_dim in cases:
        tune_kernel = TUNE_KERNEL.get(kernel, "bwd")
        if aot_report.shipped_config(tune_kernel, target, dtype, head_dim) is None:
            continue
        mask, score = aot_report.CHECKED_VARIANTS[variant]
        jobs += aot_report.plan([target], [(mask, score)], [dtype], [head_dim], [kernel])
        keys.append((variant, kernel, target, dtype, head_dim))
    records = aot.compile_jobs(jobs, workers=2)
    found: dict[tuple, aot.AotRecord | None] = dict.fromkeys(cases)
    found.update(zip(keys, records))
    return found


@pytest.mark.parametrize("variant, kernel, target, dtype, head_dim", _cases())
def test_shipped_default_compiles_fits_and_uses_matrix_instructions(
    shipped_records, variant, kernel, target, dtype, head_dim
):
    record = shipped_records[(variant, kernel, target, dtype, head_dim)]
    if record is None:
        dtype_name = aot_report.TORCH_DTYPE_NAMES[dtype]
        name = shipped.entry_name(TUNE_KERNEL.get(kernel, "bwd"), dtype_name, head_dim, head_dim)
        assert name not in shipped.load_target(target)["tile_configs"], f"{name} on {target} ships no config"
        pytest.skip(f"no shipped default for {kernel} {dtype} d{head_dim} on {target}")
    assert record.error is None, record.reason
    assert record.total_shared_bytes <= ARCHS[target].smem_per_block, record.reason
    if (target, variant, kernel, head_dim, dtype) in VARIANT_SPILLS:
        name = shipped.entry_name(TUNE_KERNEL.get(kernel, "bwd"), aot_report.TORCH_DTYPE_NAMES[dtype], head_dim,
                                  head_dim)
        recorded = shipped.load_target(target)["tile_configs"][name]["variant_spills"][variant][kernel]
        assert (record.spill_count or 0, record.spill_bytes or 0) == (
            recorded["spilled_registers"], recorded["spill_bytes"]), record.reason
        assert record.matrix_instr == (record.expected_matrix_instr or record.matrix_instr), record.reason
        pytest.xfail(VARIANT_SPILLS[target, variant, kernel, head_dim, dtype])
    assert (record.spill_bytes or 0) <= aot.MAX_SPILL_BYTES and not record.spill_count, record.reason
    if dtype != "fp32" and (target, kernel, head_dim) in SLOWER_INSTRUCTION_ON_PURPOSE:  # fp32: FMA or MFMA
        tune_kernel = TUNE_KERNEL.get(kernel, "bwd")
        dtype_name = aot_report.TORCH_DTYPE_NAMES[dtype]
        entries = shipped.load_target(target)["tile_configs"]
        checked = entries[shipped.entry_name(tune_kernel, dtype_name, head_dim, head_dim)]["checked"]
        assert "no config with the fast matrix instruction avoided spills" in checked, checked
        return
    assert record.matrix_instr == (record.expected_matrix_instr or record.matrix_instr), record.reason
    assert record.fits, record.reason


@pytest.mark.slow
@pytest.mark.parametrize("target", AOT_TARGETS)
@pytest.mark.parametrize("tune_kernel", ["fwd", "bwd", "decode"])
def test_config_space_is_pruned_to_configs_that_fit(tune_kernel, target):
    """The whole autotune space at bf16 D=128 compiles, fits and does not spill: on every target but gfx1100 the
    static estimate pruned it; on gfx1100 (no estimate predicts RDNA3's spills) it is the configs that compiled
    without a spill (``tuning/measured_space``)."""
    jobs = aot_report.plan([target], [(None, None)], ["bf16"], [128], list(aot_report.LAUNCHES[tune_kernel]),
                           source="space")  # fmt: skip
    assert jobs
    records = aot.compile_jobs(jobs)
    rejected = [r.reason for r in records if not r.fits]
    assert not rejected, "\n".join(rejected)


def _refused_cases() -> list:
    return [pytest.param(target, tune_kernel, dtype, head_dim, id=f"{target}-{tune_kernel}-{dtype}-d{head_dim}")
            for target, tune_kernel, head_dim, dtype in REFUSED]


def test_exactly_the_refused_kernels_ship_no_config():
    """Every shipped entry without a config is in ``REFUSED`` and each ``REFUSED`` case has such entries."""
    found = set()
    for target in AOT_TARGETS:
        for name, entry in shipped.load_target(target)["tile_configs"].items():
            if "config" not in entry:
                tune_kernel, dtype_name, dims = name.split()
                found.add((target, tune_kernel, int(dims.removeprefix("d").split("/")[0]), dtype_name))
    expected = {(target, kernel, head_dim, aot_report.TORCH_DTYPE_NAMES[dtype])
                for target, kernel, head_dim, dtype in REFUSED}
    assert found == expected


@pytest.mark.parametrize("target, tune_kernel, dtype, head_dim", _refused_cases())
def test_kernel_without_a_spill_free_tile_is_refused(target, tune_kernel, dtype, head_dim):
    """The entry records a least-spilling tile that does spill, and triton_flex refuses the calls that would
    launch the kernel on that target, naming it; the other kernels of the same dtype and head dim still run."""
    dtype_name = aot_report.TORCH_DTYPE_NAMES[dtype]
    name = shipped.entry_name(tune_kernel, dtype_name, head_dim, head_dim)
    entry = shipped.load_target(target)["tile_configs"][name]
    least = entry["no_spill_free_tile"]["least_spilling"]
    assert any(launch["spilled_registers"] or launch["spill_bytes"] for launch in least["launches"].values())
    launches = set(aot_report.LAUNCHES[tune_kernel])
    assert launches - aot_report.MOD_FREE <= set(least["launches"]) <= launches
    assert shipped.lookup(tune_kernel, target, dtype_name, head_dim, head_dim) is None

    caps = DeviceCaps.synthetic(target)
    grad = tune_kernel == "bwd"
    spec = AttentionSpec(batch=1, heads_q=4, heads_kv=4, seq_q=1 if tune_kernel == "decode" else 256, seq_kv=256,
                         head_dim=head_dim, head_dim_v=head_dim, dtype=getattr(torch, dtype_name),
                         device_type=ARCHS[target].vendor, requires_grad=grad)
    refusal = spill_refusals(spec, caps)[tune_kernel]
    assert str(refusal).startswith(REFUSED[target, tune_kernel, head_dim, dtype].format(dtype=dtype_name))
    assert least["tile"] in str(refusal) and "triton_flex is not offered there" in str(refusal)
    reasons = TritonFlexBackend().measured_refusals(spec, caps)
    forward_refused = (target, "fwd", head_dim, dtype) in REFUSED
    if tune_kernel == "decode":  # a decoding-sized call goes to the forward kernel instead, if that one fits
        assert not decoding(spec, caps) and decoding(spec)
        assert [r.code for r in reasons] == (["no_spill_free_tile"] * 2 if forward_refused else [])
    else:
        assert refusal in reasons
    if tune_kernel == "bwd" and not forward_refused:  # inference on the same shapes keeps the forward kernel
        assert TritonFlexBackend().measured_refusals(replace(spec, requires_grad=False), caps) == []


def test_a_config_tuned_on_the_device_lifts_the_refusal(monkeypatch, tmp_path):
    """A user-cache entry (tuned on that GPU: timed there) for a refused kernel lets triton_flex run it, with the
    tuned config; the refusal stays for the other dtype, which nothing tuned."""
    from dispatchattn.tuning import lookup as select
    from dispatchattn.tuning import store
    from dispatchattn.tuning.key import make_key

    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path / "cache"))
    select.clear_memo()
    store.clear_memory()
    target, tune_kernel, head_dim, _ = next(case for case in REFUSED if case[3] == "bf16")
    caps = DeviceCaps.synthetic(target)
    spec = AttentionSpec(batch=1, heads_q=4, heads_kv=4, seq_q=256, seq_kv=256, head_dim=head_dim,
                         head_dim_v=head_dim, dtype=torch.bfloat16, device_type=ARCHS[target].vendor,
                         requires_grad=True)
    assert [r.code for r in TritonFlexBackend().measured_refusals(spec, caps)] == ["no_spill_free_tile"]
    tuned = TileConfig(16, 16, 8, 1)
    key = make_key(tune_kernel, spec, caps)
    store.put(select.user_cache_path(key), key.entry, {"config": tuned.to_dict()}, key.header)
    assert TritonFlexBackend().measured_refusals(spec, caps) == []
    config, source = select.select_config(tune_kernel, spec, caps)
    assert config == tuned and source.startswith("user cache")
    fp16 = replace(spec, dtype=torch.float16)
    assert [r.code for r in TritonFlexBackend().measured_refusals(fp16, caps)] == ["no_spill_free_tile"]


@pytest.mark.slow
@pytest.mark.parametrize("target, tune_kernel, dtype, head_dim", _refused_cases())
def test_the_least_spilling_tile_does_spill(target, tune_kernel, dtype, head_dim):
    """Recompile the recorded least-spilling tile: it still spills (else it should ship)."""
    name = shipped.entry_name(tune_kernel, aot_report.TORCH_DTYPE_NAMES[dtype], head_dim, head_dim)
    least = shipped.load_target(target)["tile_configs"][name]["no_spill_free_tile"]["least_spilling"]
    config = TileConfig.from_dict(least["config"])
    jobs = [aot.make_job(launch, config, target, dtype, head_dim) for launch in least["launches"]]
    records = aot.compile_jobs(jobs, workers=2)
    assert any(not r.fits and (r.spill_bytes or r.spill_count) for r in records), [r.reason for r in records]


def test_variant_spills_are_recorded_exactly():
    """The shipped entries' ``variant_spills`` (bf16 and fp16 alike) name exactly the ``VARIANT_SPILLS`` cases."""
    found = set()
    for target in AOT_TARGETS:
        for name, entry in shipped.load_target(target)["tile_configs"].items():
            tune_kernel, dtype_name, dims = name.split()
            for variant, launches in entry.get("variant_spills", {}).items():
                for launch, spill in launches.items():
                    assert spill["spilled_registers"] or spill["spill_bytes"], (target, name, variant, launch)
                    found.add((target, variant, launch, int(dims.removeprefix("d").split("/")[0]), dtype_name))
    expected = {(*case[:4], aot_report.TORCH_DTYPE_NAMES[case[4]]) for case in VARIANT_SPILLS}
    assert found == expected


#: Targets whose shipped bf16/fp16 tiles were checked with every ``CHECKED_VARIANTS`` variant (the gathered tables
#: included), compiled as a launch specialises its arguments, with the oldest and newest supported Triton.
CHECKED_WITH_BOTH_TRITONS = ("sm_80", "sm_90", "gfx942")


@pytest.mark.parametrize("target", CHECKED_WITH_BOTH_TRITONS)
def test_compile_check_covers_the_catalogue_variants(target):
    """The shipped tiles were checked with every variant the tests compile, under Triton 3.6 and 3.9."""
    assert tuple(aot_report.CHECKED_VARIANTS) == compile_check.ALL_VARIANTS
    checked = shipped.load_target(target)["produced"]["checked_by_dtype"]
    for dtype in ("bfloat16", "float16"):
        assert checked[dtype]["variants"] == list(aot_report.CHECKED_VARIANTS), (target, dtype)
        assert {"3.6.0", "3.9.0"} <= set(checked[dtype]["tritons"]), (target, dtype)
        assert checked[dtype]["aot_format"] == aot.FORMAT_VERSION, (target, dtype)


def test_the_compile_sees_the_shared_memory_the_device_needed():
    """On an H200 (Triton 3.6) the sm_90 forward at D=64 with 128x128 w8 s3 and a bias table gathered through a
    clamp raised ``OutOfResources: shared memory, Required: 245760, Hardware limit: 232448``.  Compiled as a
    launch specialises its arguments (unit strides as constants, 16-divisible ints and tensors marked), the check
    needs exactly that (plus 1,024 B static) with Triton 3.6 and 3.9 alike; the shipped D=64 tile fits it."""
    score = aot_report.SCORES["clamped_bias"]()
    record = aot.compile_report("fwd", TileConfig(128, 128, 8, 3), "sm_90", "bf16", 64, score_mod=score)
    assert record.shared_bytes == 245_760 and record.total_shared_bytes > ARCHS["sm_90"].smem_per_block
    assert "needs 246,784 B shared memory > 232,448 B on sm_90" in record.reason
    shipped_tile = aot_report.shipped_config("fwd", "sm_90", "bf16", 64)
    record = aot.compile_report("fwd", shipped_tile, "sm_90", "bf16", 64, score_mod=score)
    assert record.total_shared_bytes <= ARCHS["sm_90"].smem_per_block, record.reason


def _fake_variant_round(calls: list):
    """Stands in for compiling with variants: the plain kernels spill above 64x64 tiles, relative_bias above
    32x32, and the backward's dK/dV at D=128 spills with alibi on every tile (4 VGPRs with 8 warps, else 9)."""
    from types import SimpleNamespace

    def fake_round(pending, target, workers, variants=("plain",)):
        calls.append(tuple(variants))
        reasons, records = {}, {}
        for (name, config), (kernel, _dtype, head_dim) in pending.items():
            area = config.block_m * config.block_n
            owner_reasons, owner_records = [], []
            for variant in variants:
                for launch in compile_check.LAUNCHES[kernel]:
                    spilled = 3 if area > 64 * 64 or (variant == "relative_bias" and area > 32 * 32) else 0
                    if (kernel, head_dim, variant, launch) == ("bwd", 128, "alibi", "bwd_dkdv"):
                        spilled = 4 if config.num_warps == 8 else 9
                    owner_reasons.append(f"{launch} spills registers on {target}" if spilled else None)
                    owner_records.append(SimpleNamespace(
                        kernel=launch, variant=variant, total_shared_bytes=1024, registers=256,
                        spill_count=spilled, spill_bytes=4 * spilled, matrix_instr="wmma",
                        expected_matrix_instr="wmma"))
            reasons[(name, config)], records[(name, config)] = owner_reasons, owner_records
        return reasons, records

    return fake_round


def test_compile_check_picks_tiles_that_fit_every_variant(monkeypatch):
    """A tile must fit with every variant: relative_bias pushes the forward from 64x64 down to 32x32; where one
    variant spills on every tile but the plain kernels fit, the least-spilling tile ships with its spills named."""
    calls: list = []
    monkeypatch.setattr(compile_check, "_compile_round", _fake_variant_round(calls))
    plain_only = shipped.heuristic_document("gfx1100")
    compile_check.verify_document(plain_only, "gfx1100")
    document = shipped.heuristic_document("gfx1100")
    log = compile_check.verify_document(document, "gfx1100", variants=compile_check.ALL_VARIANTS)
    compile_check.copy_checked(document)
    assert set(calls) == {("plain",), compile_check.ALL_VARIANTS}
    plain_fwd = TileConfig.from_dict(plain_only["tile_configs"]["fwd bfloat16 d128/128"]["config"])
    assert plain_fwd.block_m * plain_fwd.block_n == 64 * 64
    for dtype in ("bfloat16", "float16"):
        fwd = document["tile_configs"][f"fwd {dtype} d128/128"]
        config = TileConfig.from_dict(fwd["config"])
        assert config.block_m * config.block_n <= 32 * 32 and "variant_spills" not in fwd
        assert f"{len(compile_check.ALL_VARIANTS)} variants" in fwd["checked"] and "no spills" in fwd["checked"]
        bwd = document["tile_configs"][f"bwd {dtype} d128/128"]
        config = TileConfig.from_dict(bwd["config"])
        assert config.num_warps == 8 and config.block_m * config.block_n <= 32 * 32
        assert bwd["variant_spills"] == {"alibi": {"bwd_dkdv": {"spilled_registers": 4, "spill_bytes": 16,
                                                                "registers": 256}}}
        assert "no config tried fits every variant" in bwd["checked"]
    assert any(line.startswith("gfx1100 bwd bfloat16 d128/128: ") and "spills with alibi (bwd_dkdv)" in line
               for line in log), log


def test_compile_check_keeps_the_previously_shipped_tile_where_it_still_fits(monkeypatch):
    """A seed (the tile the file shipped before, some found by hand) is tried in the first round with the
    heuristic's: where the heuristic's spills and the seed fits every variant, the seed ships, unshrunk."""
    monkeypatch.setattr(compile_check, "_compile_round", _fake_variant_round([]))
    document = shipped.heuristic_document("gfx1100")
    heuristic = TileConfig.from_dict(document["tile_configs"]["fwd bfloat16 d64/64"]["config"])
    assert heuristic.block_m * heuristic.block_n > 32 * 32  # spills with relative_bias in the fake
    seed = TileConfig(16, 64, num_warps=2, num_stages=1)
    compile_check.verify_document(document, "gfx1100", variants=compile_check.ALL_VARIANTS,
                                  seeds={"fwd bfloat16 d64/64": seed})
    assert TileConfig.from_dict(document["tile_configs"]["fwd bfloat16 d64/64"]["config"]) == seed
    unseeded = shipped.heuristic_document("gfx1100")
    compile_check.verify_document(unseeded, "gfx1100", variants=compile_check.ALL_VARIANTS)
    assert TileConfig.from_dict(unseeded["tile_configs"]["fwd bfloat16 d64/64"]["config"]) != seed


def test_compile_check_searches_best_first_and_never_compiles_a_config_twice(monkeypatch):
    """A seed that passes gives way to a larger config that passes too (the search goes on while something
    preferred is queued), and no (entry, config) is compiled twice."""
    fake, compiled = _fake_variant_round([]), []

    def counting_round(pending, target, workers, variants=("plain",)):
        compiled.extend(pending)
        return fake(pending, target, workers, variants)

    monkeypatch.setattr(compile_check, "_compile_round", counting_round)
    document = shipped.heuristic_document("gfx1100")
    name = "fwd bfloat16 d64/64"
    heuristic = TileConfig.from_dict(document["tile_configs"][name]["config"])
    assert heuristic.block_m * heuristic.block_n > 64 * 64  # the plain kernels spill with it in the fake
    seed = TileConfig(16, 16, num_warps=4, num_stages=1)
    compile_check.verify_document(document, "gfx1100", seeds={name: seed})
    shipped_config = TileConfig.from_dict(document["tile_configs"][name]["config"])
    assert shipped_config.block_m * shipped_config.block_n == 64 * 64  # the largest tile the fake lets through
    assert len(compiled) == len(set(compiled))


def test_compile_check_with_two_tritons_ships_only_what_fits_under_both(monkeypatch):
    """Each round compiles under every interpreter's Triton: a tile one of them rejects does not ship, and the entry
    says which Tritons compiled it."""
    fake, seen = _fake_variant_round([]), []

    def two_tritons(pending, target, workers, variants=("plain",), pythons=(None,)):
        seen.append(tuple(pythons))
        reasons, records = fake(pending, target, workers, variants)
        for (name, config), owner_reasons in reasons.items():
            if "old" in pythons and name.startswith("fwd") and config.block_m * config.block_n > 32 * 16:
                owner_reasons[0] = f"fwd needs 300,000 B shared memory > 65,536 B on {target}"
        return reasons, records

    monkeypatch.setattr(compile_check, "_compile_round", two_tritons)
    monkeypatch.setattr(aot_cache, "triton_version", lambda python=None: "3.6.0" if python == "old" else "3.9.0")
    document = shipped.heuristic_document("gfx1100")
    compile_check.verify_document(document, "gfx1100", pythons=("old", None))
    assert set(seen) == {("old", None)}
    fwd = document["tile_configs"]["fwd bfloat16 d128/128"]
    config = TileConfig.from_dict(fwd["config"])
    assert config.block_m * config.block_n <= 32 * 16
    assert fwd["checked"].startswith("compiled with Triton 3.6.0 and 3.9.0 for gfx1100")


def test_compile_check_of_one_dtype_keeps_the_others_checked_entries(monkeypatch, tmp_path, capsys):
    """``--dtypes float32`` compiles the float32 entries only: the file's checked bf16 and fp16 entries stay as
    they were, ``dtypes_checked`` lists all three; ``checked_by_dtype`` says what each dtype was checked with, and
    ``variants_checked`` the variants every dtype was."""
    import json

    monkeypatch.setattr(compile_check, "_compile_round", _fake_variant_round([]))
    defaults.write_heuristic_defaults(tmp_path, compile_check=True, targets=["gfx1100"])
    before = json.loads((tmp_path / "gfx1100.json").read_text())
    assert before["produced"]["dtypes_checked"] == ["bfloat16", "float16"]
    assert not any("checked" in e for n, e in before["tile_configs"].items() if "float32" in n)
    compiled: list = []
    fake = _fake_variant_round([])

    def counting_round(pending, *args, **kwargs):
        compiled.extend(pending)
        return fake(pending, *args, **kwargs)

    monkeypatch.setattr(compile_check, "_compile_round", counting_round)
    defaults.write_heuristic_defaults(tmp_path, compile_check=True, targets=["gfx1100"], dtypes=("float32",))
    after = json.loads((tmp_path / "gfx1100.json").read_text())
    assert {name.split()[1] for name, _config in compiled} == {"float32"}
    assert after["produced"]["dtypes_checked"] == ["bfloat16", "float16", "float32"]
    for name, entry in after["tile_configs"].items():
        assert "checked" in entry, name
        if "float32" not in name:
            assert entry == before["tile_configs"][name], name
    by_dtype = after["produced"]["checked_by_dtype"]
    assert by_dtype["float32"] == by_dtype["bfloat16"] == {"variants": list(compile_check.ALL_VARIANTS),
                                                           "tritons": [aot_cache.triton_version()],
                                                           "aot_format": aot.FORMAT_VERSION}
    defaults.write_heuristic_defaults(tmp_path, compile_check=True, targets=["gfx1100"], dtypes=("float32",),
                                      variants=("plain",))
    plain_fp32 = json.loads((tmp_path / "gfx1100.json").read_text())["produced"]
    assert plain_fp32["checked_by_dtype"]["float32"]["variants"] == ["plain"]
    assert plain_fp32["checked_by_dtype"]["bfloat16"] == by_dtype["bfloat16"]
    assert plain_fp32["variants_checked"] == ["plain"]
    with pytest.raises(ValueError, match="dtypes: expected bfloat16 and/or float32"):
        defaults.write_heuristic_defaults(tmp_path, compile_check=True, targets=["gfx1100"], dtypes=("float16",))


@pytest.mark.parametrize("dtype", sorted({case[4] for case in VARIANT_SPILLS}))
def test_the_config_source_names_the_mods_its_tile_spills_with(dtype):
    """Where the shipped tile spills with some checked mods (``VARIANT_SPILLS``), the config's source sentence (what
    explain prints) names them with what they spill and how to get a tile that fits."""
    from dispatchattn.tuning import lookup as select

    select.clear_memo()
    cases = {(t, TUNE_KERNEL.get(launch, "bwd"), d) for t, _v, launch, d, dt in VARIANT_SPILLS if dt == dtype}
    for target, tune_kernel, head_dim in cases:
        spec = AttentionSpec(batch=1, heads_q=4, heads_kv=4, seq_q=1 if tune_kernel == "decode" else 256,
                             seq_kv=256, head_dim=head_dim, head_dim_v=head_dim,
                             dtype=getattr(torch, aot_report.TORCH_DTYPE_NAMES[dtype]),
                             device_type=ARCHS[target].vendor, requires_grad=tune_kernel == "bwd")
        _config, source = select.select_config(tune_kernel, spec, DeviceCaps.synthetic(target))
        assert "spills registers when the mods are" in source and "python -m dispatchattn tune" in source, source
        for variant in {v for t, v, launch, d, dt in VARIANT_SPILLS
                        if (t, TUNE_KERNEL.get(launch, "bwd"), d, dt) == (target, tune_kernel, head_dim, dtype)}:
            assert f"{variant} (" in source, source
        assert "softcap" not in source  # fits
