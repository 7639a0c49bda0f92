"""Explain mode: ``DISPATCHATTN_EXPLAIN=1`` logs each distinct decision once, ``=2`` every call.

Messages go to the ``dispatchattn`` logger; when the user configured no logging at all, a stderr handler
is attached so the explanation is visible.  ``emit`` is the one function that logs (registered with
dynamo as a reorderable logging function, so explaining inside a compiled region breaks no graph).
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("dispatchattn")
_seen: set[str] = set()


def _ensure_visible() -> None:
    if logger.handlers or logging.getLogger().handlers:
        if logger.getEffectiveLevel() > logging.INFO and not logger.handlers:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def emit(message: str) -> None:
    """Log one explanation on the ``dispatchattn`` logger."""
    _ensure_visible()
    logger.info(message)


def report(text: str, level: int) -> None:
    """Emit ``text`` (a rendered Decision) according to the explain level."""
    if level >= 2:
        emit(text)
    elif level == 1 and text not in _seen:
        _seen.add(text)
        emit(text)


def _register_with_dynamo() -> None:
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # pragma: no cover - torch without dynamo
        return
    functions = getattr(dynamo_config, "reorderable_logging_functions", None)
    if functions is not None:
        functions.add(emit)


_register_with_dynamo()
