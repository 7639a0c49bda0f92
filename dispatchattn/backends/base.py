"""The backend interface: declared limits at the top, ``why_not(spec, caps)``, ``run(call, spec, config)``.

Each backend file reads the same way, so two backends can be compared side by side.  The generic
limits (devices, dtypes, head dims, dropout, lse, backward) are class attributes; ``why_not`` turns them
into sentences and each backend appends its own in ``_why_not``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..capabilities import DeviceCaps
from ..spec import AttentionSpec


class Reason(str):
    """A reason a backend cannot run a call: a sentence (the str itself) with a stable machine ``code``.

    >>> r = Reason("head_dim_too_large", "head_dim 320 exceeds 256, the flash-attn 2.6.3 limit")
    >>> r.code, str(r)
    ('head_dim_too_large', 'head_dim 320 exceeds 256, the flash-attn 2.6.3 limit')
    """

    code: str

    def __new__(cls, code: str, message: str) -> Reason:
        obj = super().__new__(cls, message)
        obj.code = code
        return obj

    def __reduce__(self):
        return (Reason, (self.code, str(self)))

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": str(self)}


def _dtype_names(dtypes) -> str:
    return "{" + ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) + "}"


@dataclass(slots=True)
class AttentionCall:
    """The tensors and callables of one call, normalised (``scale`` resolved, mods bound to lengths).

    Tensors keep the user's layout; ``bhsd(t)`` gives a (B, H, S, D) view without copying.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    mask_mod: Callable | None
    score_mod: Callable | None
    scale: float
    dropout_p: float
    is_causal: bool
    enable_gqa: bool
    return_lse: bool
    layout: str
    #: ``(q, k, v, dout, dlse, grad_tensors, failure) -> grads`` for a backend whose backward cannot launch on
    #: this device: the gradients from the next allowed backend (set by ``api``; None: the failure is raised).
    backward_fallback: Callable | None = None

    def bhsd(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.layout == "bhsd" else t.transpose(1, 2)

    def from_bhsd(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.layout == "bhsd" else out.transpose(1, 2)


def random_call(spec: AttentionSpec, device: torch.device, batch: int | None = None,
                requires_grad: bool = False) -> AttentionCall:
    """A call of ``spec``'s shapes (``batch`` rows, default the spec's) on random inputs, with the spec's mods bound
    to its lengths: for trying or timing a backend on a problem without the caller's tensors."""
    from ..masks import MaskMod
    from ..scores import ScoreMod

    make = dict(dtype=spec.dtype, device=device)
    rows = spec.batch if batch is None else batch
    shapes = ((spec.heads_q, spec.seq_q, spec.head_dim), (spec.heads_kv, spec.seq_kv, spec.head_dim),
              (spec.heads_kv, spec.seq_kv, spec.head_dim_v))
    q, k, v = (torch.randn(rows, h, s, d, **make) for h, s, d in shapes)
    if spec.layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    attn_mask = None
    if spec.attn_mask is not None:
        kind, shape = spec.attn_mask
        shape = tuple(min(size, rows) if axis == 0 else size for axis, size in enumerate(shape))
        attn_mask = torch.rand(shape, device=device) > 0.05 if kind == "bool" else torch.randn(shape, **make)
    mask = spec.mask.bind(spec.seq_q, spec.seq_kv) if isinstance(spec.mask, MaskMod) else spec.mask
    score = spec.score.bind(spec.seq_q, spec.seq_kv) if isinstance(spec.score, ScoreMod) else spec.score
    scale = spec.scale if spec.scale is not None else 1.0 / spec.head_dim ** 0.5
    return AttentionCall(q, k, v, attn_mask, mask, score, scale, spec.dropout_p, spec.is_causal,
                         spec.heads_q != spec.heads_kv, spec.return_lse, spec.layout)


class Backend:
    """Base of every backend.  Subclasses set the limits below and implement ``_why_not`` and ``run``."""

    name: ClassVar[str]
    #: Vendors ("cpu", "cuda", "rocm", ...) the backend can run on at all.
    SUPPORTED_VENDORS: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda", "rocm"})
    SUPPORTED_DTYPES: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float16, torch.bfloat16, torch.float32})
    #: Largest head dim (QK and V) or None for no limit; the source of the number goes in a comment.
    MAX_HEAD_DIM: ClassVar[int | None] = None
    SUPPORTS_DROPOUT: ClassVar[bool] = True
    SUPPORTS_LSE: ClassVar[bool] = True
    SUPPORTS_BACKWARD: ClassVar[bool] = True
    SUPPORTS_DV_NE_D: ClassVar[bool] = True
    #: Tunable backends return a tile config from ``tile_config``.
    TUNABLE: ClassVar[bool] = False
    #: The backward can fail to launch after the forward ran (its own kernels and configs): ``run`` hands
    #: ``call.backward_fallback`` to it, which computes the gradients with the next allowed backend.
    BACKWARD_FALLBACK: ClassVar[bool] = False
    #: The backward runs kernels that may refuse to launch on this device (a library's backward kernels): the call
    #: guards it (``api._GuardedBackward``) so that the next backend computes the gradients instead.
    BACKWARD_MAY_FAIL: ClassVar[bool] = True

    def library_label(self, caps: DeviceCaps) -> str:
        """How reasons name the backend's library, with its version ("flash-attn 2.6.3")."""
        return self.name

    def why_not(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        """Every reason this backend cannot run ``spec`` on ``caps``; ``[]`` means it can."""
        reasons = self._generic_reasons(spec, caps)
        if not any(r.code in ("not_installed", "device_unsupported") for r in reasons):
            reasons.extend(self._why_not(spec, caps))
        return reasons

    def _generic_reasons(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        label = self.library_label(caps)
        reasons: list[Reason] = []
        if caps.vendor not in self.SUPPORTED_VENDORS:
            reasons.append(Reason(
                "device_unsupported",
                f"runs on {_vendor_list(self.SUPPORTED_VENDORS)}, the tensors are on {caps.describe()}",
            ))
            return reasons
        if spec.dtype not in self.SUPPORTED_DTYPES:
            reasons.append(Reason(
                "dtype_unsupported",
                f"dtype={str(spec.dtype).removeprefix('torch.')} (supported by {label}: "
                f"{_dtype_names(self.SUPPORTED_DTYPES)})",
            ))
        limit = self.MAX_HEAD_DIM
        if limit is not None and max(spec.head_dim, spec.head_dim_v) > limit:
            reasons.append(Reason(
                "head_dim_too_large",
                f"head_dim {max(spec.head_dim, spec.head_dim_v)} exceeds {limit}, the {label} limit",
            ))
        if spec.head_dim != spec.head_dim_v and not self.SUPPORTS_DV_NE_D:
            reasons.append(Reason(
                "dv_ne_d", f"value head dim {spec.head_dim_v} differs from query/key head dim {spec.head_dim}, "
                f"which {label} does not support",
            ))
        if spec.dropout_p > 0 and not self.SUPPORTS_DROPOUT:
            reasons.append(Reason("dropout_unsupported", f"dropout_p={spec.dropout_p} but {label} has no dropout"))
        if spec.return_lse and not self.SUPPORTS_LSE:
            reasons.append(Reason("lse_unsupported", f"return_lse=True but {label} does not return the lse"))
        if spec.requires_grad and not self.SUPPORTS_BACKWARD:
            reasons.append(Reason("no_backward", f"inputs require grad but {label} has no backward here"))
        return reasons

    def _why_not(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        return []

    def measured_refusals(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        """Reasons this backend cannot run ``spec`` on ``caps`` that come from measurements stored on disk (compile
        checks shipped with the package, the user's tuning) rather than from its declared limits.  Looked up before
        selecting (``decide``), like recorded launch failures, so that ``why_not`` and the selector read no file."""
        return []

    def tile_config(self, spec: AttentionSpec, caps: DeviceCaps, kernel: str | None = None) -> tuple[Any, str] | None:
        """(config, where it came from) of ``kernel`` (None: the one a forward call runs) for tunable backends;
        None otherwise."""
        return None

    def notes(self, spec: AttentionSpec, caps: DeviceCaps) -> list[str]:
        """Facts worth saying about a chosen backend (first-call compile cost, bytes of a dense mask...)."""
        return []

    def direct(self, spec: AttentionSpec, caps: DeviceCaps, config: Any = None) -> Callable | None:
        """A function ``(query, key, value) -> out`` computing exactly the calls of ``spec`` on ``caps`` with
        nothing left to decide per call, or None.  The warm call (memoised per signature, which fixes every
        non-tensor argument) uses it instead of building an ``AttentionCall`` for ``run``; so does a compiled
        graph.  It must not bake in anything a call may change: tensor values, global flags."""
        return None

    def run(self, call: AttentionCall, spec: AttentionSpec, config: Any = None):
        """Compute the attention: returns ``(out, lse)`` with ``out`` in the call's layout and ``lse``
        (B, Hq, Sq) float32 natural log when ``call.return_lse``, else None."""
        raise NotImplementedError


def _vendor_list(vendors) -> str:
    names = {"cpu": "CPU", "cuda": "NVIDIA CUDA", "rocm": "AMD ROCm", "mps": "Apple MPS", "xpu": "Intel XPU"}
    return " / ".join(names.get(v, v) for v in sorted(vendors))
