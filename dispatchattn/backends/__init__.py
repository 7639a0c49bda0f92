"""Backends, registered by import path so an absent library costs nothing at import.

``BACKENDS`` maps the contract's names to ``module:Class``; ``get_backend(name)`` imports on first use.
"""

from __future__ import annotations

import functools
import importlib

from .base import Backend, Reason

BACKENDS: dict[str, str] = {
    "flash": "dispatchattn.backends.flash:FlashBackend",
    "xformers": "dispatchattn.backends.xformers:XformersBackend",
    "sdpa": "dispatchattn.backends.sdpa:SdpaBackend",
    "triton_flex": "dispatchattn.backends.triton_flex.backend:TritonFlexBackend",
    "torch_flex": "dispatchattn.backends.torch_flex:TorchFlexBackend",
    "reference": "dispatchattn.backends.reference:ReferenceBackend",
}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)


class _Unavailable(Backend):
    """Stands in for a backend whose module failed to import, so the failure becomes a reason."""

    def __init__(self, name: str, error: BaseException):
        self.name = name
        self.error = error

    def why_not(self, spec, caps):
        return [Reason("import_failed", f"the {self.name} backend could not be loaded: {self.error!r}")]


@functools.cache
def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")
    module_name, class_name = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, AttributeError) as exc:
        return _Unavailable(name, exc)


__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "Reason", "get_backend"]
