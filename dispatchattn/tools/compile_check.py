"""Checking shipped default configs by compiling the kernels ahead of time for each target (no GPU needed).

The resource estimate in ``space.py`` prunes before timing; it cannot see what Triton really allocates.
``verify_document`` compiles every entry's config with ``aot.py`` (each launch of the
kernel: forward, or the backward's dK/dV and dQ), with each of ``variants`` (the plain kernels and, from the
CLI by default, every ``aot_report.CHECKED_VARIANTS`` mask and score: a config passes only if all fit).  The
search is best first: each round compiles the ``FRONTIER`` largest configs not yet tried (the heuristic's and the
file's previous one to begin with); each rejected one (shared memory over the limit, registers spilled, the wrong
matrix instructions) queues its children (one pipeline stage shorter, one shrink step smaller as the heuristic
shrinks, 4 warps for a spill), and an entry is done when a config passed and no larger one is queued, so the
largest tile that passes ships.  Each entry records what was measured in ``checked``; it is
still not timed, so ``"measured": false`` stays.

Where no config tried passes (nor one that only misses the fast matrix instruction) but some compile and
only spill, the entry ships no config: it gets ``"no_spill_free_tile"`` instead (the least-spilling tile
tried and what each launch spilled with it), and the triton_flex backend refuses that kernel on that target
(``tuning.shipped.refusal``).  A config whose plain kernels spill is never shipped.  Where the plain kernels fit but
no config tried fits every variant, the config the other variants spill least with ships, and the entry names
what they spill in ``"variant_spills"`` (the kernel is not refused: a model's own mods are unchecked too).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import replace

from ..tuning.config import TileConfig
from ..tuning.space import shrink
from . import aot, aot_cache, aot_report

LAUNCHES = {"fwd": ("fwd",), "bwd": ("bwd_dkdv", "bwd_dq"), "decode": ("decode", "decode_reduce")}
MAX_ROUNDS = 6
FRONTIER = 3  # configs tried per entry and round
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _summary(records) -> str:
    """Each plain launch's resources, then (when other variants were compiled) the most registers per launch
    over them and which spill."""
    several = len({getattr(r, "triton_version", "") for r in records}) > 1

    def launch(r) -> str:  # the launch, and the Triton that compiled it when the records come from several
        return f"{r.kernel} [Triton {r.triton_version}]" if several else r.kernel

    parts = []
    for record in records:
        if _variant(record) != "plain":
            continue
        spill = f", {record.spill_bytes:,} B spilled" if record.spill_bytes else ", no spills"
        parts.append(f"{launch(record)} {record.total_shared_bytes:,} B shared, {record.registers} registers{spill}")
    mods = [r for r in records if _variant(r) != "plain"]
    if mods:
        most: dict = {}
        shared: dict = {}
        for r in mods:
            if launch(r) not in most or (r.registers or 0) > (most[launch(r)].registers or 0):
                most[launch(r)] = r
            if launch(r) not in shared or (r.total_shared_bytes or 0) > (shared[launch(r)].total_shared_bytes or 0):
                shared[launch(r)] = r
        spilling = [r for r in mods if r.spill_bytes or r.spill_count]
        text = (f"with {', '.join(dict.fromkeys(_variant(r) for r in mods))}: most registers "
                + ", ".join(f"{k} {r.registers} ({_variant(r)})" for k, r in most.items())
                + "; most shared memory "
                + ", ".join(f"{k} {r.total_shared_bytes or 0:,} B ({_variant(r)})" for k, r in shared.items()))
        if spilling:
            text += "; spills: " + ", ".join(
                f"{launch(r)} ({_variant(r)}) {r.spill_count or 0} VGPRs, {r.spill_bytes or 0:,} B" for r in spilling)
        else:
            text += ", no spills"
        parts.append(text)
    return "; ".join(parts)


def variant_spills(records) -> dict:
    """``{variant: {launch: {spilled_registers, spill_bytes, registers}}}`` of the launches that spill."""
    found: dict = {}
    for r in records:  # compiled with several Tritons: the most each launch spilled
        before = found.get(_variant(r), {}).get(r.kernel, {"spilled_registers": 0, "spill_bytes": 0})
        if (r.spill_bytes or r.spill_count) and (r.spill_count or 0, r.spill_bytes or 0) > (
                before["spilled_registers"], before["spill_bytes"]):
            found.setdefault(_variant(r), {})[r.kernel] = {
                "spilled_registers": r.spill_count or 0, "spill_bytes": r.spill_bytes or 0, "registers": r.registers}
    return found


def _variant(record) -> str:
    return getattr(record, "variant", "plain")


def _plain(reasons: list, records: list) -> list:
    return [reason for reason, record in zip(reasons, records) if _variant(record) == "plain"]


def _round(pending: dict, target: str, workers: int, variants: tuple[str, ...], pythons: tuple = (None,)):
    """``_compile_round``, naming ``variants`` only when there are more than the plain one, ``pythons`` only when
    another interpreter than this one compiles."""
    more = {"variants": variants} if len(variants) > 1 else {}
    more.update({"pythons": pythons} if tuple(pythons) != (None,) else {})
    return _compile_round(pending, target, workers, **more)


def triton_versions(pythons: Iterable[str | None] = (None,)) -> str:
    """``"3.6.0"`` or ``"3.6.0 and 3.9.0"``: the Triton of each interpreter (None: this one)."""
    return " and ".join(dict.fromkeys(aot_cache.triton_version(p) for p in pythons))


def _preference(config: TileConfig) -> tuple:
    """Larger tiles first, then deeper pipelines, then fewer warps."""
    return (-config.block_m * config.block_n, -config.num_stages, config.num_warps, config.block_m)


#: Variants the compile check covers by default: every catalogue variant the tests compile
#: (``aot_report.CHECKED_VARIANTS``), plain first.  A shipped tile must fit with all of them, not only with the plain
#: kernels: a mask or score adds live registers (gfx1100 at its 256 VGPRs spilled with 10 of 60 mod variants on the
#: tiles chosen for the plain kernels).
ALL_VARIANTS = ("plain", "causal", "sliding_window", "softcap", "alibi", "relative_bias", "clamped_bias",
                "bucketed_bias")


@functools.cache
def _generated(variant: str):
    """The generated mods of a ``CHECKED_VARIANTS`` variant (built once per process)."""
    return aot_report.generate(*aot_report.CHECKED_VARIANTS[variant])


def _variant_jobs(pending, target: str, variant: str, mod_free_too: bool):
    jobs, owners = [], []
    for (name, config), (kernel, dtype, head_dim) in pending.items():
        for launch in LAUNCHES[kernel]:
            if launch in aot_report.MOD_FREE and not mod_free_too:
                continue  # reads no mods: compiled once, with the plain variant
            jobs.append(aot.make_job(launch, config, target, DTYPE_SHORT[dtype], head_dim,
                                     generated=_generated(variant), variant=variant))
            owners.append((name, config))
    return jobs, owners


def _compile_round(
    pending: dict[tuple[str, TileConfig], tuple[str, str, int]], target: str, workers: int,
    variants: Iterable[str] = ("plain",), pythons: Iterable[str | None] = (None,),
):
    """({(entry, config): [reject reason or None per launch]}, {(entry, config): [records]}).

    The plain kernels are compiled first; only the configs they pass (or reject for the matrix instruction
    alone) are compiled with the other ``variants`` (the launches that read the mods), whose records follow the
    plain ones (``record.variant`` names each).  Each job is compiled by the Triton of every one of ``pythons``
    (interpreters; None: this one): a config passes only if it fits under all of them.
    """
    records: dict[tuple[str, TileConfig], list] = {owner: [] for owner in pending}
    jobs, owners = _variant_jobs(pending, target, "plain", mod_free_too=True)
    for python in pythons:
        for owner, record in zip(owners, aot.compile_jobs(jobs, workers=workers, python=python)):
            records[owner].append(record)
    others = [v for v in variants if v != "plain"]
    if others:
        survivors = {owner: entry for owner, entry in pending.items()
                     if _only_instruction_problem([aot.reject_reason(r) for r in records[owner]])}
        jobs, owners = [], []
        for variant in others:
            more_jobs, more_owners = _variant_jobs(survivors, target, variant, mod_free_too=False)
            jobs += more_jobs
            owners += more_owners
        for python in pythons:
            for owner, record in zip(owners, aot.compile_jobs(jobs, workers=workers, python=python)):
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
    smaller = shrink(config, kernel, registers_short=spills)
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


def no_spill_free_tile(config: TileConfig, records, tried: int, tritons: str | None = None) -> dict:
    """The ``"no_spill_free_tile"`` value of an entry: the least-spilling tile tried, per launch (``tritons``: the
    Triton versions that compiled it, default this process's)."""
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
        "triton": tritons or triton_versions(),
    }


