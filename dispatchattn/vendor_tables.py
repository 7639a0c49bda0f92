"""The hardware facts: what each GPU architecture offers, and what the fixed-function attention libraries can do
per architecture, dtype, head dim and version.

Data only.  ``ARCHS`` is the one table of GPU architecture limits: the selector (through
``capabilities.DeviceCaps``), the autotune config space, the ahead-of-time compiler, the tests and
``python -m dispatchattn matrix`` all read it.  The ``flash`` and ``xformers`` backends read the library tables,
so the docs matrix cannot drift from the code.  Every number carries its source in a comment
("FA" = Dao-AILab/flash-attention, "XF" = facebookresearch/xformers v0.0.35).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
HALF = frozenset({F16, BF16})

# --------------------------------------------------------------------------------------------------
# GPU architectures
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchInfo:
    """Limits of one GPU architecture that decide which kernels and tile configs can run on it."""

    name: str  # "sm_90", "gfx942"
    vendor: str  # "cuda" or "rocm"
    flagship: str
    smem_per_block: int  # bytes, the opt-in maximum for one block / workgroup
    warp_size: int
    max_regs_per_thread: int  # architectural VGPRs (AMD: arch + accumulation VGPRs)
    bf16: bool
    matrix_instr: str | None  # the fp16/bf16 matrix instruction Triton emits: mma.sync / wgmma / tcgen05 / mfma / wmma
    dense_fp16_tflops: float

    @property
    def sm(self) -> tuple[int, int] | None:
        if self.vendor != "cuda":
            return None
        number = int(self.name.removeprefix("sm_"))
        return divmod(number, 10)

    @property
    def triton_target(self) -> tuple[str, int | str, int]:
        """Arguments of ``triton.backends.compiler.GPUTarget`` for this arch."""
        if self.vendor == "cuda":
            major, minor = self.sm
            return ("cuda", major * 10 + minor, self.warp_size)
        return ("hip", self.name, self.warp_size)


# Shared memory per block and warp sizes: CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability" (opt-in maximum: 96 KB sm_70, 64 KB sm_75, 163 KB sm_80, 99 KB sm_86/89/120,
# 227 KB sm_90/100); AMD CDNA2/CDNA3 ISA guides and the ROCm "GPU hardware specifications" table
# (64 KB LDS per workgroup on gfx90a/gfx942/gfx1100, 160 KB on gfx950).  Registers: 255 per thread on
# every NVIDIA arch (PTX ISA); 512 VGPRs (256 arch + 256 AccVGPR) on CDNA, 256 on RDNA3 wave32.
# Dense fp16 TFLOPS: vendor datasheets (flagship part).  Matrix instructions: what Triton 3.x lowers
# tl.dot to on each target (checked by `python -m dispatchattn aot`).
ARCHS: dict[str, ArchInfo] = {
    a.name: a
    for a in (
        ArchInfo("sm_70", "cuda", "V100", 96 * 1024, 32, 255, False, "mma.sync", 125),
        ArchInfo("sm_75", "cuda", "T4", 64 * 1024, 32, 255, False, "mma.sync", 65),
        ArchInfo("sm_80", "cuda", "A100", 163 * 1024, 32, 255, True, "mma.sync", 312),
        ArchInfo("sm_86", "cuda", "A10 / RTX 3090", 99 * 1024, 32, 255, True, "mma.sync", 125),
        ArchInfo("sm_89", "cuda", "L4 / RTX 4090", 99 * 1024, 32, 255, True, "mma.sync", 121),
        ArchInfo("sm_90", "cuda", "H100", 227 * 1024, 32, 255, True, "wgmma", 989),
        ArchInfo("sm_100", "cuda", "B200", 227 * 1024, 32, 255, True, "tcgen05", 2250),
        ArchInfo("sm_120", "cuda", "RTX 5090", 99 * 1024, 32, 255, True, "mma.sync", 209.5),
        ArchInfo("gfx90a", "rocm", "MI250X", 64 * 1024, 64, 512, True, "mfma", 383),
        ArchInfo("gfx942", "rocm", "MI300X", 64 * 1024, 64, 512, True, "mfma", 1307),
        ArchInfo("gfx950", "rocm", "MI355X", 160 * 1024, 64, 512, True, "mfma", 2500),
        ArchInfo("gfx1100", "rocm", "RX 7900 XTX", 64 * 1024, 32, 256, True, "wmma", 123),
    )
}

# The targets the ahead-of-time checks and shipped defaults cover (sm_70/sm_75 predate Triton's
# fp16 tensor-core attention paths that we ship configs for).
AOT_TARGETS: tuple[str, ...] = (
    "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "gfx90a", "gfx942", "gfx950", "gfx1100",
)


# --------------------------------------------------------------------------------------------------
# flash-attn
# --------------------------------------------------------------------------------------------------

#: Features a flash-attn entry point may have.  ``None`` in an implementation's table: not available.
FLASH_FEATURES = (
    "dropout", "window", "window_backward", "softcap", "alibi", "varlen", "deterministic", "lse", "backward",
)


@dataclass(frozen=True)
class FlashImpl:
    """One flash-attn entry point (a package + kernel family) and what it supports."""

    key: str  # "fa2", "fa3", "fa4", "fa2_ck", "fa2_triton_amd"
    label: str  # how reasons name it ("FA2", "FA3 (Hopper)", ...)
    library: str  # the ``Libraries`` field holding its version
    vendor: str  # "cuda" or "rocm"
    archs: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_head_dim: int
    #: feature -> first release that has it ("0" = every release of that package), None = never.
    features: dict[str, str | None] = field(default_factory=dict)
    min_version: str = "0"  # oldest release the backend translates to
    head_dim_multiple: int = 1  # head dims must be a multiple of this (1: the wrapper pads)
    source: str = ""

    def since(self, feature: str) -> str | None:
        return self.features.get(feature)


_FA2_FEATURES = {
    "dropout": "2.0.0",  # FA README: dropout fwd+bwd in every 2.x
    "window": "2.3.0",  # FA README "2.3: Local (i.e., sliding window) attention"
    "window_backward": "2.3.0",
    "softcap": "2.6.0",  # FA README "2.6: Softcapping"
    "alibi": "2.4.0",  # FA README "2.4: ALiBi (attention with linear bias)"
    "varlen": "2.0.0",  # flash_attn_varlen_func (renamed from flash_attn_unpadded_* in 2.0)
    "deterministic": "2.4.1",  # FA README "2.4: ALiBi ..., deterministic backward pass"; the argument: v2.4.1
    "lse": "2.0.0",  # return_attn_probs=True returns (out, softmax_lse, S_dmask) in all 2.x
    "backward": "2.0.0",
}

FLASH_IMPLS: dict[str, FlashImpl] = {
    i.key: i
    for i in (
        # FA csrc/flash_attn/flash_api.cpp: "FlashAttention only supports Ampere GPUs or newer" (CC >= 8.0);
        # setup.py FLASH_ATTN_CUDA_ARCHS default "80;90;100;120" (100/120 need CUDA >= 12.8).
        # fp16/bf16 only, head dim <= 256 ("FlashAttention forward only supports head dimension at most 256").
        # min 2.1.0: causal became bottom-right aligned in 2.1 (2.0 was top-left) [FA README "2.1"].
        FlashImpl("fa2", "FA2", "flash_attn", "cuda",
                  frozenset({"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"}), HALF, 256,
                  _FA2_FEATURES, min_version="2.1.0", source="FA flash_api.cpp, setup.py (v2.8.3)"),
        # FA hopper/setup.py, hopper/flash_api.cpp: sm90a kernels; no dropout, no ALiBi; hd <= 256.
        FlashImpl("fa3", "FA3 (Hopper)", "flash_attn_3", "cuda", frozenset({"sm_90"}), HALF, 256,
                  {"dropout": None, "window": "0", "window_backward": "0", "softcap": "0", "alibi": None,
                   "varlen": "0", "deterministic": "0", "lse": "0", "backward": "0"},
                  head_dim_multiple=8,  # FA hopper/flash_api.cpp: head size must be a multiple of 8
                  source="FA hopper/flash_attn_interface.py, hopper/setup.py"),
        # FA flash_attn/cute/interface.py: SM90 and SM10x kernel families (README targets Hopper and
        # Blackwell; SM8x/12x paths are not checked, so not claimed).  No dropout, no alibi_slopes.
        FlashImpl("fa4", "FA4 (CuTe)", "flash_attn_4", "cuda", frozenset({"sm_90", "sm_100"}), HALF, 256,
                  {"dropout": None, "window": "0", "window_backward": "0", "softcap": "0", "alibi": None,
                   "varlen": "0", "deterministic": "0", "lse": "0", "backward": "0"},
                  head_dim_multiple=8,  # FA cute/interface.py: hd 8..256 in steps of 8 on SM90
                  source="FA flash_attn/cute/interface.py (fa4-v4.0.0 betas)"),
        # FA setup.py validate_and_update_archs (v2.8.3): allowed_archs ["native", "gfx90a", "gfx950",
        # "gfx942"]; csrc/flash_attn_ck: softcap is accepted but
        # ignored by the CK kernels, so it is not claimed.
        FlashImpl("fa2_ck", "FA2 ROCm CK", "flash_attn", "rocm", frozenset({"gfx90a", "gfx942", "gfx950"}),
                  HALF, 256,
                  {**_FA2_FEATURES, "softcap": None, "deterministic": None},
                  min_version="2.1.0", source="FA setup.py, csrc/flash_attn_ck (v2.8.3)"),
        # FA flash_attn/flash_attn_triton_amd (FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE): CDNA and RDNA,
        # fp16/bf16/fp32.  v2.8.3 silently ignores window and softcap; later releases run the window
        # forward only and raise on softcap: neither is claimed.
        FlashImpl("fa2_triton_amd", "FA2 ROCm Triton", "flash_attn", "rocm",
                  frozenset({"gfx90a", "gfx942", "gfx950", "gfx1100"}), frozenset({F16, BF16, F32}), 256,
                  {**_FA2_FEATURES, "window": None, "window_backward": None, "softcap": None,
                   "deterministic": None},
                  min_version="2.1.0", source="FA flash_attn/flash_attn_triton_amd (v2.8.3)"),
    )
}

#: Entry points tried in this order on each vendor (first one that can run the call wins).  FA3 is the
#: tuned Hopper kernel, FA4 the Blackwell one; FA2 is the portable fallback (and the only one with
#: dropout and ALiBi).  On ROCm the kernel family is fixed by the build and the env variable.
FLASH_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("fa3", "fa4", "fa2"),
    "rocm": ("fa2_ck",),  # ("fa2_triton_amd",) when FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE
}


@dataclass(frozen=True)
class HeadDimRule:
    """A head-dim limit narrower than the implementation's ``max_head_dim`` on some archs."""

    impl: str
    archs: frozenset[str]
    max_head_dim: int
    backward_only: bool  # applies only when inputs require grad
    with_dropout_only: bool  # applies only when dropout_p > 0
    source: str


