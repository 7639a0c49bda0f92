"""Ahead-of-time compilation of the triton_flex kernels for GPUs that are not present.

A kernel that passes under ``TRITON_INTERPRET=1`` can still fail on hardware: the interpreter ignores
shared-memory limits, register pressure and matrix-instruction selection.  Here every (kernel, variant,
tile config, target) is compiled for real with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` on
this CPU-only machine, and its resources are checked against the limits in ``vendor_tables.ARCHS``:

>>> import dispatchattn as da
>>> from dispatchattn.tuning.config import TileConfig
>>> record = compile_report("bwd_dkdv", TileConfig(64, 128, 8, 3), "sm_86", "bf16", 128,
...                         mask_mod=da.masks.causal())  # doctest: +SKIP
>>> reject_reasons(record)[0]  # doctest: +SKIP
'bwd_dkdv BLOCK_M=64 BLOCK_N=128 D=128 warps=8 stages=3 bf16 (causal) needs 115,720 B shared memory > ...'

Compiles run in clean worker processes (``aot_compile.py``), in parallel, and every record is cached under
``cache_root()/aot/`` keyed by (kernel source hash, signature and constants, options, target, Triton version),
so a warm run reads JSON and compiles nothing.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict, dataclass, field, fields

import torch

from ..tuning.config import TileConfig
from ..vendor_tables import ARCHS, ArchInfo
from . import aot_cache
from .aot_compile import JIT_MARKER, compile_in_workers

FORMAT_VERSION = 2  # bump when the record or its cache key changes meaning (2: compiled as a launch specialises)
MAX_SPILL_BYTES = 0  # a shipped config may not spill at all (registers to local memory / scratch)
#: Kernels with no ``tl.dot`` (row-wise reductions): no matrix instruction is expected of them.
KERNELS_WITHOUT_DOT = frozenset({"bwd_preprocess", "decode_reduce"})


@dataclass(frozen=True)
class AotJob:
    """One compile to do: which ``@triton.jit`` function, specialised how, for which target and config."""

    kernel: str  # "fwd", "bwd_dkdv", ...
    variant: str  # "plain", "causal", "softcap_30", ...
    target: str  # a key of ARCHS
    config: TileConfig
    dtype: str  # "bf16" / "fp16" / "fp32"
    head_dim: int
    head_dim_v: int
    fn_ref: tuple[str, str, str]  # (module, file, function name): the worker imports it from there
    signature: dict = field(hash=False, compare=False)
    constexprs: dict = field(hash=False, compare=False)
    #: per runtime argument, how a launch on the device specialises it: ``kernels.launch_specialization``
    specialization: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def arch(self) -> ArchInfo:
        return ARCHS[self.target]

    def options(self) -> dict:
        """``triton.compile`` options: the config's launch options, fp fusion as Triton 3.9 defaults it."""
        return {**self.config.triton_options(self.arch.vendor), "enable_fp_fusion": True}

    def payload(self) -> dict:
        """What the worker process needs (picklable, no torch objects)."""
        return {
            "ref": self.fn_ref,
            "signature": self.signature,
            "constexprs": self.constexprs,
            "specialization": self.specialization,
            "target": self.arch.triton_target,
            "options": self.options(),
        }

    def source_files(self) -> list[str]:
        """The kernel's file and the files of every ``@triton.jit`` function passed as a constant."""
        refs = [v for v in self.constexprs.values() if isinstance(v, tuple) and v[:1] == (JIT_MARKER,)]
        return [self.fn_ref[1], *(ref[2] for ref in refs)]

    def cache_key(self, triton_version: str | None = None) -> str:
        """The record's cache key when compiled with Triton ``triton_version`` (default: this process's)."""
        constants = sorted((str(k), repr(v)) for k, v in self.constexprs.items())
        parts = [
            FORMAT_VERSION,
            triton_version or aot_cache.triton_version(),
            aot_cache.source_hash(self.source_files()),
            self.fn_ref[0],
            self.fn_ref[2],
            sorted(self.signature.items()),
            constants,
            sorted(self.specialization.items()),
            sorted(self.options().items()),
            self.arch.triton_target,
        ]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


