"""Checking shipped default configs by compiling the kernels ahead of time for each target (no GPU needed).

The resource estimate in ``space.py`` prunes before timing; it cannot see what Triton really allocates.
``verify_document`` compiles every entry's config with ``backends.triton_flex.aot`` (each launch of the
kernel: forward, or the backward's dK/dV and dQ), and while a launch is rejected (shared memory over the
limit, registers spilled) shrinks the config one step, as the heuristic does.  Each entry then records
what was measured in ``checked``.  Still not timed: ``"measured": false`` stays.
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import TileConfig
from .space import _shrink

LAUNCHES = {"fwd": ("fwd",), "bwd": ("bwd_dkdv", "bwd_dq")}
MAX_ROUNDS = 8
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _summary(records) -> str:
    parts = []
    for record in records:
        spill = f", {record.spill_bytes:,} B spilled" if record.spill_bytes else ", no spills"
        parts.append(f"{record.kernel} {record.total_shared_bytes:,} B shared, {record.registers} registers{spill}")
    return "; ".join(parts)


def _compile_round(pending: dict[str, tuple[str, str, int, TileConfig]], target: str, workers: int):
    """{entry name: (config, [records])} for one batch of compiles of every pending entry."""
    from ..backends.triton_flex import aot

    jobs, owners = [], []
    for name, (kernel, dtype, head_dim, config) in pending.items():
        for launch in LAUNCHES[kernel]:
            jobs.append(aot.make_job(launch, config, target, DTYPE_SHORT[dtype], head_dim))
            owners.append(name)
    records: dict[str, list] = {name: [] for name in pending}
    for owner, record in zip(owners, aot.compile_jobs(jobs, workers=workers)):
        records[owner].append(record)
    return {name: [aot.reject_reason(r) for r in records[name]] for name in pending}, records


def _pending(document: dict, dtypes: Iterable[str]) -> dict[str, tuple[str, str, int, TileConfig]]:
    pending = {}
    for name, entry in document["tile_configs"].items():
        kernel, dtype, dims = name.split()
        if dtype in dtypes:
            head_dim = int(dims.removeprefix("d").split("/")[0])
            pending[name] = (kernel, dtype, head_dim, TileConfig.from_dict(entry["config"]))
    return pending


def verify_document(
    document: dict, target: str, dtypes: Iterable[str] = ("bfloat16",), workers: int = 2
) -> list[str]:
    """Compile and, where rejected, shrink the entries of ``document`` (for ``target``) of ``dtypes``.

    Updates entries in place (``config``, ``checked``, ``note``); returns one line per entry for a log.
    """
    import triton

    pending, log = _pending(document, dtypes), []
    rejected: dict[str, list[str]] = {name: [] for name in pending}
    for _ in range(MAX_ROUNDS):
        if not pending:
            break
        reasons, records = _compile_round(pending, target, workers)
        for name in list(pending):
            kernel, dtype, head_dim, config = pending.pop(name)
            entry = document["tile_configs"][name]
            problems = [r for r in reasons[name] if r]
            if not problems:
                entry["config"] = config.to_dict()
                entry["checked"] = f"compiled with Triton {triton.__version__} for {target}: {_summary(records[name])}"
                log.append(f"{target} {name}: {config.short()} fits")
                continue
            rejected[name].append(f"{config.short()}: {problems[0]}")
            smaller = _shrink(config, kernel, registers_short="spills" in problems[0], measured=True)
            if smaller is not None and len(rejected[name]) < MAX_ROUNDS:
                pending[name] = (kernel, dtype, head_dim, smaller)
                continue
            entry["checked"] = f"no config passed the ahead-of-time compile; kept the heuristic's: {rejected[name][0]}"
            log.append(f"{target} {name}: nothing passed, kept {entry['config']}")
    for name, trail in rejected.items():
        if trail:
            entry = document["tile_configs"][name]
            entry["note"] += f"; ahead-of-time compile rejected {len(trail)} config(s), first {trail[0]}"
    return log


def copy_checked(document: dict, source_dtype: str = "bfloat16", target_dtype: str = "float16") -> None:
    """Give ``target_dtype`` entries the checked config of the same-sized ``source_dtype`` entry."""
    for name, entry in document["tile_configs"].items():
        kernel, dtype, dims = name.split()
        twin = document["tile_configs"].get(f"{kernel} {source_dtype} {dims}")
        if dtype == target_dtype and twin and "checked" in twin:
            entry["config"] = dict(twin["config"])
            entry["checked"] = f"as {source_dtype} (same element size): {twin['checked']}"