FLASH_HEAD_DIM_RULES: tuple[HeadDimRule, ...] = (
    # FA csrc/flash_attn/src/flash_bwd_launch_template.h, hdim256: GPUs with < 144 KB smem per block
    # (sm86/89 and sm120, 99 KB) run the hd 256 backward only without dropout (since 2.5.5); with
    # dropout it launches nothing.  Head dims above 192 round up to the 256 kernel.
    HeadDimRule("fa2", frozenset({"sm_86", "sm_89", "sm_120"}), 192, True, True,
                "FA flash_bwd_launch_template.h: hd 256 backward with dropout needs >= 144 KB smem"),
    # FA flash_attn/cute/interface.py: SM10x supports hd <= 128 (and the (192, 128) / (256, 256) MLA
    # shapes, with different V head dims, which dispatchattn does not route here).
    HeadDimRule("fa4", frozenset({"sm_100"}), 128, False, False, "FA flash_attn/cute/interface.py (SM100)"),
)

#: Entry points with a deterministic backward that does not cover every head dim.
FLASH_DETERMINISTIC_MAX_HEAD_DIM: dict[str, int] = {
    "fa3": 128,  # FA hopper/flash_api.cpp: deterministic backward not implemented for hd 256 (> 128 kernel)
}

# --------------------------------------------------------------------------------------------------
# xFormers memory_efficient_attention ops (XF ops/fmha/*.py, v0.0.35; checked against the installed
# package by tests/test_vendor_tables.py)
# --------------------------------------------------------------------------------------------------

