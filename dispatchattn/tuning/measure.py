"""Timing candidate tile configs and keeping the fastest.

``tune`` takes the timing function as an argument (``bench_fn(config) -> seconds``) so the search is
tested with a deterministic fake; ``kernel_bench_fn`` builds the real one, which times
``triton_flex_attention`` with ``triton.testing.do_bench`` on a GPU.  A config that fails (Triton's
``OutOfResources``, a compile error, ...) scores ``inf`` and is reported, never raised.
"""

from __future__ import annotations

import datetime
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..capabilities import DeviceCaps
from ..spec import AttentionSpec
from . import store
from .config import TileConfig
from .key import TuneKey, make_key, user_cache_path
from .space import config_space, heuristic_config, pow2_at_least

BenchFn = Callable[[TileConfig], float]


@dataclass
class TuneResult:
    """The outcome of timing every candidate of one key: the best, the default, and every time."""

    kernel: str
    key: TuneKey
    default: TileConfig
    timings: dict[TileConfig, float]  # seconds; inf for configs that failed
    failures: dict[TileConfig, str] = field(default_factory=dict)
    store_status: str | None = None

    @property
    def best(self) -> TileConfig:
        return min(self.timings, key=lambda c: (self.timings[c], c != self.default))

    @property
    def best_seconds(self) -> float:
        return self.timings[self.best]

    @property
    def default_seconds(self) -> float:
        return self.timings.get(self.default, math.inf)

    @property
    def speedup(self) -> float:
        """Default time over best time (nan when either failed)."""
        if not math.isfinite(self.best_seconds) or not math.isfinite(self.default_seconds):
            return math.nan
        return self.default_seconds / self.best_seconds

    @property
    def succeeded(self) -> bool:
        return math.isfinite(self.best_seconds)

    def entry(self) -> dict:
        """The cache entry: config, times and provenance, readable in the JSON file."""
        return {
            "config": self.best.to_dict(),
            "seconds": _finite_or_none(self.best_seconds),
            "default_config": self.default.to_dict(),
            "default_seconds": _finite_or_none(self.default_seconds),
            "candidates": len(self.timings),
            "failed": len(self.failures),
            "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "key": self.key.to_dict(),
        }

    def table(self, top: int = 5) -> str:
        """The fastest ``top`` configs, the default, and the speedup, as a fixed-width table."""
        ranked = sorted(self.timings, key=self.timings.__getitem__)
        rows = ranked[:top] + ([self.default] if self.default not in ranked[:top] else [])
        lines = [f"{self.key.entry} on {self.key.device_name} ({self.key.arch})", f"{'config':<64} {'ms':>9}"]
        for config in rows:
            label = config.short() + ("  [default]" if config == self.default else "")
            lines.append(f"{label:<64} {_ms(self.timings[config]):>9}")
        lines.append(
            f"best {self.best.short()}: {_ms(self.best_seconds)} ms; speedup over default {self.speedup:.2f}x;"
            f" {len(self.timings)} timed, {len(self.failures)} failed"
        )
        return "\n".join(lines)


def _finite_or_none(seconds: float) -> float | None:
    return seconds if math.isfinite(seconds) else None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4f}" if math.isfinite(seconds) else "failed"


def candidates_for(kernel: str, spec: AttentionSpec, caps: DeviceCaps) -> list[TileConfig]:
    """``config_space`` without tiles larger than the (power-of-two padded) problem; never empty."""
    default = heuristic_config(kernel, caps.arch, spec.dtype, spec.head_dim, spec.head_dim_v)
    space = config_space(kernel, caps, spec.dtype, spec.head_dim, spec.head_dim_v)
    rows, cols = pow2_at_least(spec.seq_q), pow2_at_least(spec.seq_kv)
    if kernel == "bwd":  # the backward kernel walks both ways (BLOCK_M2 = BLOCK_N, BLOCK_N2 = BLOCK_M)
        rows = cols = max(rows, cols)
    useful = [c for c in space if c.block_m <= rows and c.block_n <= cols]
    return useful or [default]


