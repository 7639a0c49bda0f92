"""Tile configs for the in-house Triton kernels: config space, on-disk cache, shipped defaults.

>>> import torch
>>> from dispatchattn.tuning import why_config_invalid, TileConfig
>>> why_config_invalid("fwd", TileConfig(128, 128, 8, 3), "sm_86", torch.float16, 128, 128)
'fwd BLOCK_M=128 BLOCK_N=128 D=128 stages=3 needs 133,120 B shared memory > 101,376 B on sm_86'
"""

from .config import TileConfig
from .key import TuneKey, autotune_dir, make_key, user_cache_path
from .lookup import INTERPRETER_SOURCE, clear_memo, select_config
from .measure import TuneResult, candidates_for, kernel_bench_fn, tune
from .space import config_space, estimate_resources, heuristic_config, why_config_invalid

__all__ = [
    "INTERPRETER_SOURCE",
    "TileConfig",
    "TuneKey",
    "TuneResult",
    "autotune_dir",
    "candidates_for",
    "clear_memo",
    "config_space",
    "estimate_resources",
    "heuristic_config",
    "kernel_bench_fn",
    "make_key",
    "select_config",
    "tune",
    "user_cache_path",
    "why_config_invalid",
]
