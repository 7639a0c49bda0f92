"""Every environment variable dispatchattn reads, read here and nowhere else.

Values are read on each call, so tests and users can change them at run time.  The two read by every call
come from ``os.environ``'s backing dict: ``eager_raw`` in eager mode, ``TRACED_ENVIRON`` in code torch.compile
traces (dynamo guards those two entries, so a changed value traces a new graph).
"""

from __future__ import annotations

import os

import torch

EXPLAIN = "DISPATCHATTN_EXPLAIN"
BACKEND = "DISPATCHATTN_BACKEND"
CACHE_DIR = "DISPATCHATTN_CACHE_DIR"
AUTOTUNE = "DISPATCHATTN_AUTOTUNE"
REQUIRE_GPU = "DISPATCHATTN_REQUIRE_GPU"
DENSE_MASK_BUDGET = "DISPATCHATTN_DENSE_MASK_BUDGET_MB"
TRITON_INTERPRET = "TRITON_INTERPRET"
FLASH_TRITON_AMD = "FLASH_ATTENTION_TRITON_AMD_ENABLE"


# ``os.environ.get`` costs ~1 us (the key is encoded through the Mapping ABC on every read), a third of the
# dispatch budget of a warm call; ``os.environ``'s backing dict with the key encoded once costs ~0.1 us.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODED = {}


def _per_call(name: str) -> str:
    """``os.environ.get(name, "")`` for values read on every call."""
    if _ENVIRON_DATA is None or torch.compiler.is_compiling():
        return os.environ.get(name, "")
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = os.environ.encodekey(name)
    raw = _ENVIRON_DATA.get(key)
    return "" if raw is None else os.environ.decodevalue(raw)


if _ENVIRON_DATA is not None:
    _EAGER_KEYS = (os.environ.encodekey(EXPLAIN), os.environ.encodekey(BACKEND))

    def eager_raw() -> tuple[object, object]:
        """(DISPATCHATTN_EXPLAIN, DISPATCHATTN_BACKEND) as stored (None when unset), for the warm eager call
        only: ~0.2 us for both.  ``as_text`` turns a value into text."""
        data = _ENVIRON_DATA
        return data.get(_EAGER_KEYS[0]), data.get(_EAGER_KEYS[1])
else:  # pragma: no cover - a platform whose os.environ has no backing dict
    def eager_raw() -> tuple[object, object]:
        return os.environ.get(EXPLAIN), os.environ.get(BACKEND)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class _EnvironByBytes:
    """``os.environ`` read with bytes keys, where its backing dict does not store them (Windows)."""

    @staticmethod
    def get(key: bytes):
        return os.environ.get(key.decode())


#: ``os.environ``'s backing dict, for code torch.compile traces to read with literal bytes keys (decoded with
#: ``as_text``): dynamo then guards exactly those entries (a changed value traces a new graph), and nothing else.
TRACED_ENVIRON = _ENVIRON_DATA if os.name == "posix" and isinstance(_ENVIRON_DATA, dict) else _EnvironByBytes()


def as_text(raw) -> str:
    """A value from ``eager_raw`` / ``TRACED_ENVIRON`` as text ("" when unset)."""
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else os.environ.decodevalue(raw)


def explain_level(raw: str | None = None) -> int:
    """0: silent, 1: log each distinct decision once, 2: log every call (``raw``: the value already read)."""
    raw = (_per_call(EXPLAIN) if raw is None else raw).strip()
    if not raw:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        return 1 if _truthy(raw) else 0


def backend_raw() -> str:
    """The raw ``DISPATCHATTN_BACKEND`` value ("" when unset)."""
    return _per_call(BACKEND)


def parse_backend_list(raw: str) -> tuple[str, ...] | None:
    """"triton_flex, sdpa" -> ("triton_flex", "sdpa"); blank -> None."""
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    return names or None


def cache_dir() -> str | None:
    return os.environ.get(CACHE_DIR) or None


def autotune_on_miss() -> bool:
    return _truthy(os.environ.get(AUTOTUNE))


def require_gpu() -> bool:
    return _truthy(os.environ.get(REQUIRE_GPU))


def triton_interpret() -> bool:
    return _truthy(os.environ.get(TRITON_INTERPRET))


def flash_triton_amd() -> bool:
    return (os.environ.get(FLASH_TRITON_AMD, "") or "").strip().upper() == "TRUE"


def dense_mask_budget_bytes() -> int:
    """Largest dense (B, H, Sq, Sk) mask the sdpa backend may build for a structured mask."""
    raw = os.environ.get(DENSE_MASK_BUDGET, "").strip()
    megabytes = float(raw) if raw else 256.0
    return int(megabytes * 2**20)
