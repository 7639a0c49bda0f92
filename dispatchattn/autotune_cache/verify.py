"""Checking shipped default configs by compiling the kernels ahead of time for each target (no GPU needed).

The resource estimate in ``space.py`` prunes before timing; it cannot see what Triton really allocates.
``verify_document`` compiles every entry's config with ``backends.triton_flex.aot`` (each launch of the
kernel: forward, or the backward's dK/dV and dQ).  While every config tried for an entry is rejected
(shared memory over the limit, registers spilled, the wrong matrix instructions), the next round tries
each rejected config one pipeline stage shorter and one shrink step smaller (as the heuristic shrinks),
and keeps the largest tile that passes.  Each entry records what was measured in ``checked``; it is
still not timed, so ``"measured": false`` stays.

Where no config tried passes (nor one that only misses the fast matrix instruction) but some compile and
only spill, the entry ships no config: it gets ``"no_spill_free_tile"`` instead (the least-spilling tile
tried and what each launch spilled with it), and the triton_flex backend refuses that kernel on that target
(``shipped.refusal``).  A spilling config is never shipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace

from .config import TileConfig
from .space import _shrink

LAUNCHES = {"fwd": ("fwd",), "bwd": ("bwd_dkdv", "bwd_dq"), "decode": ("decode", "decode_reduce")}
MAX_ROUNDS = 6
FRONTIER = 3  # configs tried per entry and round
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _summary(records) -> str:
    parts = []
    for record in records:
        spill = f", {record.spill_bytes:,} B spilled" if record.spill_bytes else ", no spills"
        parts.append(f"{record.kernel} {record.total_shared_bytes:,} B shared, {record.registers} registers{spill}")
    return "; ".join(parts)


def _preference(config: TileConfig) -> tuple:
    """Larger tiles first, then deeper pipelines, then fewer warps."""
    return (-config.block_m * config.block_n, -config.num_stages, config.num_warps, config.block_m)


def _compile_round(pending: dict[tuple[str, TileConfig], tuple[str, str, int]], target: str, workers: int):
    """({(entry, config): [reject reason or None per launch]}, {(entry, config): [records]})."""
    from ..backends.triton_flex import aot

    jobs, owners = [], []
    for (name, config), (kernel, dtype, head_dim) in pending.items():
        for launch in LAUNCHES[kernel]:
            jobs.append(aot.make_job(launch, config, target, DTYPE_SHORT[dtype], head_dim))
            owners.append((name, config))
    records: dict[tuple[str, TileConfig], list] = {owner: [] for owner in pending}
    for owner, record in zip(owners, aot.compile_jobs(jobs, workers=workers)):
        records[owner].append(record)
    return {owner: [aot.reject_reason(r) for r in records[owner]] for owner in pending}, records


def _entries(document: dict, dtypes: Iterable[str]) -> dict[str, tuple[str, str, int]]:
    entries = {}
    for name in document["tile_configs"]:
        kernel, dtype, dims = name.split()
        if dtype in dtypes:
            entries[name] = (kernel, dtype, int(dims.removeprefix("d").split("/")[0]))
    return entries


def _children(config: TileConfig, kernel: str, problem: str) -> list[TileConfig]:
    """One stage shorter, one shrink step smaller, and (for a spill) 4 warps: a MMA tile split over fewer
    warps often needs fewer registers per thread for the operands Triton keeps live per warp."""
    spills = "spills" in problem
    shorter = replace(config, num_stages=config.num_stages - 1) if config.num_stages > 1 else None
    smaller = _shrink(config, kernel, registers_short=spills)
    fewer_warps = replace(config, num_warps=4) if spills and config.num_warps > 4 else None
    return [c for c in dict.fromkeys((shorter, smaller, fewer_warps)) if c is not None]


def _only_spill_problem(reasons: list[str | None]) -> bool:
    """Whether a config's launches compile and fit in shared memory, some only spilling registers."""
    return all(r is None or all(" spills registers on " in part for part in r.split("; ")) for r in reasons)


def _spill_key(records) -> tuple[int, int]:
    """Less is better: (spilled registers (AMD VGPRs; 0 on NVIDIA), spill bytes), summed over the launches."""
    return sum(r.spill_count or 0 for r in records), sum(r.spill_bytes or 0 for r in records)


