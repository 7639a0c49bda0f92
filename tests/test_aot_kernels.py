"""Every shipped default tile config of the triton_flex kernels, compiled for every GPU target without a GPU.

Each (variant, kernel, target, dtype, head dim) is its own test id.  A compile of the real kernels costs
10-60 s of CPU (spilling configs the most), so the default suite compiles a representative set: the plain
kernels for every target at the most common shape, the mods on one target per vendor.  Everything else is
``@pytest.mark.slow`` (the scheduled CI job), as is the sweep over the whole autotune config space.
Records are cached under ``cache_root()/aot/`` by kernel source, config, target and Triton version, so a
warm run reads JSON and compiles nothing.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from dispatchattn.autotune_cache import shipped  # noqa: E402
from dispatchattn.backends.triton_flex import aot, aot_report  # noqa: E402
from dispatchattn.capabilities import AOT_TARGETS, ARCHS  # noqa: E402

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
#: (target, kernel, head dim) where no tile avoids spills yet (an open problem, not a loosened bound), measured
#: with Triton 3.9 for the plain kernels.  gfx1100 (RDNA3 WMMA, 256 VGPRs): with the one-loop form of the
#: kernels the forward fits at D=64 and D=128 (32x16 w4) and the backward at D=64 (32x16 w2), but the dQ
#: backward spills at D=128 on every tile tried (16x16 w8: 34 spilled VGPRs), the forward and backward at
#: D=256, and the decoding kernel at D>=128 (16x64 w4: 1,720 B of scratch).
STILL_SPILLS = {
    ("gfx1100", "fwd", 256): "every gfx1100 forward tile spills at D=256",
    ("gfx1100", "bwd_dkdv", 128): "one backward config for dK/dV and dQ, and dQ spills on every gfx1100 tile at D=128",
    ("gfx1100", "bwd_dq", 128): "dQ spills on every gfx1100 tile at D=128 (16x16 w8: 34 VGPRs spilled)",
    ("gfx1100", "bwd_dkdv", 256): "every gfx1100 backward tile spills at D=256",
    ("gfx1100", "bwd_dq", 256): "every gfx1100 backward tile spills at D=256",
    ("gfx1100", "decode", 128): "every gfx1100 decoding tile spills at D=128 (16x64 w4: 1,720 B of scratch)",
    ("gfx1100", "decode", 256): "every gfx1100 decoding tile spills at D=256",
}

#: gfx1100 runs at the edge of its 256 VGPRs even where the plain kernels fit: mods that load a captured tensor
#: (relative_bias, alibi in the decoding kernel) spill 16..148 B per lane with the shipped tiles (measured).
GFX1100_MODS = "gfx1100: mods reading captured tensors spill a little on the plain kernels' tiles (16..148 B)"


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
                        marks = [] if in_default_suite(variant, kernel, target, dtype, head_dim) else [pytest.mark.slow]
                        if (target, kernel, head_dim) in STILL_SPILLS:  # strict: a fix must remove the entry
                            marks.append(pytest.mark.xfail(reason=STILL_SPILLS[target, kernel, head_dim], strict=True))
                        elif target == "gfx1100" and variant != "plain" and kernel not in MOD_FREE_KERNELS:
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
