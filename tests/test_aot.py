"""The ahead-of-time checker itself: resource parsing, reasons, the record cache and the worker processes.

The compile tests use a small flash-attention loop defined here (bf16, BLOCK_M x BLOCK_N tiles,
``tl.dot``), so the checker is tested independently of the triton_flex kernels; those are covered,
config by config and target by target, in ``test_aot_kernels.py``.
"""

from __future__ import annotations

import json

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dispatchattn.tools import aot, aot_cache, aot_compile  # noqa: E402
from dispatchattn.tuning.config import TileConfig  # noqa: E402
from dispatchattn.vendor_tables import ARCHS  # noqa: E402


@triton.jit
def toy_attention_fwd(Q, K, V, Out, stride_m, N_CTX, sm_scale, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One (BLOCK_M x HEAD_DIM) query tile against all keys, online softmax in base 2."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_m + offs_d[None, :])
    row_max = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N_CTX, BLOCK_N):
        rows = (start_n + offs_n)[:, None] * stride_m + offs_d[None, :]
        k = tl.load(K + rows)
        scores = tl.dot(q, tl.trans(k)) * sm_scale
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        alpha = tl.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), tl.load(V + rows))
        row_max = new_max
    tl.store(Out + offs_m[:, None] * stride_m + offs_d[None, :], (acc / row_sum[:, None]).to(tl.bfloat16))


TOY_SIGNATURE = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "stride_m": "i32", "N_CTX": "i32",
    "sm_scale": "fp32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
}  # fmt: skip
TOY_TARGETS = ("sm_90", "gfx942", "gfx1100")


def toy_job(target: str, config: TileConfig | None = None, head_dim: int = 64) -> aot.AotJob:
    config = config or TileConfig(64, 64, 4, 2)
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n}
    return aot.AotJob("toy_fwd", "plain", target, config, "bf16", head_dim, head_dim,
                      aot.fn_ref(toy_attention_fwd), TOY_SIGNATURE, constexprs)  # fmt: skip


@pytest.fixture(scope="module")
def toy_records() -> dict[str, aot.AotRecord]:
    """The toy kernel compiled once per target (cold: in 2 worker processes; warm: read from the cache)."""
    jobs = [toy_job(target) for target in TOY_TARGETS]
    records = aot.compile_jobs(jobs, workers=2)
    return {job.target: record for job, record in zip(jobs, records)}


@pytest.mark.parametrize("target", TOY_TARGETS)
def test_toy_kernel_compiles_fits_and_uses_matrix_instructions(toy_records, target):
    record = toy_records[target]
    assert record.error is None
    assert record.fits, record.reason
    assert record.matrix_instr == ARCHS[target].matrix_instr
    assert 0 < record.total_shared_bytes <= ARCHS[target].smem_per_block
    assert 0 < record.registers <= ARCHS[target].max_regs_per_thread
    assert record.spill_bytes == 0 and record.compile_seconds > 0


def test_oversized_tile_is_rejected_with_the_numbers():
    job = toy_job("sm_86", TileConfig(128, 128, 4, 3), head_dim=128)
    record = aot.record_from_result(job, {"shared_bytes": 196_608, "static_shared_bytes": 0, "registers": 200,
                                          "spill_bytes": 0, "matrix_instr": "mma.sync"})  # fmt: skip
    assert not record.fits
    assert record.reason == (
        "toy_fwd BLOCK_M=128 BLOCK_N=128 D=128 warps=4 stages=3 bf16 needs 196,608 B shared memory"
        " > 101,376 B on sm_86 (A10 / RTX 3090)"
    )
    assert "shared memory" not in aot.reject_reason(record, ARCHS["sm_90"])  # the tile fits an H100's 227 KB


def test_warm_cache_compiles_nothing(toy_records, monkeypatch, tmp_path):
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path))
    job = toy_job("sm_90")
    result = {"shared_bytes": 1234, "registers": 99, "matrix_instr": "wgmma", "spill_bytes": 0}
    aot_cache.store(job.target, job.cache_key(), result)
    monkeypatch.setattr(aot, "compile_in_workers", lambda *a, **k: pytest.fail("compiled despite a warm cache"))
    (record,) = aot.compile_jobs([job])
    assert record.shared_bytes == 1234 and record.fits


def test_corrupt_cache_entry_is_recompiled(monkeypatch, tmp_path):
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path))
    job = toy_job("gfx942")
    path = aot_cache.path(job.target, job.cache_key())
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    calls = []
    monkeypatch.setattr(aot, "compile_in_workers", lambda payloads, *a: calls.append(1) or [{"error": "x"}])
    aot.compile_jobs([job])
    assert calls and json.loads(path.read_text()) == {"error": "x"}


def test_cache_key_changes_with_config_target_and_constants():
    base = toy_job("sm_90")
    assert base.cache_key() == toy_job("sm_90").cache_key()
    assert base.cache_key() != toy_job("sm_89").cache_key()
    assert base.cache_key() != toy_job("sm_90", TileConfig(64, 64, 4, 3)).cache_key()
    assert base.cache_key() != toy_job("sm_90", head_dim=128).cache_key()


