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

from dispatchattn.autotune_cache import shipped  # noqa: E402
from dispatchattn.autotune_cache.config import TileConfig  # noqa: E402
from dispatchattn.backends.triton_flex import aot, aot_report  # noqa: E402
from dispatchattn.backends.triton_flex.backend import TritonFlexBackend  # noqa: E402
from dispatchattn.capabilities import AOT_TARGETS, ARCHS, DeviceCaps  # noqa: E402
from dispatchattn.spec import AttentionSpec  # noqa: E402

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "decode")
#: Launches that do not read the mods: compiled for the plain variant only.
MOD_FREE_KERNELS = ("bwd_preprocess", "decode_reduce")
#: The autotuned kernel whose shipped config each launch runs with.
TUNE_KERNEL = {"fwd": "fwd", "decode": "decode", "decode_reduce": "decode"}
DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 128, 256)
#: Where the mods are compiled in the default suite: one target per vendor's newest matrix instruction.
MOD_TARGETS = ("sm_90", "gfx942")
#: (target, kernel, head dim) whose shipped default uses the older matrix instruction on purpose: every
#: tile that gets the fast one spills (measured with Triton 3.9; the entry's ``checked`` says so), so the
#: largest non-spilling config ships instead.
SLOWER_INSTRUCTION_ON_PURPOSE = {
    ("sm_90", "bwd_dkdv", 256): "wgmma tiles (64 rows) spill at D=256: 64x32 w8 s2 832 B; 32x32 w8 s2 uses mma.sync",
    ("sm_90", "bwd_dq", 256): "the same config as bwd_dkdv (one backward config); BLOCK_M=32 uses mma.sync",
    ("sm_100", "fwd", 256): "every tcgen05 tile tried spilled at D=256; 32x64 w8 s3 fits with mma.sync",
    ("sm_100", "bwd_dkdv", 256): "every tcgen05 tile tried spilled at D=256; 32x32 w8 s2 fits with mma.sync",
    ("sm_100", "bwd_dq", 256): "the same config as bwd_dkdv (one backward config); 32x32 uses mma.sync",
    ("sm_90", "decode", 256): "every 64-row (wgmma) decoding tile spills at D=256; 16x32 w8 s3 fits with mma.sync",
    ("sm_100", "decode", 256): "every 64-row (tcgen05) decoding tile spills at D=256; 16x32 w8 s3 uses mma.sync",
}
#: (target, tuned kernel, head dim) whose shipped entries (bf16 and fp16) hold no config: every config tried
#: spills (measured with Triton 3.9 by ``shipped --write --compile-check``; the entry's ``no_spill_free_tile``
#: records the least-spilling tile), so the triton_flex backend refuses that kernel on that target, with this
#: reason (its start; the rest names the least-spilling tile and what it spilled).  gfx1100 (RDNA3 WMMA, 256
#: VGPRs): the forward fits at every head dim (D=256: 16x32 w16), the decoding kernel too (one-pass loop, K
#: through transposed pointers), the backward up to D=128 (16x16 w8); at D=256 every backward tile spills.
REFUSED = {
    ("gfx1100", "bwd", 256): "on gfx1100 every backward tile spills at head_dim 256 in {dtype} (least: ",
}

#: gfx1100 runs at the edge of its 256 VGPRs, and its shipped tiles are chosen for the plain kernels: with them 10 of
#: the 60 mod-variant compiles spill (Triton 3.9, bf16): dK/dV at D=128 16x16 w8 for causal (37 VGPRs), sliding
#: window (30), alibi (38), relative_bias (54); relative_bias also fwd D=64 128x64 w8 (126 VGPRs, 508 B), fwd D=128
#: and D=256 (1 VGPR), dK/dV and dQ at D=64 (27 and 16) and decoding D=128 (2).  Not refused per mod: the rule
#: would have to cover user mods that nothing measured; a compile check over the catalogue variants that picks
#: tiles fitting all of them is the fix (not done).  Non-strict: most variants fit.
GFX1100_MODS = "gfx1100: some mod variants spill on the plain kernels' tiles (8..508 B per lane, measured)"


