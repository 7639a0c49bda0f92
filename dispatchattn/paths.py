"""Where dispatchattn keeps its on-disk caches (autotune results, generated kernels, AOT artifacts)."""

from __future__ import annotations

from pathlib import Path

import platformdirs

from . import envs


def cache_root() -> Path:
    """``DISPATCHATTN_CACHE_DIR`` if set, else the user cache directory (``~/.cache/dispatchattn`` on Linux).

    The directory is not created here: writers create what they need and degrade gracefully when they cannot.
    """
    configured = envs.cache_dir()
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_cache_dir("dispatchattn", appauthor=False))