def test_cache_key_changes_with_specialization_and_triton_version():
    base = toy_job("sm_90")
    unit_stride = aot.AotJob(**{**base.__dict__, "specialization": {"stride_m": "1"}})
    assert base.cache_key() != unit_stride.cache_key()
    assert base.cache_key() == base.cache_key(aot_cache.triton_version())
    assert base.cache_key() != base.cache_key("0.0.0")


def test_specialize_compiles_as_a_launch_on_the_device_would():
    """An int argument equal to 1 becomes a constant; a tensor or an int divisible by 16 gets ``tt.divisibility``
    16; on AMD a tensor also ``tt.pointer_range`` 32 (buffer operations): what Triton's launcher passes."""
    from triton.backends.compiler import GPUTarget

    job = {**toy_job("sm_90").payload(), "specialization": {"Q": "D", "stride_m": "1", "N_CTX": "D", "K": ""}}
    signature, constexprs, attrs = aot_compile.specialize(job, GPUTarget(*ARCHS["sm_90"].triton_target))
    assert signature["stride_m"] == "constexpr" and constexprs["stride_m"] == 1
    assert attrs == {(0,): [["tt.divisibility", 16]], (5,): [["tt.divisibility", 16]]}
    _, _, amd_attrs = aot_compile.specialize(job, GPUTarget(*ARCHS["gfx942"].triton_target))
    assert amd_attrs[(0,)] == [["tt.divisibility", 16], ["tt.pointer_range", 32]]
    assert amd_attrs[(5,)] == [["tt.divisibility", 16]]


def test_triton_version_of_an_interpreter():
    import sys

    assert aot_cache.triton_version(sys.executable) == aot_cache.triton_version() == triton.__version__


def test_kernel_that_cannot_be_loaded_is_an_error_record(monkeypatch, tmp_path):
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path))
    job = toy_job("sm_90")
    bad = aot.AotJob(**{**job.__dict__, "fn_ref": ("no_such_module_xyz", str(tmp_path / "missing.py"), "f")})
    (record,) = aot.compile_jobs([bad], workers=1)
    assert not record.fits and record.error and "does not compile for sm_90" in record.reason


def test_record_round_trips_through_json():
    record = aot.record_from_result(toy_job("gfx1100"), {"shared_bytes": 16384, "registers": 90, "occupancy": 8,
                                                         "matrix_instr": "wmma", "spill_bytes": 0})  # fmt: skip
    again = aot.AotRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and again.fits


# --- parsing and reasons, on text captured from real compiles ----------------------------------------

CUOBJDUMP = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function attn_fwd:
  REG:255 STACK:3232 SHARED:1024 LOCAL:0 CONSTANT[0]:424 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
AMDGCN = """
\tv_mfma_f32_32x32x8_bf16 a[0:15], v[2:3], v[4:5], a[0:15]
; ScratchSize: 312
; Occupancy: 5
    .group_segment_fixed_size: 0
    .agpr_count:     0
    .sgpr_spill_count: 76
    .vgpr_count:     256
    .vgpr_spill_count: 132
"""


def test_parse_cuobjdump_reads_the_function_not_the_common_section():
    assert aot_compile.parse_cuobjdump(CUOBJDUMP) == {"REG": 255, "STACK": 3232, "SHARED": 1024, "LOCAL": 0}


def test_parse_amdgcn_reads_registers_spills_scratch_occupancy():
    usage = aot_compile.parse_amdgcn(AMDGCN)
    assert usage == {"vgpr_count": 256, "vgpr_spill_count": 132, "agpr_count": 0, "sgpr_spill_count": 76,
                     "scratch": 312, "occupancy": 5, "static_lds": 0}  # fmt: skip


@pytest.mark.parametrize(
    "text, family",
    [
        ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}", "mma.sync"),
        ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}", "wgmma"),
        ("tcgen05.mma.cta_group::1.kind::f16 [%r1]", "tcgen05"),
        ("v_mfma_f32_32x32x8_bf16 a[0:15]", "mfma"),
        ("v_wmma_f32_16x16x16_bf16 v[0:7]", "wmma"),
        ("fma.rn.f32 %f1, %f2, %f3, %f4;", "none"),
    ],
)
def test_matrix_instruction_family(text, family):
    assert aot_compile.matrix_instructions(text)[0] == family


def test_spill_and_matrix_reasons_name_values_and_limits():
    spilled = aot.record_from_result(toy_job("gfx1100"), {"shared_bytes": 0, "registers": 256, "spill_bytes": 312,
                                                          "spill_count": 132, "matrix_instr": "none"})  # fmt: skip
    expected = "spills registers on gfx1100 (RX 7900 XTX): 132 VGPRs, 312 B of scratch per lane, at 256 VGPRs"
    assert expected in spilled.reason
    assert "uses none instead of wmma matrix instructions on gfx1100" in spilled.reason
    assert len(aot.reject_reasons(spilled)) == 2