def in_default_suite(variant: str, kernel: str, target: str, dtype: str, head_dim: int) -> bool:
    """The representative set compiled by the default (not slow) suite; keep it within a few minutes cold."""
    if head_dim != 128:
        return False
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
                        if (target, TUNE_KERNEL.get(kernel, "bwd"), head_dim) in REFUSED:
                            continue  # never launched there: test_kernel_without_a_spill_free_tile_is_refused
                        marks = [] if in_default_suite(variant, kernel, target, dtype, head_dim) else [pytest.mark.slow]
                        if target == "gfx1100" and variant != "plain" and kernel not in MOD_FREE_KERNELS:
                            marks.append(pytest.mark.xfail(reason=GFX1100_MODS, strict=False))
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
    assert (record.spill_bytes or 0) <= aot.MAX_SPILL_BYTES and not record.spill_count, record.reason
    if (target, kernel, head_dim) in SLOWER_INSTRUCTION_ON_PURPOSE:
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
    """The whole autotune space at bf16 D=128: report which configs the static estimate lets through but
    the compiler rejects (the space should shrink to what fits)."""
    jobs = aot_report.plan([target], [(None, None)], ["bf16"], [128], list(aot_report.LAUNCHES[tune_kernel]),
                           source="space")  # fmt: skip
    records = aot.compile_jobs(jobs)
    rejected = [r.reason for r in records if not r.fits]
    if target == "gfx1100" and rejected:  # the static estimate does not model RDNA3's WMMA operand copies
        pytest.xfail(f"{len(rejected)} of {len(records)} gfx1100 configs spill; the estimate lets them through")
    assert not rejected, "\n".join(rejected)


def _refused_cases() -> list:
    return [pytest.param(target, tune_kernel, dtype, head_dim, id=f"{target}-{tune_kernel}-{dtype}-d{head_dim}")
            for target, tune_kernel, head_dim in REFUSED for dtype in DTYPES]


def test_exactly_the_refused_kernels_ship_no_config():
    """Every shipped entry without a config is in ``REFUSED`` and each ``REFUSED`` case has such entries."""
    found = set()
    for target in AOT_TARGETS:
        for name, entry in shipped.load_target(target)["tile_configs"].items():
            if "config" not in entry:
                tune_kernel, dtype_name, dims = name.split()
                found.add((target, tune_kernel, int(dims.removeprefix("d").split("/")[0]), dtype_name))
    expected = {(*case, aot_report.TORCH_DTYPE_NAMES[dtype]) for case in REFUSED for dtype in DTYPES}
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
    assert set(least["launches"]) == set(aot_report.LAUNCHES[tune_kernel]) - aot_report.MOD_FREE
    assert shipped.lookup(tune_kernel, target, dtype_name, head_dim, head_dim) is None

    caps = DeviceCaps.synthetic(target)
    grad = tune_kernel == "bwd"
    spec = AttentionSpec(batch=1, heads_q=4, heads_kv=4, seq_q=1 if tune_kernel == "decode" else 256, seq_kv=256,
                         head_dim=head_dim, head_dim_v=head_dim, dtype=getattr(torch, dtype_name),
                         device_type=ARCHS[target].vendor, requires_grad=grad)
    reasons = TritonFlexBackend().why_not(spec, caps)
    refusals = [r for r in reasons if r.code == "no_spill_free_tile"]
    assert refusals and str(refusals[0]).startswith(REFUSED[target, tune_kernel, head_dim].format(dtype=dtype_name))
    assert least["tile"] in str(refusals[0]) and "triton_flex is not offered there" in str(refusals[0])
    if tune_kernel == "bwd":  # inference on the same shapes keeps the forward kernel
        assert TritonFlexBackend().why_not(replace(spec, requires_grad=False), caps) == []


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