def _only_instruction_problem(reasons: list[str | None]) -> bool:
    """Whether a config's launches fit (shared memory, no spill), rejected only for their matrix instruction."""
    return all(r is None or all(" matrix instructions on " in part for part in r.split("; ")) for r in reasons)


def _keep_plain_only(plain_only: dict, name: str, config: TileConfig, records) -> None:
    """Keep the config whose plain launches pass and whose other variants spill least (then the preferred one)."""
    mods = [r for r in records if _variant(r) != "plain"]
    if name not in plain_only or (_spill_key(mods), _preference(config)) < (
        _spill_key([r for r in plain_only[name][1] if _variant(r) != "plain"]), _preference(plain_only[name][0])
    ):
        plain_only[name] = (config, records)


def _sort_out(name: str, config: TileConfig, reasons: list, records: list, state: dict) -> None:
    """File a rejected config: least-spilling plain kernels, fits-but-slow-instruction, plain-only pass."""
    plain = _plain(reasons, records)
    if any(plain) and _only_spill_problem(plain):
        _keep_least(state["least"], name, config, [r for r in records if _variant(r) == "plain"])
    fallback = state["fallback"]
    if _only_instruction_problem(reasons) and (
        name not in fallback or _preference(config) < _preference(fallback[name][0])
    ):
        fallback[name] = (config, records)
    if not any(plain) and _only_spill_problem(reasons):
        _keep_plain_only(state["plain_only"], name, config, records)