_LOCAL = "LocalAttentionFromBottomRightMask"
_CAUSAL_BIASES = frozenset({
    "NoneType", "LowerTriangularMask", "LowerTriangularFromBottomRightMask",
    "BlockDiagonalMask", "BlockDiagonalCausalMask", "BlockDiagonalCausalLocalAttentionMask",
})


@dataclass(frozen=True)
class XformersOp:
    """One xFormers attention operator (forward + backward kernel pair)."""

    key: str  # "fa3", "fa2", "cutlass", "ck"
    names: tuple[str, str]  # xformers' (FwOp.NAME, BwOp.NAME) prefixes
    module: str  # xformers.ops.fmha.<module>
    vendor: str
    min_sm: tuple[int, int] | None  # CUDA compute capability range (None: no bound)
    max_sm: tuple[int, int] | None
    archs: frozenset[str] | None  # ROCm: gfx archs with kernels (None on CUDA)
    dtypes: frozenset[torch.dtype]
    max_k_forward: int
    max_k_backward: int
    min_k_forward: int
    min_k_backward: int
    dropout: bool
    biases_forward: frozenset[str]
    biases_backward: frozenset[str]
    source: str


XFORMERS_OPS: dict[str, XformersOp] = {
    op.key: op
    for op in (
        # XF ops/fmha/flash3.py: CC 8.0-9.0, fp16/bf16, K in [32, 256] fwd / [64, 256] bwd, no dropout.
        XformersOp("fa3", ("fa3F", "fa3B"), "flash3", "cuda", (8, 0), (9, 0), None, HALF, 256, 256, 32, 64,
                   False, _CAUSAL_BIASES | {_LOCAL, "LowerTriangularFromBottomRightLocalAttentionMask",
                                            "BlockDiagonalCausalFromBottomRightMask"},
                   _CAUSAL_BIASES | {_LOCAL, "LowerTriangularFromBottomRightLocalAttentionMask",
                                     "BlockDiagonalCausalFromBottomRightMask"}, "XF ops/fmha/flash3.py"),
        # XF ops/fmha/flash.py: CC >= 8.0, fp16/bf16, K <= 256, dropout (bwd K > 224 with dropout: sm80/90).
        XformersOp("fa2", ("fa2F", "fa2B"), "flash", "cuda", (8, 0), None, None, HALF, 256, 256, 0, 0,
                   True, _CAUSAL_BIASES | {_LOCAL, "LowerTriangularFromBottomRightLocalAttentionMask",
                                           "BlockDiagonalCausalFromBottomRightMask"},
                   _CAUSAL_BIASES | {_LOCAL, "LowerTriangularFromBottomRightLocalAttentionMask",
                                     "BlockDiagonalCausalFromBottomRightMask"}, "XF ops/fmha/flash.py"),
        # XF ops/fmha/cutlass.py: CC 5.0-9.0 (max since v0.0.33), fp32/fp16/bf16, K <= 65536, dropout,
        # tensor bias; no two-sided local mask.
        XformersOp("cutlass", ("cutlassF", "cutlassB"), "cutlass", "cuda", (5, 0), (9, 0), None,
                   frozenset({F16, BF16, F32}), 65536, 65536, 0, 0, True,
                   _CAUSAL_BIASES | {"Tensor", "LowerTriangularFromBottomRightLocalAttentionMask",
                                     "BlockDiagonalCausalFromBottomRightMask"},
                   _CAUSAL_BIASES | {"Tensor", "BlockDiagonalCausalFromBottomRightMask"},
                   "XF ops/fmha/cutlass.py"),
        # XF ops/fmha/ck.py: ROCm composable kernels, fp16/bf16, K <= 512 fwd / 256 bwd, dropout, tensor
        # bias.  CK fmha kernels target CDNA (gfx90a/gfx942/gfx950); RDNA3 (gfx1100) has none.
        XformersOp("ck", ("ckF", "ckB"), "ck", "rocm", None, None, frozenset({"gfx90a", "gfx942", "gfx950"}),
                   HALF, 512, 256, 0, 0, True,
                   _CAUSAL_BIASES | {"Tensor", "LowerTriangularFromBottomRightLocalAttentionMask",
                                     "BlockDiagonalCausalFromBottomRightMask"},
                   _CAUSAL_BIASES | {"Tensor", "LowerTriangularFromBottomRightLocalAttentionMask",
                                     "BlockDiagonalCausalFromBottomRightMask"}, "XF ops/fmha/ck.py"),
    )
}

#: Forward priority (XF ops/fmha/dispatch.py ``_dispatch_fw_priority_list``): [fa3, fa2, cutlass] on
#: CUDA, [ck] on ROCm.  xFormers picks the op itself; these tables only predict whether one exists.
XFORMERS_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("fa3", "fa2", "cutlass"), "rocm": ("ck",)}

#: Archs the matrix documents, in order.
MATRIX_ARCHS: tuple[str, ...] = (
    "sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120",
    "gfx90a", "gfx942", "gfx950", "gfx1100",
)


def sm_tuple(arch: str) -> tuple[int, int] | None:
    """"sm_90" -> (9, 0); None for gfx archs."""
    if not arch.startswith("sm_"):
        return None
    return divmod(int(arch.removeprefix("sm_")), 10)


def xformers_op_runs_on(op: XformersOp, arch: str) -> bool:
    """Whether ``op`` has kernels for ``arch`` (vendor and compute-capability range only)."""
    sm = sm_tuple(arch)
    if op.vendor == "rocm":
        return sm is None and op.archs is not None and arch in op.archs
    if sm is None:
        return False
    return (op.min_sm is None or sm >= op.min_sm) and (op.max_sm is None or sm <= op.max_sm)