def _keep_least(least: dict, name: str, config: TileConfig, records) -> None:
    if name not in least or (_spill_key(records), _preference(config)) < (
        _spill_key(least[name][1]), _preference(least[name][0])
    ):
        least[name] = (config, records)


def no_spill_free_tile(config: TileConfig, records, tried: int) -> dict:
    """The ``"no_spill_free_tile"`` value of an entry: the least-spilling tile tried, per launch."""
    import triton

    return {
        "least_spilling": {
            "config": config.to_dict(),
            "tile": f"{config.block_m}x{config.block_n} w{config.num_warps}"
                    + (f" s{config.num_stages}" if config.num_stages != 1 else ""),
            "launches": {
                r.kernel: {"spilled_registers": r.spill_count or 0, "spill_bytes": r.spill_bytes or 0,
                           "registers": r.registers}
                for r in records
            },
        },
        "configs_tried": tried,
        "triton": triton.__version__,
    }


def _only_instruction_problem(reasons: list[str | None]) -> bool:
    """Whether a config's launches fit (shared memory, no spill), rejected only for their matrix instruction."""
    return all(r is None or all(" matrix instructions on " in part for part in r.split("; ")) for r in reasons)


def verify_document(
    document: dict, target: str, dtypes: Iterable[str] = ("bfloat16",), workers: int = 2
) -> list[str]:
    """Compile (and where rejected, shrink) the entries of ``document`` for ``target`` of ``dtypes``.

    Updates entries in place (``config``, ``checked``, ``note``); returns one line per entry for a log.
    """
    import triton

    entries, log = _entries(document, dtypes), []
    frontier = {name: [TileConfig.from_dict(document["tile_configs"][name]["config"])] for name in entries}
    first_rejection: dict[str, str] = {}
    fallback: dict[str, tuple[TileConfig, list]] = {}  # best config that fits but not with the fast instruction
    least: dict[str, tuple[TileConfig, list]] = {}  # least-spilling config of entries where nothing fits yet
    tried: dict[str, set] = {name: set() for name in entries}
    for _ in range(MAX_ROUNDS):
        frontier = {name: configs for name, configs in frontier.items() if configs}  # drop exhausted entries
        if not frontier:
            break
        pending = {(name, c): entries[name] for name, configs in frontier.items() for c in configs}
        reasons, records = _compile_round(pending, target, workers)
        for name, configs in list(frontier.items()):
            entry = document["tile_configs"][name]
            tried[name].update(configs)
            passing = [c for c in configs if not any(reasons[(name, c)])]
            if passing:
                best = min(passing, key=_preference)
                entry["config"] = best.to_dict()
                summary = _summary(records[(name, best)])
                entry["checked"] = f"compiled with Triton {triton.__version__} for {target}: {summary}"
                log.append(f"{target} {name}: {best.short()} fits")
                del frontier[name]
                continue
            for c in configs:
                if _only_spill_problem(reasons[(name, c)]):
                    _keep_least(least, name, c, records[(name, c)])
                if _only_instruction_problem(reasons[(name, c)]) and (
                    name not in fallback or _preference(c) < _preference(fallback[name][0])
                ):
                    fallback[name] = (c, records[(name, c)])
            problems = {c: next(r for r in reasons[(name, c)] if r) for c in configs}
            first_rejection.setdefault(name, f"{configs[0].short()}: {problems[configs[0]]}")
            children = {child for c in configs for child in _children(c, entries[name][0], problems[c])}
            frontier[name] = sorted(children, key=_preference)[:FRONTIER]
    unresolved = first_rejection.keys() - {n for n, e in document["tile_configs"].items() if "checked" in e}
    log += _small_tile_sweep(document, target, {name: entries[name] for name in unresolved}, workers, least, tried)
    for name in first_rejection.keys() - {n for n, e in document["tile_configs"].items() if "checked" in e}:
        entry = document["tile_configs"][name]
        if name in fallback:
            config, records = fallback[name]
            slow = sorted(
                {f"{r.kernel} uses {r.matrix_instr}" for r in records if r.matrix_instr != r.expected_matrix_instr}
            )
            entry["config"] = config.to_dict()
            entry["checked"] = (
                f"compiled with Triton {triton.__version__} for {target}: {_summary(records)}; no config with the "
                f"fast matrix instruction avoided spills (first tried {first_rejection[name]}), so this is the "
                f"largest non-spilling one; {', '.join(slow)}"
            )
            log.append(f"{target} {name}: {config.short()} fits without the fast matrix instruction")
            continue
        if name in least:  # every config tried compiles but spills: ship none, say so (the backend refuses it)
            config, records = least[name]
            entry.pop("config")
            entry["no_spill_free_tile"] = no_spill_free_tile(config, records, len(tried[name]))
            entry["checked"] = (
                f"compiled with Triton {triton.__version__} for {target}: every one of {len(tried[name])} configs "
                f"tried spills (first tried {first_rejection[name]}); least: {config.short()}: {_summary(records)}; "
                "no config ships, triton_flex refuses this kernel here"
            )
            log.append(f"{target} {name}: every config spills (least {config.short()}); none ships")
            continue
        entry["checked"] = f"no config passed the ahead-of-time compile; kept the heuristic's: {first_rejection[name]}"
        log.append(f"{target} {name}: nothing passed, kept {TileConfig.from_dict(entry['config']).short()}")
    for name, rejection in first_rejection.items():
        document["tile_configs"][name]["note"] += f"; ahead-of-time compile rejected {rejection}"
    return log


