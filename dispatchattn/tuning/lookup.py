"""``select_config``: the tile config for one call, and a sentence saying where it came from.

Order: interpreter default (CPU) -> user cache (tuned on this device) -> tune now (``DISPATCHATTN_AUTOTUNE=1``
on a GPU) -> shipped default for the arch -> heuristic.  An in-memory memo in front makes a warm call a
dictionary lookup.  Nothing here raises because of the cache: the worst case is the heuristic, with the
reason in the source sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import filelock
import torch

from .. import envs
from ..capabilities import DeviceCaps
from ..spec import AttentionSpec
from . import shipped, store
from .config import TileConfig
from .key import TuneKey, make_key, user_cache_path
from .space import heuristic_config_and_note, pow2_at_least, why_config_cannot_launch

logger = logging.getLogger("dispatchattn")

INTERPRETER_SOURCE = "interpreter default"
INTERPRETER_BLOCK = 64
FALLBACK = TileConfig(64, 64, num_warps=4, num_stages=2)  # fits every arch in the table at D <= 128
#: Kernels ``DISPATCHATTN_AUTOTUNE=1`` tunes on a cache miss; others ("decode") use the shipped default.
TUNED_ON_MISS = ("fwd", "bwd")
_memo: dict[tuple, tuple[TileConfig, str]] = {}


def interpreter_config(spec: AttentionSpec) -> TileConfig:
    """Tiles for Triton's CPU interpreter: 64 x 64, or the padded length when shorter.

    The interpreter's cost grows with the number of tile steps, not their size; measured here on
    triton_flex (B=1, H=2, S=100, D=64, causal): forward 0.5 s at 64x64, 0.8 s at 32x32, 1.7 s at 16x16.
    """
    return TileConfig(
        min(INTERPRETER_BLOCK, pow2_at_least(spec.seq_q)),
        min(INTERPRETER_BLOCK, pow2_at_least(spec.seq_kv)),
        num_warps=4,
        num_stages=1,
    )


def clear_memo() -> None:
    """Forget every memoised selection (tests; after ``tune --clear``)."""
    _memo.clear()


def select_config(kernel: str, spec: AttentionSpec, caps: DeviceCaps) -> tuple[TileConfig, str]:
    """The tile config for ``kernel`` ("fwd" / "bwd" / "decode") of ``spec`` on ``caps``, and where it came from.

    The source reads after "from": ``user cache (/path/file.json)``, ``shipped default (not measured)
    for sm_90: ...``, ``heuristic (no tuned entry; ...)``, ``interpreter default``.  Never raises.
    """
    if not caps.is_gpu:  # caps, not the tensors, decide: under capabilities.pretend() explain the GPU
        return interpreter_config(spec), INTERPRETER_SOURCE
    memo_key = (kernel, spec, caps, envs.cache_dir(), envs.autotune_on_miss())
    try:
        hit = _memo.get(memo_key)
    except TypeError:  # e.g. an unhashable user mask_mod object: no memo for this spec
        hit, memo_key = None, None
    if hit is not None:
        return hit
    try:
        result = _select_uncached(kernel, spec, caps)
    except Exception as error:  # the cache must never fail a call
        result = _after_failure(kernel, spec, caps, error)
    if memo_key is not None and not torch.compiler.is_compiling():  # memo filled while tracing = recompile
        _memo[memo_key] = result
    return result


def _after_failure(kernel: str, spec: AttentionSpec, caps: DeviceCaps, error: Exception) -> tuple[TileConfig, str]:
    failure = f"the tile-config cache failed: {type(error).__name__}: {error}"
    try:
        config, note = _heuristic(kernel, spec, caps)
    except Exception:
        return FALLBACK, f"fallback ({failure})"
    return config, f"heuristic ({note}; {failure})"


def _heuristic(kernel: str, spec: AttentionSpec, caps: DeviceCaps) -> tuple[TileConfig, str]:
    return heuristic_config_and_note(kernel, caps.arch, spec.dtype, spec.head_dim, spec.head_dim_v)


def _user_lookup(
    kernel: str, spec: AttentionSpec, caps: DeviceCaps, key: TuneKey
) -> tuple[TileConfig | None, Path, store.LoadResult, str]:
    """(config, path, load result, why not): the user cache's entry for ``key`` when it can launch on ``caps``;
    else None and, for an entry that cannot (a hand-edited tile over the target's shared memory, say), the reason."""
    path = user_cache_path(key)
    loaded = store.load(path, key.header)
    found = _from_entry(loaded.entries.get(key.entry))
    if found is None:
        return None, path, loaded, ""
    problem = why_config_cannot_launch(kernel, found, caps.arch, spec.dtype, spec.head_dim, spec.head_dim_v)
    if problem:
        return None, path, loaded, f"the user cache's {found.short()} ({path}) is not used: {problem}"
    return found, path, loaded, ""


def _where(path: Path, loaded: store.LoadResult) -> str:
    return str(path if loaded.healthy else f"{path}, kept in memory: {loaded.status}")


def user_entry(kernel: str, spec: AttentionSpec, caps: DeviceCaps) -> tuple[TileConfig, str] | None:
    """The config tuned on this device for ``kernel`` and ``spec`` in the user cache, with where it was read,
    or None (none there, or one that cannot launch on ``caps``)."""
    found, path, loaded, _ = _user_lookup(kernel, spec, caps, make_key(kernel, spec, caps))
    return None if found is None else (found, _where(path, loaded))


def _select_uncached(kernel: str, spec: AttentionSpec, caps: DeviceCaps) -> tuple[TileConfig, str]:
    key = make_key(kernel, spec, caps)
    found, path, loaded, rejected = _user_lookup(kernel, spec, caps, key)
    if found is not None:
        return found, f"user cache ({_where(path, loaded)})"
    trouble = "" if loaded.healthy else f"; {loaded.status}"
    trouble += f"; {rejected}" if rejected else ""
    tunable = kernel in TUNED_ON_MISS  # the decoding kernel has no timing harness in ``tuning`` yet
    if tunable and envs.autotune_on_miss() and spec.device_type == "cuda" and not torch.compiler.is_compiling():
        tuned, why = _tune_on_miss(kernel, spec, caps, key, path)
        if tuned is not None:
            return tuned, why
        trouble += f"; {why}"
    from_shipped = shipped.lookup(kernel, caps.arch, key.dtype, spec.head_dim, spec.head_dim_v)
    if from_shipped is not None:
        config, source = from_shipped
        return config, source + trouble
    config, note = _heuristic(kernel, spec, caps)
    return config, f"heuristic (no tuned entry for {key.entry}; {note}{trouble})"


def _from_entry(entry) -> TileConfig | None:
    if not isinstance(entry, dict):
        return None
    try:
        return TileConfig.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError):
        return None  # a hand-edited or damaged entry: tuned again / replaced on the next write