def verify_document(
    document: dict, target: str, dtypes: Iterable[str] = ("bfloat16",), workers: int = 2,
    variants: Iterable[str] = ("plain",), seeds: dict[str, TileConfig] | None = None,
    pythons: Iterable[str | None] = (None,),
) -> list[str]:
    """Compile (and where rejected, shrink) the entries of ``document`` for ``target`` of ``dtypes``.

    ``seeds``: per entry, a config tried in the first round next to the heuristic's (the config the target's file
    shipped before, some found by hand: regenerating keeps it where it still passes and nothing larger does).

    ``variants`` (names of ``aot_report.CHECKED_VARIANTS``): a config passes only if every launch of every one
    of them compiles, fits, does not spill and uses the fast matrix instruction, with the Triton of every one of
    ``pythons`` (interpreters, None: this one; the oldest and newest supported Triton).  Updates entries in place
    (``config``, ``checked``, ``note``; ``variant_spills`` or ``no_spill_free_tile`` where nothing passes);
    returns one line per entry for a log.
    """
    variants, pythons = ("plain", *(v for v in variants if v != "plain")), tuple(pythons)
    tritons = triton_versions(pythons)
    entries, log = _entries(document, dtypes), []
    queue = {name: {TileConfig.from_dict(document["tile_configs"][name]["config"]),
                    *([seeds[name]] if seeds and name in seeds else [])}
             for name in entries}
    first_rejection: dict[str, str] = {}
    state: dict[str, dict[str, tuple[TileConfig, list]]] = {
        "fallback": {},  # best config that fits (every variant) but not with the fast instruction
        "least": {},  # least-spilling config of entries whose plain kernels fit nowhere yet
        "plain_only": {},  # config whose plain kernels pass, other variants spilling least
    }
    tried: dict[str, set] = {name: set() for name in entries}
    passed: dict[str, tuple[TileConfig, list]] = {}  # the preferred config that passed so far
    checked_with = f" ({len(variants)} variants: {', '.join(variants)})" if len(variants) > 1 else ""
    for _ in range(MAX_ROUNDS):
        # best first: the FRONTIER most preferred configs not tried yet; an entry is done when a config passed and
        # nothing queued is preferred to it (a seed that passes still gives way to a larger config that does)
        frontier = {name: sorted(configs, key=_preference)[:FRONTIER] for name, configs in queue.items() if configs}
        if not frontier:
            break
        pending = {(name, c): entries[name] for name, configs in frontier.items() for c in configs}
        reasons, records = _round(pending, target, workers, variants, pythons)
        for name, configs in frontier.items():
            tried[name].update(configs)
            failing = [c for c in configs if any(reasons[(name, c)])]
            for c in configs:
                if c not in failing and (name not in passed or _preference(c) < _preference(passed[name][0])):
                    passed[name] = (c, records[(name, c)])
            for c in failing:
                _sort_out(name, c, reasons[(name, c)], records[(name, c)], state)
            problems = {c: next(r for r in reasons[(name, c)] if r) for c in failing}
            if failing:
                first_rejection.setdefault(name, f"{failing[0].short()}: {problems[failing[0]]}")
            children = {child for c in failing for child in _children(c, entries[name][0], problems[c])}
            queue[name] = {c for c in queue[name] | children if c not in tried[name]
                           and (name not in passed or _preference(c) < _preference(passed[name][0]))}
    log += [_ship(document, name, best, best_records, target, checked_with, tritons)
            for name, (best, best_records) in passed.items()]
    unresolved = first_rejection.keys() - {n for n, e in document["tile_configs"].items() if "checked" in e}
    log += _small_tile_sweep(document, target, {name: entries[name] for name in unresolved}, workers, state, tried,
                             variants, pythons)
    least, fallback, plain_only = state["least"], state["fallback"], state["plain_only"]
    for name in first_rejection.keys() - {n for n, e in document["tile_configs"].items() if "checked" in e}:
        entry = document["tile_configs"][name]
        if name in fallback:
            config, records = fallback[name]
            slow = sorted(
                {f"{r.kernel} uses {r.matrix_instr}" for r in records
                 if r.expected_matrix_instr and r.matrix_instr != r.expected_matrix_instr}
            )
            entry["config"] = config.to_dict()
            entry["checked"] = (
                f"compiled with Triton {tritons} for {target}{checked_with}: {_summary(records)}; no config "
                f"with the fast matrix instruction avoided spills (first tried {first_rejection[name]}), so this is "
                f"the largest non-spilling one; {', '.join(slow)}"
            )
            log.append(f"{target} {name}: {config.short()} fits without the fast matrix instruction")
            continue
        if name in plain_only:  # the plain kernels fit: ship the tile the other variants spill least with, say so
            config, records = plain_only[name]
            spills = variant_spills(records)
            entry["config"] = config.to_dict()
            entry["variant_spills"] = spills
            entry["checked"] = (
                f"compiled with Triton {tritons} for {target}{checked_with}: no config tried fits every "
                f"variant (first tried {first_rejection[name]}); the plain kernels fit with this one and the other "
                f"variants spill least: {_summary(records)}"
            )
            log.append(f"{target} {name}: {config.short()} fits the plain kernels; spills with "
                       + ", ".join(f"{v} ({', '.join(launches)})" for v, launches in spills.items()))
            continue
        if name in least:  # every config tried compiles but spills: ship none, say so (the backend refuses it)
            config, records = least[name]
            entry.pop("config")
            entry["no_spill_free_tile"] = no_spill_free_tile(config, records, len(tried[name]), tritons)
            entry["checked"] = (
                f"compiled with Triton {tritons} for {target}: every one of {len(tried[name])} configs "
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
                      state: dict | None = None, tried: dict | None = None, variants: Iterable[str] = ("plain",),
                      pythons: Iterable[str | None] = (None,)) -> list:
    """Compile ``SMALL_TILES`` for entries nothing else passed; keep the largest that fits with the target's
    matrix instruction (with every variant).  ``state`` / ``tried``: updated as ``verify_document`` keeps them.

    The plain kernels of every small tile are compiled at once; the other variants one tile per entry at a time,
    largest first, until one passes (so an entry compiles its mods for as few tiles as it can).  Tiles whose plain
    kernels fit only with the slower matrix instruction come after the others, and are compiled with every variant
    too before one becomes the entry's fallback."""
    if not entries:
        return []
    state = {"least": {}, "fallback": {}, "plain_only": {}} if state is None else state
    tried = {} if tried is None else tried
    variants = ("plain", *(v for v in variants if v != "plain"))
    pending = {(name, c): entry for name, entry in entries.items() for c in SMALL_TILES}
    pythons = tuple(pythons)
    reasons, records = _round(pending, target, workers, ("plain",), pythons)  # the plain kernels only
    queue: dict[str, list[TileConfig]] = {}
    for name in entries:
        tried.setdefault(name, set()).update(SMALL_TILES)
        for c in SMALL_TILES:
            if not _only_instruction_problem(reasons[(name, c)]):
                _sort_out(name, c, reasons[(name, c)], records[(name, c)], state)
        queue[name] = sorted((c for c in SMALL_TILES if _only_instruction_problem(reasons[(name, c)])),
                             key=lambda c, name=name: (any(reasons[(name, c)]), _preference(c)))
    log, found = [], {}
    while any(queue.values()):
        batch = {(name, configs.pop(0)): entries[name] for name, configs in queue.items() if configs}
        batch_reasons, batch_records = (_round(batch, target, workers, variants, pythons) if len(variants) > 1
                                        else ({k: reasons[k] for k in batch}, {k: records[k] for k in batch}))
        for (name, c), config_reasons in batch_reasons.items():
            if not any(config_reasons):
                found[name] = (c, batch_records[(name, c)])
                queue[name] = []
            else:
                _sort_out(name, c, config_reasons, batch_records[(name, c)], state)
                if _only_instruction_problem(config_reasons) and any(reasons[(name, c)]):
                    queue[name] = []  # the largest slower-instruction tile fitting every variant: the fallback
    checked_with = f" ({len(variants)} variants: {', '.join(variants)})" if len(variants) > 1 else ""
    return log + [_ship(document, name, best, best_records, target, checked_with, triton_versions(pythons),
                        sweep=True) for name, (best, best_records) in found.items()]