@dataclass
class AotRecord:
    """What one (kernel, variant, config, target) costs on that target, and whether it may ship there."""

    kernel: str
    variant: str
    target: str
    config: dict
    dtype: str
    head_dim: int
    head_dim_v: int
    shared_bytes: int | None = None  # dynamic shared memory / LDS Triton requests at launch
    static_shared_bytes: int | None = None
    smem_limit: int = 0
    registers: int | None = None  # per thread (NVIDIA) / architectural VGPRs per lane (AMD)
    agpr_count: int | None = None  # AMD accumulation VGPRs (CDNA); None on NVIDIA
    register_limit: int = 0
    spill_bytes: int | None = None  # stack/local frame (NVIDIA), ScratchSize (AMD), bytes per thread
    spill_count: int | None = None  # spilled VGPRs (AMD only)
    sgpr_spill_count: int | None = None  # AMD SGPR spills (into VGPR lanes): reported, not rejected
    occupancy: int | None = None  # waves per SIMD as the AMD compiler reports it; None on NVIDIA
    matrix_instr: str = "none"
    expected_matrix_instr: str | None = None
    matrix_mnemonics: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    error: str | None = None
    triton_version: str = ""
    fits: bool = False
    reason: str | None = None

    @property
    def total_shared_bytes(self) -> int | None:
        if self.shared_bytes is None:
            return None
        return self.shared_bytes + (self.static_shared_bytes or 0)

    @property
    def tile(self) -> TileConfig:
        return TileConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AotRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _describe(record: AotRecord) -> str:
    cfg = record.tile
    dims = f"D={record.head_dim}" + (f" Dv={record.head_dim_v}" if record.head_dim_v != record.head_dim else "")
    tile = f"BLOCK_M={cfg.block_m} BLOCK_N={cfg.block_n} {dims} warps={cfg.num_warps} stages={cfg.num_stages}"
    text = f"{record.kernel} {tile}"
    return f"{text} {record.dtype}" + (f" ({record.variant})" if record.variant != "plain" else "")


def _expected_matrix_instr(kernel: str, dtype: str, arch: ArchInfo) -> str | None:
    """The arch's fp16/bf16 matrix instruction for kernels that multiply tiles; None otherwise (fp32: FMA)."""
    if dtype not in ("bf16", "fp16") or kernel in KERNELS_WITHOUT_DOT:
        return None
    return arch.matrix_instr


def _spill_text(record: AotRecord, arch: ArchInfo) -> str:
    if arch.vendor == "rocm":
        agprs = f" + {record.agpr_count} AGPRs" if record.agpr_count is not None else ""
        return (
            f"{record.spill_count or 0} VGPRs, {record.spill_bytes or 0:,} B of scratch per lane, at "
            f"{record.registers} VGPRs{agprs} (allowed spill {MAX_SPILL_BYTES} B)"
        )
    return (
        f"{record.spill_bytes or 0:,} B of local memory per thread at {record.registers} registers "
        f"(maximum {arch.max_regs_per_thread}; allowed spill {MAX_SPILL_BYTES} B)"
    )


def reject_reasons(record: AotRecord, arch: ArchInfo | None = None) -> list[str]:
    """Every reason ``record``'s config may not ship on ``arch`` (default: its target); [] if it may."""
    arch = arch or ARCHS[record.target]
    where = f"{arch.name} ({arch.flagship})"
    what = _describe(record)
    if record.error:
        return [f"{what} does not compile for {where}: {record.error}"]
    reasons = []
    total = record.total_shared_bytes or 0
    if total > arch.smem_per_block:
        reasons.append(f"{what} needs {total:,} B shared memory > {arch.smem_per_block:,} B on {where}")
    if (record.spill_bytes or 0) > MAX_SPILL_BYTES or (record.spill_count or 0) > 0:
        reasons.append(f"{what} spills registers on {where}: {_spill_text(record, arch)}")
    expected = _expected_matrix_instr(record.kernel, record.dtype, arch)
    if expected and record.matrix_instr != expected:
        reasons.append(f"{what} uses {record.matrix_instr} instead of {expected} matrix instructions on {where}")
    return reasons


def reject_reason(record: AotRecord, arch: ArchInfo | None = None) -> str | None:
    """Why ``record``'s config may not ship on ``arch`` (default: its target) in one sentence, or None."""
    reasons = reject_reasons(record, arch)
    return "; ".join(reasons) if reasons else None


def record_from_result(job: AotJob, result: dict, triton_version: str | None = None) -> AotRecord:
    """The record of ``job`` from the worker's raw ``result`` (compiled with Triton ``triton_version``, default this
    process's), with fit and reason decided from ARCHS."""
    resources = {k: v for k, v in result.items() if k in {f.name for f in fields(AotRecord)}}
    record = AotRecord(
        kernel=job.kernel,
        variant=job.variant,
        target=job.target,
        config=job.config.to_dict(),
        dtype=job.dtype,
        head_dim=job.head_dim,
        head_dim_v=job.head_dim_v,
        smem_limit=job.arch.smem_per_block,
        register_limit=job.arch.max_regs_per_thread,
        triton_version=triton_version or aot_cache.triton_version(),
        expected_matrix_instr=_expected_matrix_instr(job.kernel, job.dtype, job.arch),
        **resources,
    )
    record.reason = reject_reason(record)
    record.fits = record.reason is None
    return record


# --- compiling ---------------------------------------------------------------------------------------


