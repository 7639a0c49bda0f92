"""Structured score_mods: FlexAttention-style callables that also tell the selector what they are.

Each object is a valid ``score_mod(score, b, h, q_idx, kv_idx) -> score`` and carries its parameters,
so a fixed-function kernel (flash-attn's ``softcap`` / ``alibi_slopes``) can be chosen when it computes
exactly the same thing.

>>> import torch, dispatchattn as da
>>> da.scores.softcap(30.0).__name__
'softcap_30.0'
"""

from __future__ import annotations

import torch

from .masks import structure_hash

__all__ = ["ScoreMod", "softcap", "alibi", "relative_bias"]


class ScoreMod:
    kind: str = "score"
    needs_lengths: bool = False
    #: The constructor's parameters, in order, each kept as the attribute of the same name (see ``MaskMod``).
    _fields: tuple[str, ...] = ()

    def __call__(self, score, b, h, q_idx, kv_idx):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def key(self) -> tuple:
        raise NotImplementedError

    def bind(self, seq_q: int, seq_kv: int) -> ScoreMod:
        return self

    @property
    def __name__(self) -> str:
        return self.kind

    def __repr__(self) -> str:
        return f"da.scores.{self.__name__}"

    def captured(self) -> tuple[torch.Tensor, ...]:
        """The tensors the score reads (slopes, bias table): caches key on their identity and version."""
        return ()

    def _tensor_ids(self) -> tuple:
        return tuple(id(t) for t in self.captured())

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.key == other.key and self._tensor_ids() == other._tensor_ids()

    def __hash__(self) -> int:
        return structure_hash(self, lambda: (self.key, self._tensor_ids()))


def _tensor_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad)


class Softcap(ScoreMod):
    kind = "softcap"

    _fields = ("cap",)

    def __init__(self, cap: float):
        self.cap = float(cap)

    @property
    def __name__(self) -> str:
        return f"softcap_{self.cap}"

    @property
    def key(self):
        return ("softcap", self.cap)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)


class Alibi(ScoreMod):
    """``score + slopes[h] * (kv_idx - q_idx)`` (signed: flash-attn's ``-slope*|i-j|`` equals it only
    under a causal mask)."""

    kind = "alibi"

    _fields = ("slopes",)

    def __init__(self, slopes: torch.Tensor):
        self.slopes = slopes

    @property
    def key(self):
        return ("alibi", _tensor_key(self.slopes))

    def captured(self) -> tuple[torch.Tensor, ...]:
        return (self.slopes,)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.slopes[h] * (kv_idx - q_idx)


class RelativeBias(ScoreMod):
    """``score + table[h, q_idx - kv_idx + Sk - 1]``; ``table`` is (H, W) with W >= Sq + Sk - 1."""

    kind = "relative_bias"

    _fields = ("table", "offset")

    def __init__(self, table: torch.Tensor, offset: int | None = None):
        self.table = table
        self.offset = offset

    @property
    def key(self):
        return ("relative_bias", _tensor_key(self.table), self.offset)

    def captured(self) -> tuple[torch.Tensor, ...]:
        return (self.table,)

    def bind(self, seq_q, seq_kv):
        return RelativeBias(self.table, offset=seq_kv - 1)

    def __call__(self, score, b, h, q_idx, kv_idx):
        # Unbound (used outside dispatchattn): assume Sq == Sk, so the table is (H, 2S - 1).
        offset = self.offset if self.offset is not None else (self.table.shape[-1] - 1) // 2
        return score + self.table[h, q_idx - kv_idx + offset]


def softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma 2, Grok)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or cap != cap or cap == float("inf"):
        raise ValueError(f"softcap: cap must be a finite number > 0, got {cap!r}")
    return Softcap(cap)


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi with per-head ``slopes`` of shape (Hq,): ``score + slopes[h] * (kv_idx - q_idx)``."""
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point() or slopes.dim() != 1:
        got = tuple(slopes.shape) if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        raise ValueError(f"alibi: slopes must be a 1-D floating tensor of shape (Hq,), got {got}")
    return Alibi(slopes)


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """Learned relative-position bias ``score + table[h, q_idx - kv_idx + Sk - 1]``, ``table`` (Hq, W)."""
    if not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.dim() != 2:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"relative_bias: table must be a 2-D floating tensor of shape (Hq, W), got {got}")
    return RelativeBias(table)