def _ship(document: dict, name: str, config: TileConfig, records, target: str, checked_with: str, tritons: str,
          sweep: bool = False) -> str:
    """Make ``config`` the entry's, with what its compile measured (with Triton ``tritons``) in ``checked``; returns
    the log line."""
    entry = document["tile_configs"][name]
    entry["config"] = config.to_dict()
    entry["checked"] = (f"compiled with Triton {tritons} for {target}{checked_with}: {_summary(records)}"
                        + (" (small-tile sweep: the shrink search found none)" if sweep else ""))
    return f"{target} {name}: {config.short()} fits" + (" (small-tile sweep)" if sweep else "")


def copy_checked(document: dict, source_dtype: str = "bfloat16", target_dtype: str = "float16") -> None:
    """Give ``target_dtype`` entries the checked config of the same-sized ``source_dtype`` entry."""
    for name, entry in document["tile_configs"].items():
        kernel, dtype, dims = name.split()
        twin = document["tile_configs"].get(f"{kernel} {source_dtype} {dims}")
        if dtype == target_dtype and twin and "checked" in twin:
            entry.pop("variant_spills", None)
            if "variant_spills" in twin:
                entry["variant_spills"] = json.loads(json.dumps(twin["variant_spills"]))
            if "config" in twin:
                entry["config"] = dict(twin["config"])
            else:  # no spill-free tile: the same element size spills the same
                entry.pop("config", None)
                entry["no_spill_free_tile"] = json.loads(json.dumps(twin["no_spill_free_tile"]))
            entry["checked"] = f"as {source_dtype} (same element size): {twin['checked']}"


