"""AttentionSpec: a call normalised into static, hashable metadata; and all user-argument validation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .masks import MaskMod
from .scores import ScoreMod


@dataclass(frozen=True)
class AttentionSpec:
    """Everything the selector may look at: shapes, dtype, device, flags and mask/score structure.

    Never tensor values.  ``mask`` / ``score`` hold the bound structured object (``da.masks`` /
    ``da.scores``) or the user's callable; ``attn_mask`` is ("bool" | "float", broadcast shape).
    """

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device_type: str
    layout: str = "bhsd"
    is_causal: bool = False
    attn_mask: tuple | None = None
    mask: Callable | None = None
    score: Callable | None = None
    dropout_p: float = 0.0
    scale: float | None = None
    enable_gqa: bool = False
    requires_grad: bool = False
    return_lse: bool = False
    mods_need_grad: bool = False

    @property
    def gqa_groups(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def structured_mask(self) -> MaskMod | None:
        return self.mask if isinstance(self.mask, MaskMod) else None

    @property
    def structured_score(self) -> ScoreMod | None:
        return self.score if isinstance(self.score, ScoreMod) else None

    @property
    def has_opaque_mods(self) -> bool:
        """A user function (not a ``da.masks`` / ``da.scores`` object) is involved."""
        return (self.mask is not None and self.structured_mask is None) or (
            self.score is not None and self.structured_score is None
        )

    @property
    def has_mods(self) -> bool:
        return self.mask is not None or self.score is not None

    def summary(self) -> str:
        """One line: shapes, dtype, device, mask/score structure, flags."""
        parts = [
            f"q({self.batch},{self.heads_q},{self.seq_q},{self.head_dim})",
            f"kv({self.batch},{self.heads_kv},{self.seq_kv},{self.head_dim},{self.head_dim_v})",
            str(self.dtype).removeprefix("torch."),
            self.device_type,
        ]
        if self.layout != "bhsd":
            parts.append(f"layout={self.layout}")
        if self.is_causal:
            parts.append("is_causal")
        if self.attn_mask is not None:
            parts.append(f"attn_mask={self.attn_mask[0]}{list(self.attn_mask[1])}")
        if self.mask is not None:
            parts.append(f"mask_mod={_mod_name(self.mask)}")
        if self.score is not None:
            parts.append(f"score_mod={_mod_name(self.score)}")
        if self.heads_q != self.heads_kv:
            parts.append(f"gqa={self.gqa_groups}")
        if self.dropout_p:
            parts.append(f"dropout={self.dropout_p}")
        if self.requires_grad:
            parts.append("grad")
        if self.return_lse:
            parts.append("lse")
        return " ".join(parts)


def _mod_name(mod: Callable) -> str:
    if isinstance(mod, (MaskMod, ScoreMod)):
        return mod.__name__
    return getattr(mod, "__name__", type(mod).__name__)
