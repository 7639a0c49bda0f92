"""What to compile ahead of time (kernels x variants x configs x targets), and the tables that report it.

``python -m dispatchattn aot`` is implemented here:

    python -m dispatchattn aot --target sm_90,gfx942 --mask causal --score softcap
    python -m dispatchattn aot --config 128,64,8,3 --target sm_86 --json
    python -m dispatchattn aot --score-mod my_model.attention:tanh_bias --target sm_90,gfx942
    python -m dispatchattn aot --head-dim 64,128,256 --dtype bf16,fp32 --markdown > docs/aot_resources.md

Variants are built from ``dispatchattn.masks`` / ``dispatchattn.scores``; configs come from the shipped
defaults (``tuning/defaults``), the autotune config space, or the command line.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import itertools
import json
import sys
from collections.abc import Callable

import torch

from .. import masks, scores
from ..backends.triton_flex import codegen
from ..tuning import shipped, space
from ..tuning.config import TileConfig
from ..vendor_tables import AOT_TARGETS, ARCHS
from . import aot, aot_cache

_HEADS = 8  # heads of the captured tables of the alibi / relative-bias variants (shapes only matter)
_SEQ = 4096
_BUCKETS = 32  # entries of the bucketed bias table


def clamped_bias_mod():
    """A per-head relative bias gathered through a clamp, as models write it: ``table`` (H, 129)."""
    table = torch.zeros(_HEADS, 129)

    def clamped_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (q_idx - kv_idx).clamp(-64, 64) + 64]

    return clamped_bias


def bucketed_bias_mod():
    """A bias shared by the heads, gathered by distance bucket: ``table[|q - kv| // 8 % n]``."""
    table = torch.zeros(_BUCKETS)

    def bucketed_bias(score, b, h, q_idx, kv_idx):
        return score + table[(q_idx - kv_idx).abs() // 8 % _BUCKETS]

    return bucketed_bias


#: Mask variants by CLI name: factories, so captured tensors are built only when asked for.
MASKS: dict[str, Callable[[], object]] = {
    "causal": lambda: masks.causal(),
    "sliding_window": lambda: masks.sliding_window(256),
    "prefix_lm": lambda: masks.prefix_lm(256),
    "document": lambda: masks.document(torch.arange(_SEQ, dtype=torch.int32) // 512),
}
#: Score variants by CLI name.
SCORES: dict[str, Callable[[], object]] = {
    "softcap": lambda: scores.softcap(30.0),
    "alibi": lambda: scores.alibi(2.0 ** -torch.arange(1, _HEADS + 1, dtype=torch.float32)),
    "relative_bias": lambda: scores.relative_bias(torch.zeros(_HEADS, 2 * _SEQ - 1)),
    "clamped_bias": clamped_bias_mod,
    "bucketed_bias": bucketed_bias_mod,
}
#: The variants the shipped defaults are checked with (issue 10): name -> (mask name, score name).  The two gathered
#: tables (issue 16): on an H200 the sm_90 forward at D=64 (128x128 w8 s3) needed 246,784 B of shared memory with them,
#: over the 232,448 B limit, where every other variant fit.
CHECKED_VARIANTS: dict[str, tuple[str | None, str | None]] = {
    "plain": (None, None),
    "causal": ("causal", None),
    "sliding_window": ("sliding_window", None),
    "softcap": (None, "softcap"),
    "alibi": (None, "alibi"),
    "relative_bias": (None, "relative_bias"),
    "clamped_bias": (None, "clamped_bias"),
    "bucketed_bias": (None, "bucketed_bias"),
}
#: Launch kernels per autotuned kernel: one backward config drives all three backward launches.
LAUNCHES: dict[str, tuple[str, ...]] = {"fwd": ("fwd",), "bwd": ("bwd_preprocess", "bwd_dkdv", "bwd_dq"),
                                        "decode": ("decode", "decode_reduce")}
#: Launches that do not read the mods: planned for the first variant only.
MOD_FREE = frozenset({"bwd_preprocess", "decode_reduce"})
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def variant_name(mask, score) -> str:
    """CLI names (or a user mod's ``__name__``) joined: "plain", "causal", "causal+softcap"."""
    names = [m if isinstance(m, str) else getattr(m, "__name__", type(m).__name__) for m in (mask, score) if m]
    return "+".join(names) or "plain"


def _build(mod, table: dict[str, Callable[[], object]]):
    """A named variant's mod from ``table``, a user's callable as is, None for none."""
    return table[mod]() if isinstance(mod, str) else mod


def generate(mask, score):
    """The generated Triton source of a variant: ``mask`` / ``score`` each a name of ``MASKS`` / ``SCORES``, a
    user's callable, or None."""
    return codegen.generate(_build(score, SCORES), _build(mask, MASKS))


def load_mod(spec: str):
    """``"package.module:name"`` -> that callable (a user's own score_mod / mask_mod)."""
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SystemExit(f"aot: expected MODULE:NAME for a mod, got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


def shipped_config(tune_kernel: str, target: str, dtype: str, head_dim: int) -> TileConfig | None:
    """The shipped default of ``tune_kernel`` ("fwd" / "bwd" / "decode") for ``target``, or None if none ships."""
    found = shipped.lookup(tune_kernel, target, TORCH_DTYPE_NAMES[dtype], head_dim, head_dim)
    return found[0] if found else None


def configs_for(tune_kernel: str, target: str, dtype: str, head_dim: int, source: str) -> list[TileConfig]:
    """Configs to check: "shipped" (the default that ships), "space" (the whole autotune space)."""
    if source == "space":
        return space.config_space(tune_kernel, target, aot.DTYPES[dtype], head_dim, head_dim)
    config = shipped_config(tune_kernel, target, dtype, head_dim)
    return [config] if config else []


def plan(
    targets: list[str],
    variants: list[tuple],
    dtypes: list[str],
    head_dims: list[int],
    kernels: list[str] | None = None,
    source: str = "shipped",
    config: TileConfig | None = None,
) -> list[aot.AotJob]:
    """Every (variant, kernel, dtype, head dim, config, target) job; ``config`` overrides ``source``.

    A variant is a (mask, score) pair, each a name of ``MASKS`` / ``SCORES``, a user's callable, or None.

    The backward's preprocess pass and the decoding reduction do not depend on the mods, so they are planned
    for the first variant only.
    """
    jobs = []
    for position, (mask, score) in enumerate(variants):
        generated = generate(mask, score)
        launches = [(tune, launch) for tune, names in LAUNCHES.items() for launch in names]
        for (tune_kernel, launch), dtype, head_dim, target in itertools.product(launches, dtypes, head_dims, targets):
            if (kernels and launch not in kernels) or (launch in MOD_FREE and position > 0):
                continue
            chosen = [config] if config else configs_for(tune_kernel, target, dtype, head_dim, source)
            variant = variant_name(mask, score)
            jobs += [aot.make_job(launch, c, target, dtype, head_dim, generated=generated, variant=variant)
                     for c in chosen]  # fmt: skip
    return jobs


def shipped_defaults_digest() -> str:
    """sha256 of every shipped default config (targets, entry names, configs; not dates or notes)."""
    configs = {}
    for path in sorted(shipped.DEFAULTS_DIR.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        configs[path.stem] = {name: entry.get("config") for name, entry in document.get("tile_configs", {}).items()}
    return hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()


# --- rendering -----------------------------------------------------------------------------------------

COLUMNS = ("target", "kernel", "variant", "dtype", "D", "config", "smem B", "regs", "spill B", "occ",
           "matrix", "compile s", "verdict")  # fmt: skip


def _config_text(record: aot.AotRecord) -> str:
    cfg = record.tile
    text = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    if cfg.waves_per_eu or cfg.matrix_instr_nonkdim or cfg.kpack != 1:
        text += f" wpe{cfg.waves_per_eu} mfma{cfg.matrix_instr_nonkdim} kpack{cfg.kpack}"
    return text


def _verdict(record: aot.AotRecord) -> str:
    if record.fits:
        return "fits"
    if record.error:
        return "DOES NOT COMPILE"
    problems = []
    if (record.total_shared_bytes or 0) > record.smem_limit:
        problems.append("SMEM")
    if (record.spill_bytes or 0) > aot.MAX_SPILL_BYTES or (record.spill_count or 0) > 0:
        problems.append("SPILLS")
    if record.expected_matrix_instr and record.matrix_instr != record.expected_matrix_instr:
        problems.append("NO MMA")
    return " + ".join(problems)


def row(record: aot.AotRecord) -> list[str]:
    """One table row of ``record`` (the cells of ``COLUMNS``)."""

    def num(value) -> str:
        return "-" if value is None else f"{value:,}"

    smem = "-" if record.shared_bytes is None else f"{record.total_shared_bytes:,} / {record.smem_limit:,}"
    dims = f"{record.head_dim}" + (f"/{record.head_dim_v}" if record.head_dim_v != record.head_dim else "")
    return [record.target, record.kernel, record.variant, record.dtype, dims, _config_text(record), smem,
            num(record.registers), num(record.spill_bytes), num(record.occupancy), record.matrix_instr,
            f"{record.compile_seconds:.1f}", _verdict(record)]  # fmt: skip


def refused(records: list[aot.AotRecord]) -> list[str]:
    """One line per shipped entry of the records' targets, dtypes and head dims that ships no config because
    every config tried spills (``no_spill_free_tile``): the triton_flex backend refuses that kernel there."""
    lines = []
    dtypes = {TORCH_DTYPE_NAMES.get(r.dtype, r.dtype) for r in records}
    head_dims = {r.head_dim for r in records}
    for target in dict.fromkeys(r.target for r in records):
        document = shipped.load_target(target) or {"tile_configs": {}}
        for name in sorted(document["tile_configs"]):
            kernel, dtype_name, dims = name.split()
            head_dim, head_dim_v = (int(d) for d in dims.removeprefix("d").split("/"))
            record = shipped.refusal(kernel, target, dtype_name, head_dim, head_dim_v)
            if record is not None and dtype_name in dtypes and head_dim in head_dims:
                message = shipped.refusal_message(kernel, target, head_dim, head_dim_v, record, dtype_name)
                lines.append(f"- {message}")
    return lines


def variant_spills(records: list[aot.AotRecord]) -> list[str]:
    """One line per shipped entry of the records' targets, dtypes and head dims whose config fits the plain kernels
    but spills with some ``CHECKED_VARIANTS`` (``variant_spills``: no tile tried fits every variant)."""
    lines = []
    dtypes = {TORCH_DTYPE_NAMES.get(r.dtype, r.dtype) for r in records}
    head_dims = {r.head_dim for r in records}
    for target in dict.fromkeys(r.target for r in records):
        document = shipped.load_target(target) or {"tile_configs": {}}
        for name, entry in sorted(document["tile_configs"].items()):
            kernel, dtype_name, dims = name.split()
            head_dim = int(dims.removeprefix("d").split("/")[0])
            if not entry.get("variant_spills") or dtype_name not in dtypes or head_dim not in head_dims:
                continue
            config = TileConfig.from_dict(entry["config"])
            spills = "; ".join(
                f"{variant}: " + ", ".join(
                    f"{shipped.LAUNCH_WORDS.get(launch, launch)} {spill['spilled_registers']} VGPRs / "
                    f"{spill['spill_bytes']:,} B" if spill.get("spilled_registers")
                    else f"{shipped.LAUNCH_WORDS.get(launch, launch)} {spill['spill_bytes']:,} B"
                    for launch, spill in launches.items())
                for variant, launches in entry["variant_spills"].items())
            lines.append(f"- {target} {shipped.KERNEL_WORDS.get(kernel, kernel)} {dtype_name} head_dim {head_dim}, "
                         f"{config.block_m}x{config.block_n} w{config.num_warps}: {spills}")
    return lines


def render_text(records: list[aot.AotRecord]) -> str:
    """A fixed-width table, then every reason a config does not fit, then the kernels that ship no config."""
    rows = [list(COLUMNS)] + [row(r) for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    reasons = [f"- {r.reason}" for r in records if r.reason]
    none_shipped = refused(records)
    lines += [""] + reasons if reasons else []
    lines += ["", "No config ships (every config tried spills; triton_flex refuses these):", *none_shipped] \
        if none_shipped else []
    spilling = variant_spills(records)
    lines += ["", "Shipped configs that spill with some variants (no tile fits every one):", *spilling] \
        if spilling else []
    return "\n".join(lines)


def _listed(values) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(values))


def _markdown_header(records: list[aot.AotRecord], command: str) -> list[str]:
    triton_version = aot_cache.triton_version()
    today = datetime.date.today().isoformat()
    fitting = sum(r.fits for r in records)
    return [
        "# Ahead-of-time resources of the triton_flex kernels",
        "",
        f"Generated by `{command}` on {today} with Triton {triton_version}, torch {torch.__version__}, on a",
        "machine without a GPU: every kernel is compiled for each target with",
        "`triton.compile(..., target=GPUTarget(...))`, its arguments specialised as Triton's launcher specialises",
        "them on the device (contiguous tensors: unit strides as constants, 16-divisible sizes and aligned pointers",
        "marked).  Do not edit by hand; regenerate with the command above when kernels, shipped defaults or Triton",
        "change.",
        "",
        f"<!-- aot-report shipped-defaults-sha256={shipped_defaults_digest()} triton={triton_version} -->",
        "",
        f"Covers {len(records)} compiles ({fitting} fit): kernels {_listed(r.kernel for r in records)}; variants "
        f"{_listed(r.variant for r in records)}; dtypes {_listed(r.dtype for r in records)}; head dims "
        f"{_listed(r.head_dim for r in records)}; targets {_listed(r.target for r in records)}.",
        "",
        "Columns: `smem B` = dynamic + static shared memory (LDS) per block / the target's opt-in maximum;",
        "`regs` = registers per thread (NVIDIA, cuobjdump) or architectural VGPRs (AMD);",
        "`spill B` = local-memory stack frame per thread (NVIDIA: ptxas spills) or scratch per lane (AMD);",
        "`occ` = waves per SIMD as the AMD compiler reports it; `matrix` = the tensor-core instruction",
        "family found in the PTX / AMDGCN.  A config fits when it compiles, its shared memory fits, it spills at",
        f"most {aot.MAX_SPILL_BYTES} B and it uses the target's fp16/bf16 matrix instruction.",
        "",
    ]


def render_markdown(records: list[aot.AotRecord], command: str) -> str:
    """The resource report as a Markdown page with a header that ``test_aot_docs.py`` checks."""
    body = []
    for target in dict.fromkeys(r.target for r in records):
        body += [f"## {target} ({ARCHS[target].flagship})", "", "| " + " | ".join(COLUMNS[1:]) + " |",
                 "|" + "---|" * (len(COLUMNS) - 1)]  # fmt: skip
        body += ["| " + " | ".join(row(r)[1:]) + " |" for r in records if r.target == target]
        body.append("")
    rejected = [f"- {r.reason}" for r in records if r.reason]
    tail = ["## Configs that do not fit", ""] + (rejected or ["None."]) + [""]
    tail += ["## Kernels that ship no config", "",
             "Every config tried compiles with spills (the shipped entry records `no_spill_free_tile`), so no",
             "config ships and the triton_flex backend refuses calls that would launch the kernel there:", "",
             *(refused(records) or ["None."]), ""]
    tail += ["## Shipped configs that spill with some variants", "",
             "No tile tried fits every checked variant (plain, causal, sliding window, softcap, ALiBi, relative",
             "bias, clamped and bucketed bias tables) but the plain kernels fit: the entry ships the tile the other",
             "variants spill least with and records them in `variant_spills` (spilled VGPRs / scratch bytes per lane):",
             "",
             *(variant_spills(records) or ["None."]), ""]
    return "\n".join(_markdown_header(records, command) + body + tail)


# --- command line --------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_aot_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``aot`` to the ``python -m dispatchattn`` subcommands."""
    p = subparsers.add_parser("aot", help="compile the Triton kernels for GPUs that are not present; report fit")
    add = p.add_argument
    add("--target", type=_csv, default=list(AOT_TARGETS), help=f"comma list (default: {','.join(AOT_TARGETS)})")
    add("--mask", type=_csv, default=[], help=f"comma list of {','.join(MASKS)} (default: none)")
    add("--score", type=_csv, default=[], help=f"comma list of {','.join(SCORES)} (default: none)")
    add("--mask-mod", default=None, help="your own mask_mod, imported as MODULE:NAME")
    add("--score-mod", default=None, help="your own score_mod, imported as MODULE:NAME")
    add("--variants", choices=["checked"], help="the variants the tests check (plain, causal, window, ...)")
    add("--kernel", type=_csv, default=None,
        help="comma list of fwd,bwd_preprocess,bwd_dkdv,bwd_dq,decode,decode_reduce")
    add("--dtype", type=_csv, default=["bf16"], help="comma list of bf16,fp16,fp32 (default: bf16)")
    add("--head-dim", type=lambda s: [int(x) for x in _csv(s)], default=[128], help="comma list (default: 128)")
    add("--configs", choices=["shipped", "space"], default="shipped", help="shipped defaults or the whole space")
    add("--config", default=None, help="force one config: BLOCK_M,BLOCK_N,WARPS,STAGES")
    add("--workers", type=int, default=None, help="compile processes (default: the usable CPUs)")
    add("--no-cache", action="store_true", help="recompile even when a cached record exists")
    add("--check", action="store_true", help="exit 1 when any config does not fit")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the records as JSON")
    out.add_argument("--markdown", action="store_true", help="print the Markdown report (docs/aot_resources.md)")
    return p


def _variants(args) -> list[tuple[str | None, str | None]]:
    if args.variants == "checked":
        return list(CHECKED_VARIANTS.values())
    for name, known in [*((m, MASKS) for m in args.mask), *((s, SCORES) for s in args.score)]:
        if name not in known:
            raise SystemExit(f"aot: unknown variant {name!r}; expected one of {', '.join(known)}")
    mask_names = args.mask + ([load_mod(args.mask_mod)] if args.mask_mod else [])
    score_names = args.score + ([load_mod(args.score_mod)] if args.score_mod else [])
    return [(m, s) for m in (mask_names or [None]) for s in (score_names or [None])]


def run_aot(args) -> int:
    """Plan, compile (or read cached records) and print the table; see ``add_aot_parser`` for the options."""
    unknown = [t for t in args.target if t not in ARCHS] + [d for d in args.dtype if d not in aot.DTYPES]
    if unknown:
        raise SystemExit(f"aot: unknown target/dtype {unknown}; targets: {', '.join(ARCHS)}; dtypes: bf16,fp16,fp32")
    config = TileConfig(*(int(x) for x in _csv(args.config))) if args.config else None
    jobs = plan(args.target, _variants(args), args.dtype, args.head_dim, args.kernel, args.configs, config)

    def progress(done: int, total: int) -> None:
        print(f"\rcompiled {done}/{total}", end="", file=sys.stderr, flush=True)

    records = aot.compile_jobs(jobs, args.workers, use_cache=not args.no_cache, progress=progress)
    print(file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=1))
    elif args.markdown:
        print(render_markdown(records, "python -m dispatchattn aot " + " ".join(sys.argv[2:])))
    else:
        print(render_text(records))
    return 1 if args.check and not all(r.fits for r in records) else 0
