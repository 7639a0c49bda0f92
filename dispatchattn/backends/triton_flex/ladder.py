"""A kernel launch that cannot run with its tile config retries smaller ones before giving up.

The shipped and tuned configs were compiled ahead of time, but what a launch needs depends on the device, the
Triton release and the mods (a score_mod gathering from a captured table needs more shared memory than one that
does not): on an H200 with Triton 3.6, the shipped D=64 forward tile needed 245,760 B of shared memory for such a
mod, 232,448 B being the limit.  So every launch goes through ``run``: the config first, then fewer pipeline
stages, then smaller tiles (each still a valid tile: powers of two, at least 16), every failure recorded
(``dispatchattn.failures``) so that this process and the next skip it without compiling it again.  When no config
launches, ``LaunchFailed`` lists them all and the caller picks the next backend.

The block-sparse lists of a smaller tile come from the larger one (``block_mask.refine``): nothing else is needed,
so compiled graphs, which hold only the lists, retry the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch

from ...failures import LaunchFailed, describe, key, launch_failure, lookup, record
from ...tuning.config import TileConfig
from .block_mask import BlockMask, refine

T = TypeVar("T")
MIN_TILE = 16


def smaller_configs(kernel: str, config: TileConfig) -> list[TileConfig]:
    """``config``, then the same tile with fewer stages, then smaller tiles (forward and decoding: BLOCK_N halves
    first; backward: the larger side first), each from ``config``'s stages down to one."""
    tiles, (m, n) = [], (config.block_m, config.block_n)
    while True:
        tiles.append((m, n))
        if n > MIN_TILE and (kernel != "bwd" or n >= m):
            n //= 2
        elif m > MIN_TILE:
            m //= 2
        else:
            break
    return [replace(config, block_m=m, block_n=n, num_stages=stages)
            for m, n in tiles for stages in range(config.num_stages, 0, -1)]


def problem_key(dtype: torch.dtype, head_dim: int, head_dim_v: int, generated_key: str) -> str:
    """What a launch's resources depend on besides the config: dtype, head dims and the generated mods."""
    return f"{str(dtype).removeprefix('torch.')} d{head_dim}/{head_dim_v} mods={generated_key}"


def launch_problem(q: torch.Tensor, v: torch.Tensor, generated) -> str:
    """``problem_key`` of a launch on ``q`` / ``v`` with ``generated`` mods."""
    return problem_key(q.dtype, q.shape[-1], v.shape[-1], generated.key)


def run(kernel: str, config: TileConfig, block_mask: BlockMask | None, problem: str, device: torch.device,
        attempt: Callable[[TileConfig, BlockMask | None], T], tile_fixed: bool = False) -> T:
    """``attempt(config, block_mask)`` with ``config``, else with each smaller config (``tile_fixed``: fewer stages
    only) and the block mask refined to its tiles.  Raises ``LaunchFailed`` when none launches; any other error of
    ``attempt`` propagates at once."""
    from ...capabilities import probe

    caps = probe(device)
    tried: list[tuple[str, str]] = []
    for candidate in smaller_configs(kernel, config):
        if tile_fixed and (candidate.block_m, candidate.block_n) != (config.block_m, config.block_n):
            continue
        record_key = key("triton_flex", kernel, problem, candidate.short())
        known = lookup(caps, record_key)
        if known is not None:
            tried.append((candidate.short(), describe(known)))
            continue
        tiles = None if block_mask is None else refine(block_mask, candidate.block_m, candidate.block_n)
        try:
            return attempt(candidate, tiles)
        except Exception as error:
            why = launch_failure(error)
            if why is None:
                raise
            record(caps, record_key, why)
            tried.append((candidate.short(), why))
    raise LaunchFailed(kernel, tried)


def first_launchable(kernel: str, config: TileConfig, problem: str, caps) -> tuple[TileConfig, str | None]:
    """The first config of ``smaller_configs`` with no recorded failure on ``caps``, and a sentence on the failed
    ones it skips (None when none is skipped); ``config`` itself when every one has failed (the launch says so)."""
    skipped: dict[str, list[str]] = {}  # failure -> configs
    runs = config
    for candidate in smaller_configs(kernel, config):
        known = lookup(caps, key("triton_flex", kernel, problem, candidate.short()))
        if known is None:
            runs = candidate
            break
        skipped.setdefault(describe(known), []).append(candidate.short())
    if not skipped:
        return config, None
    said = "; ".join(f"{' and '.join(configs)} failed to launch here: {why}" for why, configs in skipped.items())
    return runs, f"{said}; so {runs.short()} runs" if runs != config else f"{said}; no smaller config is left"