def fn_ref(jit_fn) -> tuple[str, str, str]:
    """(module, file, name) of a ``@triton.jit`` (or interpreted) function, for a worker to import it."""
    fn = getattr(jit_fn, "fn", jit_fn)
    return fn.__module__, inspect.getsourcefile(fn), fn.__name__


def portable_constexprs(constexprs: dict) -> dict:
    """``constexprs`` with each ``@triton.jit`` function replaced by a reference the worker imports."""
    from triton.runtime.jit import KernelInterface

    return {
        key: (JIT_MARKER, *fn_ref(value)) if isinstance(value, KernelInterface) else value
        for key, value in constexprs.items()
    }


def compile_jobs(
    jobs: list[AotJob], workers: int | None = None, use_cache: bool = True, progress=None, python: str | None = None
) -> list[AotRecord]:
    """Records of ``jobs`` in order: cached ones read from disk, the rest compiled in parallel and cached.

    ``workers``: compile processes (default: the usable CPUs); ``progress(done, total)`` while compiling.
    ``python``: the interpreter the workers run (default: this one), so its environment's Triton compiles; records
    are cached per Triton version and say which one compiled them (``triton_version``).
    """
    version = aot_cache.triton_version(python)
    keys = [job.cache_key(version) for job in jobs]  # before compiling: sources may change while it runs
    results = [aot_cache.load(job.target, key, version) if use_cache else None for job, key in zip(jobs, keys)]
    missing = [i for i, result in enumerate(results) if result is None]
    if missing:
        fresh = compile_in_workers([jobs[i].payload() for i in missing], workers, progress, python)
        for i, result in zip(missing, fresh):
            results[i] = result
            if not result.pop("transient", False):
                aot_cache.store(jobs[i].target, keys[i], result, version)
    return [record_from_result(job, result, version) for job, result in zip(jobs, results)]


# --- the triton_flex kernels -------------------------------------------------------------------------

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def variant_name(mask_mod=None, score_mod=None) -> str:
    """ "plain", or the mods' names joined: "causal", "sliding_window_256+softcap_30"."""
    names = [getattr(mod, "__name__", type(mod).__name__) for mod in (mask_mod, score_mod) if mod is not None]
    return "+".join(names) or "plain"


def make_job(
    kernel: str,
    config: TileConfig,
    target: str,
    dtype: str | torch.dtype = "bf16",
    head_dim: int = 128,
    head_dim_v: int | None = None,
    *,
    mask_mod=None,
    score_mod=None,
    variant: str | None = None,
    generated=None,
    **flags,
) -> AotJob:
    """The compile job of ``kernel`` of the generated (``score_mod``, ``mask_mod``) variant on ``target``.

    ``generated``: the output of ``codegen.generate(score_mod, mask_mod)`` when the caller has it already.
    ``flags`` go to ``kernels.aot_entry`` (``seq_divisible``, ``write_lse``, ``accumulate``, ...).
    """
    from ..backends.triton_flex import codegen, decode, kernels

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    generated = generated or codegen.generate(score_mod, mask_mod)
    entry = kernels.aot_entry
    if kernel in decode.KERNELS:  # the split-KV decoding launches (decode.py); the reduction runs its own config
        entry, config = decode.aot_entry, decode.launch_config(kernel, config)
        flags.pop("accumulate", None), flags.pop("has_dlse", None)
    elif kernel == "bwd_preprocess":  # launched with its own config, whatever the backward's tiles
        config = kernels.PREPROCESS_CONFIG
    jit_fn, signature, constexprs, specialization = entry(
        kernel, generated, torch_dtype, head_dim, head_dim_v, config, **flags
    )
    return AotJob(
        kernel=kernel,
        variant=variant or variant_name(mask_mod, score_mod),
        target=target,
        config=config,
        dtype=DTYPE_NAMES[torch_dtype],
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        fn_ref=fn_ref(jit_fn),
        signature=dict(signature),
        constexprs=portable_constexprs(constexprs),
        specialization=dict(specialization),
    )


def compile_report(kernel: str, config: TileConfig, target: str, *args, use_cache: bool = True, **kwargs) -> AotRecord:
    """Compile one kernel variant with ``config`` for ``target`` (a key of ``ARCHS``) and report its resources;
    the other arguments are ``make_job``'s (dtype, head dims, mods, flags).

    >>> from dispatchattn.tuning.config import TileConfig
    >>> record = compile_report("fwd", TileConfig(128, 64, 8, 3), "sm_90", "bf16", 128)  # doctest: +SKIP
    >>> record.matrix_instr, record.fits  # doctest: +SKIP
    ('wgmma', True)
    """
    job = make_job(kernel, config, target, *args, **kwargs)
    return compile_jobs([job], workers=1, use_cache=use_cache)[0]

