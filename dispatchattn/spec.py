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


LAYOUTS = ("bhsd", "bshd")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(kind: type[Exception], argument: str, expected: str, got) -> None:
    raise kind(f"{argument}: expected {expected}, got {got}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        _fail(TypeError, name, "a bool", repr(value))


def _check_tensors(query, key, value, layout: str) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            dims = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
            _fail(ValueError, name, f"a 4-D tensor {dims} for layout={layout!r}", f"shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            _fail(TypeError, name, "a floating dtype (float16, bfloat16, float32, float64)", t.dtype)
        if t.numel() == 0:
            _fail(ValueError, name, "a non-empty tensor", f"shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        _fail(TypeError, "key/value", f"the dtype of query ({query.dtype})", f"key {key.dtype}, value {value.dtype}")
    if not (query.device == key.device == value.device):
        _fail(
            ValueError,
            "key/value",
            f"the device of query ({query.device})",
            f"key on {key.device}, value on {value.device}",
        )


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, S, D) of a tensor in ``layout``."""
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "bhsd" else (b, y, x, d)


def _check_shapes(q, k, v, enable_gqa: bool) -> None:
    (bq, hq, _, dq), (bk, hk, sk, dk), (bv, hv, sv, _) = q, k, v
    if not (bq == bk == bv):
        _fail(ValueError, "key/value", f"batch size {bq} like query", f"key batch {bk}, value batch {bv}")
    if dk != dq:
        _fail(ValueError, "key", f"head dim {dq} like query", f"head dim {dk}")
    if sv != sk:
        _fail(ValueError, "value", f"sequence length {sk} like key", f"sequence length {sv}")
    if hv != hk:
        _fail(ValueError, "value", f"{hk} heads like key", f"{hv} heads")
    if hq != hk and not enable_gqa:
        _fail(
            ValueError, "key", f"{hq} heads like query (or enable_gqa=True for grouped-query attention)", f"{hk} heads"
        )
    if enable_gqa and hq % hk:
        _fail(ValueError, "enable_gqa", f"query heads ({hq}) divisible by key/value heads", f"{hk} key/value heads")


def _check_attn_mask(attn_mask, query: torch.Tensor, shape4: tuple[int, int, int, int]) -> tuple | None:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        _fail(
            TypeError,
            "attn_mask",
            "a torch.Tensor (bool: True = attend, or additive float) or None",
            type(attn_mask).__name__,
        )
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        _fail(TypeError, "attn_mask", "dtype bool (True = attend) or a floating dtype (additive)", attn_mask.dtype)
    if attn_mask.device != query.device:
        _fail(ValueError, "attn_mask", f"the device of query ({query.device})", attn_mask.device)
    try:
        torch.broadcast_shapes(tuple(attn_mask.shape), shape4)
        ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(tuple(attn_mask.shape), shape4) == shape4
    except RuntimeError:
        ok = False
    if not ok:
        _fail(
            ValueError,
            "attn_mask",
            f"a shape broadcastable to (B, Hq, Sq, Sk) = {shape4}",
            f"shape {tuple(attn_mask.shape)}",
        )
    kind = "bool" if attn_mask.dtype == torch.bool else "float"
    return (kind, (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def _check_numbers(dropout_p, scale) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        _fail(TypeError, "dropout_p", "a float in [0, 1)", repr(dropout_p))
    if not 0.0 <= dropout_p < 1.0:
        _fail(ValueError, "dropout_p", "a float in [0, 1)", dropout_p)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            _fail(TypeError, "scale", "a float > 0 or None (1/sqrt(head_dim))", repr(scale))
        if not (scale > 0 and scale != float("inf")):
            _fail(ValueError, "scale", "a finite float > 0 or None (1/sqrt(head_dim))", scale)


def _check_structures(mask, score, b: int, hq: int, sq: int, sk: int, device: torch.device) -> None:
    from .masks import Combined, Document
    from .scores import Alibi, RelativeBias

    leaves = mask.parts() if isinstance(mask, Combined) else [mask]
    for leaf in leaves:
        if isinstance(leaf, Combined):
            _check_structures(leaf, None, b, hq, sq, sk, device)
        if not isinstance(leaf, Document):
            continue
        ids = leaf.document_ids
        if ids.shape[-1] != sk:
            _fail(ValueError, "document_ids", f"length Sk = {sk} (the key sequence length)", f"length {ids.shape[-1]}")
        if sq != sk:
            _fail(
                ValueError,
                "document_ids",
                "Sq == Sk for a document mask (queries index the same ids)",
                f"Sq={sq}, Sk={sk}",
            )
        if ids.dim() == 2 and ids.shape[0] not in (1, b):
            _fail(ValueError, "document_ids", f"shape (Sk,) or (B={b}, Sk)", f"shape {tuple(ids.shape)}")
        if ids.device != device:
            _fail(ValueError, "document_ids", f"the device of query ({device})", ids.device)
    if isinstance(score, Alibi):
        if tuple(score.slopes.shape) != (hq,):
            _fail(ValueError, "alibi slopes", f"shape (Hq,) = ({hq},)", f"shape {tuple(score.slopes.shape)}")
        if score.slopes.device != device:
            _fail(ValueError, "alibi slopes", f"the device of query ({device})", score.slopes.device)
    if isinstance(score, RelativeBias):
        table = score.table
        if table.shape[0] != hq or table.shape[1] < sq + sk - 1:
            _fail(
                ValueError,
                "relative_bias table",
                f"shape (Hq={hq}, W >= Sq + Sk - 1 = {sq + sk - 1})",
                f"shape {tuple(table.shape)}",
            )
        if table.device != device:
            _fail(ValueError, "relative_bias table", f"the device of query ({device})", table.device)


def _check_mod_output(name: str, mod: Callable, device: torch.device, dtype: torch.dtype) -> None:
    """Call an opaque mod once on scalar index tensors (as FlexAttention's vmap does) and check its result."""
    if not callable(mod):
        _fail(TypeError, name, "a callable (FlexAttention signature) or None", type(mod).__name__)
    if isinstance(mod, (MaskMod, ScoreMod)):
        return
    idx = torch.zeros((), dtype=torch.int32, device=device)
    try:
        if name == "mask_mod":
            result = mod(idx, idx, idx, idx)
        else:
            result = mod(torch.ones((), dtype=dtype, device=device), idx, idx, idx, idx)
    except Exception as exc:  # the user's function: report it with the argument's name
        raise ValueError(f"{name}: calling it with scalar index tensors (b, h, q_idx, kv_idx) raised {exc!r}") from exc
    expected = "a bool tensor" if name == "mask_mod" else "a floating tensor"
    if not isinstance(result, torch.Tensor):
        _fail(TypeError, name, f"to return {expected} of the index tensors' shape", type(result).__name__)
    good_dtype = result.dtype == torch.bool if name == "mask_mod" else result.is_floating_point()
    if not good_dtype:
        _fail(TypeError, name, f"to return {expected}", f"dtype {result.dtype}")
    if result.dim() != 0:
        _fail(
            ValueError,
            name,
            "to return one value per (b, h, q_idx, kv_idx), a 0-d tensor here",
            f"shape {tuple(result.shape)}",
        )


def _mods_need_grad(mods) -> bool:
    from .scores import Alibi, RelativeBias

    for mod in mods:
        wrapped = getattr(mod, "__wrapped__", None)  # a mod seen through a wrapper (e.g. packed.LocalScore)
        if wrapped is not None and _mods_need_grad([wrapped]):
            return True
        if isinstance(mod, Alibi) and mod.slopes.requires_grad:
            return True
        if isinstance(mod, RelativeBias) and mod.table.requires_grad:
            return True
        closure = getattr(mod, "__closure__", None) or ()
        for cell in closure:
            try:
                content = cell.cell_contents
            except ValueError:
                continue
            if isinstance(content, torch.Tensor) and content.requires_grad:
                return True
    return False


def build_spec(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    score_mod=None,
    mask_mod=None,
    layout="bhsd",
    return_lse=False,
    check_mods=True,
) -> AttentionSpec:
    """Validate a call's arguments and normalise them.  Every user-facing argument error is raised here,
    naming the argument, what was expected and what was given."""
    if layout not in LAYOUTS:
        _fail(ValueError, "layout", f"one of {LAYOUTS}", repr(layout))
    for flag in ("is_causal", "enable_gqa", "return_lse"):
        _check_flag(flag, {"is_causal": is_causal, "enable_gqa": enable_gqa, "return_lse": return_lse}[flag])
    _check_tensors(query, key, value, layout)
    q, k, v = _dims(query, layout), _dims(key, layout), _dims(value, layout)
    _check_shapes(q, k, v, enable_gqa)
    _check_numbers(dropout_p, scale)
    b, hq, sq, d = q
    hk, sk, dv = k[1], k[2], v[3]
    mask_info = _check_attn_mask(attn_mask, query, (b, hq, sq, sk))
    if check_mods:
        for name, mod in (("mask_mod", mask_mod), ("score_mod", score_mod)):
            if mod is not None:
                _check_mod_output(name, mod, query.device, query.dtype)
    elif (mask_mod is not None and not callable(mask_mod)) or (score_mod is not None and not callable(score_mod)):
        _fail(
            TypeError,
            "mask_mod/score_mod",
            "callables or None",
            f"{type(mask_mod).__name__}/{type(score_mod).__name__}",
        )
    mask = mask_mod.bind(sq, sk) if isinstance(mask_mod, MaskMod) else mask_mod
    score = score_mod.bind(sq, sk) if isinstance(score_mod, ScoreMod) else score_mod
    _check_structures(mask, score, b, hq, sq, sk, query.device)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    mods_grad = torch.is_grad_enabled() and _mods_need_grad([m for m in (mask, score) if m is not None])
    return AttentionSpec(
        batch=b,
        heads_q=hq,
        heads_kv=hk,
        seq_q=sq,
        seq_kv=sk,
        head_dim=d,
        head_dim_v=dv,
        dtype=query.dtype,
        device_type=query.device.type,
        layout=layout,
        is_causal=is_causal,
        attn_mask=mask_info,
        mask=mask,
        score=score,
        dropout_p=float(dropout_p),
        scale=scale,
        enable_gqa=enable_gqa,
        requires_grad=grad or mods_grad,
        return_lse=return_lse,
        mods_need_grad=mods_grad,
    )


def check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal) -> None:
    """The packed-sequence arguments of ``varlen_attention`` that need no tensor values (ranks, cu_seqlens dtype,
    shape and device, max_seqlen types); q/k/v dtypes, heads, head dims and GQA are checked by ``build_spec`` on the
    batch-1 view.  ``check_varlen_values`` checks the rest once per cu_seqlens tensor, in eager mode."""
    _check_flag("is_causal", is_causal)
    for name, t, dims in (("query", query, "(total_q, Hq, D)"), ("key", key, "(total_k, Hkv, D)"),
                          ("value", value, "(total_k, Hkv, Dv)")):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 3:
            _fail(ValueError, name, f"a 3-D packed tensor {dims}", f"shape {tuple(t.shape)}")
    if value.shape[0] != key.shape[0]:
        _fail(ValueError, "value", f"total_k = {key.shape[0]} tokens like key", f"{value.shape[0]} tokens")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            _fail(TypeError, name, "an int32 torch.Tensor of shape (B + 1,)", type(cu).__name__)
        if cu.dtype != torch.int32:
            _fail(TypeError, name, "dtype torch.int32 (FlashAttention's convention)", cu.dtype)
        if cu.dim() != 1 or cu.shape[0] < 2:
            _fail(ValueError, name, "a 1-D tensor of B + 1 >= 2 cumulative lengths", f"shape {tuple(cu.shape)}")
        if cu.device != query.device:
            _fail(ValueError, name, f"the device of query ({query.device})", cu.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        _fail(ValueError, "cu_seqlens_k", f"{cu_seqlens_q.shape[0]} entries like cu_seqlens_q (B + 1, one sequence "
              "count for both)", f"{cu_seqlens_k.shape[0]} entries")
    for name, value_ in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value_, bool) or not isinstance(value_, int):
            _fail(TypeError, name, "an int (the longest sequence's length)", repr(value_))
        if value_ < 0:
            _fail(ValueError, name, "an int >= 0", value_)


def check_varlen_values(name: str, cu_values: list[int], total: int) -> None:
    """``cu_seqlens_{name}`` values (``name`` "q" or "k"): start at 0, non-decreasing, end at the packed length."""
    argument, tokens = f"cu_seqlens_{name}", "query" if name == "q" else "key"
    if cu_values[0] != 0:
        _fail(ValueError, argument, "a first value of 0", cu_values[0])
    for at, (a, b) in enumerate(zip(cu_values, cu_values[1:])):
        if b < a:
            _fail(ValueError, argument, "non-decreasing values (cumulative lengths)", f"{a} then {b} at index {at}")
    if cu_values[-1] != total:
        _fail(ValueError, argument, f"a last value equal to the packed length of {tokens} ({total})", cu_values[-1])


def check_max_seqlen(name: str, lengths: list[int], max_seqlen: int) -> None:
    """``max_seqlen_{name}`` covers the longest sequence (flash-attn sizes its grid by it)."""
    if max(lengths) > max_seqlen:
        _fail(ValueError, f"max_seqlen_{name}", f">= the longest sequence ({max(lengths)}, from cu_seqlens_{name})",
              max_seqlen)