def compile_copied(document: dict, target: str, dtype: str = "float16", workers: int = 2,
                   variants: Iterable[str] = ("plain",), pythons: Iterable[str | None] = (None,)) -> list[str]:
    """Compile the configs ``copy_checked`` gave ``dtype`` entries that hold ``variant_spills``, with every one
    of ``variants``: their ``variant_spills`` become what ``dtype`` spills (fp16 and bf16 need different
    registers: gfx1100 dK/dV at D=128 with relative_bias spills 54 VGPRs in bf16, 59 in fp16), and ``checked``
    says what ``dtype`` measured.  (The other copied entries are compiled in fp16 by the slow tests only: a
    full fp16 check would double the compile time.)  Returns one line per entry that spills anything."""
    variants = ("plain", *(v for v in variants if v != "plain"))
    entries = {name: entry for name, entry in _entries(document, (dtype,)).items()
               if "variant_spills" in document["tile_configs"][name]}
    pending = {(name, TileConfig.from_dict(document["tile_configs"][name]["config"])): entry
               for name, entry in entries.items()}
    if not pending:
        return []
    _, all_records = _round(pending, target, workers, variants, tuple(pythons))
    log = []
    for (name, _config), records in all_records.items():
        entry = document["tile_configs"][name]
        entry.pop("variant_spills", None)
        spills = variant_spills(records)
        if spills:
            entry["variant_spills"] = spills
            log.append(f"{target} {name}: spills with "
                       + ", ".join(f"{v} ({', '.join(launches)})" for v, launches in spills.items()))
        entry["checked"] += f"; compiled for {dtype} too: {_summary(records)}"
    return log