#: Tried when the shrink search finds nothing: the smallest MMA tiles, every warp count, no pipelining.  The
#: shrink path keeps warps high and tiles large, while RDNA3 fits only here (fwd D=128: 32x16 w8, 209 VGPRs;
#: fwd and decoding D=256: 16x32 w16, 230 VGPRs: 16 warps spread the replicated WMMA operands thinner).
SMALL_TILES = tuple(TileConfig(m, n, num_warps=w, num_stages=1)
                    for m, n in ((32, 32), (32, 16), (16, 32), (16, 16)) for w in (16, 8, 4, 2))


def _small_tile_sweep(document: dict, target: str, entries: dict[str, tuple[str, str, int]], workers: int,
                      least: dict | None = None, tried: dict | None = None) -> list:
    """Compile ``SMALL_TILES`` for entries nothing else passed; keep the largest that fits with the target's
    matrix instruction.  ``least`` / ``tried``: updated with the least-spilling config and every config tried."""
    import triton

    if not entries:
        return []
    least = {} if least is None else least
    tried = {} if tried is None else tried
    pending = {(name, c): entry for name, entry in entries.items() for c in SMALL_TILES}
    reasons, records = _compile_round(pending, target, workers)
    log = []
    for name in entries:
        tried.setdefault(name, set()).update(SMALL_TILES)
        for c in SMALL_TILES:
            if _only_spill_problem(reasons[(name, c)]):
                _keep_least(least, name, c, records[(name, c)])
        passing = [c for c in SMALL_TILES if not any(reasons[(name, c)])]
        if not passing:
            continue
        best = min(passing, key=_preference)
        entry = document["tile_configs"][name]
        entry["config"] = best.to_dict()
        entry["checked"] = (f"compiled with Triton {triton.__version__} for {target}: "
                            f"{_summary(records[(name, best)])} (small-tile sweep: the shrink search found none)")
        log.append(f"{target} {name}: {best.short()} fits (small-tile sweep)")
    return log


def copy_checked(document: dict, source_dtype: str = "bfloat16", target_dtype: str = "float16") -> None:
    """Give ``target_dtype`` entries the checked config of the same-sized ``source_dtype`` entry."""
    for name, entry in document["tile_configs"].items():
        kernel, dtype, dims = name.split()
        twin = document["tile_configs"].get(f"{kernel} {source_dtype} {dims}")
        if dtype == target_dtype and twin and "checked" in twin:
            if "config" in twin:
                entry["config"] = dict(twin["config"])
            else:  # no spill-free tile: the same element size spills the same
                entry.pop("config", None)
                entry["no_spill_free_tile"] = json.loads(json.dumps(twin["no_spill_free_tile"]))
            entry["checked"] = f"as {source_dtype} (same element size): {twin['checked']}"