def tune(
    kernel: str,
    spec: AttentionSpec,
    caps: DeviceCaps,
    candidates: Sequence[TileConfig],
    bench_fn: BenchFn,
    progress: bool = True,
    *,
    save: bool = True,
    cache_file: Path | None = None,
) -> TuneResult:
    """Time every candidate (and the heuristic default) with ``bench_fn``; keep the fastest.

    ``bench_fn(config) -> seconds`` may raise: the config then scores inf and its error is kept in
    ``failures``.  With ``save`` the best config is stored in the user cache (``cache_file``, a path,
    defaults to the one ``select_config`` reads) when at least one config ran.
    """
    key = make_key(kernel, spec, caps)
    default = heuristic_config(kernel, caps.arch, spec.dtype, spec.head_dim, spec.head_dim_v)
    ordered = [default] + [c for c in dict.fromkeys(candidates) if c != default]
    result = TuneResult(kernel, key, default, {})
    bar = tqdm(ordered, desc=f"tuning {kernel}", unit="config", disable=not progress, file=sys.stderr)
    for config in bar:
        result.timings[config] = _time_one(config, bench_fn, result.failures)
        if progress and result.succeeded:
            bar.set_postfix_str(f"best {_ms(result.best_seconds)} ms", refresh=False)
    bar.close()
    if save and result.succeeded:

        path = cache_file if cache_file is not None else user_cache_path(key)
        result.store_status = store.put(path, key.entry, result.entry(), key.header)
    return result


def _time_one(config: TileConfig, bench_fn: BenchFn, failures: dict[TileConfig, str]) -> float:
    try:
        seconds = float(bench_fn(config))
    except Exception as error:  # OutOfResources, compile errors, CUDA errors: the config is unusable
        failures[config] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        failures[config] = f"timing returned {seconds!r}"
        return math.inf
    return seconds


def make_inputs(spec: AttentionSpec, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random (B, H, S, D) query, key and value for ``spec`` on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = (
        (spec.batch, spec.heads_q, spec.seq_q, spec.head_dim),
        (spec.batch, spec.heads_kv, spec.seq_kv, spec.head_dim),
        (spec.batch, spec.heads_kv, spec.seq_kv, spec.head_dim_v),
    )
    return tuple(torch.randn(s, generator=generator, device=device, dtype=spec.dtype) for s in shapes)


def kernel_bench_fn(
    kernel: str, spec: AttentionSpec, caps: DeviceCaps, device: torch.device | None = None
) -> BenchFn:
    """The real timing function: ``triton.testing.do_bench`` over ``triton_flex_attention`` on a GPU
    (``device`` defaults to the current CUDA / ROCm device).

    For ``bwd`` the forward runs once with the heuristic forward config and only the backward is timed.
    """
    import triton.testing

    from ..backends.triton_flex.autograd import triton_flex_attention
    from ..masks import causal

    device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    query, key, value = make_inputs(spec, device)
    mask_mod = spec.mask if spec.mask is not None else (causal() if spec.is_causal else None)
    scale = spec.scale if spec.scale is not None else spec.head_dim**-0.5
    options = dict(score_mod=spec.score, mask_mod=mask_mod, scale=scale)

    def forward(config: TileConfig) -> float:
        def run():
            return triton_flex_attention(query, key, value, **options, fwd_config=config, bwd_config=config)

        return triton.testing.do_bench(run, warmup=5, rep=25) * 1e-3

    def backward(config: TileConfig) -> float:
        fwd_config = heuristic_config("fwd", caps.arch, spec.dtype, spec.head_dim, spec.head_dim_v)
        inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
        out, _ = triton_flex_attention(*inputs, **options, fwd_config=fwd_config, bwd_config=config)
        grad = torch.randn_like(out)

        def run():
            out.backward(grad, retain_graph=True)

        return triton.testing.do_bench(run, warmup=5, rep=25, grad_to_none=inputs) * 1e-3

    return forward if kernel == "fwd" else backward