def _tuning_lock(path: Path, key: TuneKey):
    """A per-key lock beside the cache file; no lock when the directory is unusable (tuned in memory)."""
    digest = hashlib.sha1(key.entry.encode()).hexdigest()[:12]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return contextlib.nullcontext()
    return filelock.FileLock(str(path.with_name(f".{path.stem}.{digest}.tuning.lock")), timeout=0)


def _tune_on_miss(
    kernel: str, spec: AttentionSpec, caps: DeviceCaps, key: TuneKey, path: Path
) -> tuple[TileConfig | None, str]:
    """Tune now (``DISPATCHATTN_AUTOTUNE=1``): (best config, source) or (None, why not).

    A per-key lock makes one process of many (e.g. the ranks of a job) tune while the others go on
    with the default instead of all timing the same candidates on a shared GPU.
    """
    from . import measure

    try:
        with _tuning_lock(path, key):
            bench = measure.kernel_bench_fn(kernel, spec, caps)
            candidates = measure.candidates_for(kernel, spec, caps)
            result = measure.tune(kernel, spec, caps, candidates, bench, progress=False)
    except filelock.Timeout:
        return None, "another process is tuning this key"
    except Exception as error:  # e.g. the kernel cannot be imported: tuning is an optimisation only
        logger.warning("dispatchattn autotune of %s failed: %s: %s", key.entry, type(error).__name__, error)
        return None, f"autotune failed: {type(error).__name__}: {error}"
    if not result.succeeded:
        return None, f"autotune failed: all {len(result.timings)} candidates failed"
    logger.info("dispatchattn autotune:\n%s", result.table())
    return result.best, f"tuned now ({result.store_status})"
