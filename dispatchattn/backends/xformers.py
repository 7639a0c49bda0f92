"""xFormers ``memory_efficient_attention`` with the ``attn_bias`` class that means exactly our mask.

Translation (band ``q_idx + lo <= kv_idx <= q_idx + hi`` from ``mask_plan.mask_plan``; ``d = Sk - Sq``):
- top-left causal -> ``LowerTriangularMask`` (xFormers' is top-left; its flash ops take it only when
  Sq == Sk, its cutlass/ck ops for any shape);
- bottom-right causal -> ``LowerTriangularFromBottomRightMask``; causal window of ``w`` keys ->
  ``LowerTriangularFromBottomRightLocalAttentionMask(w)``; two-sided window ->
  ``LocalAttentionFromBottomRightMask(left, right)`` (``[i + d - left, i + d + right]``);
- documents (Sq == Sk) -> ``BlockDiagonalMask`` / ``BlockDiagonalCausalMask`` /
  ``BlockDiagonalCausalLocalAttentionMask`` over packed runs;
- a dense ``attn_mask``, ALiBi, a relative bias, prefix-LM or a band no class expresses -> an additive
  tensor bias (cutlass / ck), built only within ``DISPATCHATTN_DENSE_MASK_BUDGET_MB``.
Softcap and opaque callables are refused.  Which xFormers op runs is xFormers' own choice; on a GPU its
``not_supported_reasons`` are what we report, elsewhere the tables in ``vendor_tables`` predict them.
"""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any, ClassVar

import torch

from .. import envs
from ..capabilities import DeviceCaps, probe_device
from ..mask_plan import MaskPlan, document_runs, mask_plan, restore_order
from ..packed import Packed
from ..scores import Alibi, RelativeBias, Softcap
from ..spec import AttentionSpec
from ..vendor_tables import XFORMERS_OPS, XFORMERS_ORDER, XformersOp, xformers_op_runs_on
from .base import AttentionCall, Backend, Reason

_TENSOR = "Tensor"


class XformersBackend(Backend):
    name: ClassVar[str] = "xformers"
    SUPPORTED_VENDORS = frozenset({"cuda", "rocm"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})  # fp32: cutlass only
    MAX_HEAD_DIM = None  # per op: 256 (fa2/fa3), 65536 (cutlass), 512/256 (ck), see vendor_tables
    SUPPORTS_DROPOUT = True
    SUPPORTS_LSE = True
    SUPPORTS_BACKWARD = True
    SUPPORTS_DV_NE_D = True  # cutlass and ck; the flash ops refuse it themselves

    def library_label(self, caps: DeviceCaps) -> str:
        version = caps.libraries.xformers
        return f"xformers {version}" if version is not None else "xformers"

    # ---------------------------------------------------------------------------------------- deciding
    def _why_not(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        if caps.libraries.xformers is None:
            return [Reason("not_installed", "xformers is not installed (pip install 'dispatchattn[xformers]')")]
        plan = mask_plan(spec)
        bias, problem = bias_kind(spec, plan)
        if problem:
            return [problem]
        if spec.return_lse and spec.requires_grad:
            return [Reason("lse_grad_unsupported", "xFormers' autograd API returns no lse; a second forward pass "
                           "gives one without a gradient, and this call returns the lse with gradients on")]
        if _on_real_device(caps):
            reasons = library_reasons(spec, bias, torch.device("cuda"))
            if reasons is not None:
                return reasons
        return table_reasons(spec, caps, bias)

    def notes(self, spec: AttentionSpec, caps: DeviceCaps) -> list[str]:
        bias, problem = bias_kind(spec, mask_plan(spec))
        notes = [f"attn_bias: {bias}"]
        if bias == _TENSOR and spec.attn_mask is None:
            notes.append(f"structured mask/score materialised as a tensor bias of {_bias_bytes(spec)} bytes")
        if spec.return_lse and spec.dropout_p > 0:
            notes.append("lse comes from a second forward pass (xFormers' autograd API returns no lse)")
        return notes

    # ----------------------------------------------------------------------------------------- running
    def run(self, call: AttentionCall, spec: AttentionSpec, config: Any = None):
        fmha = importlib.import_module("xformers.ops.fmha")
        plan = mask_plan(spec)
        kind, problem = bias_kind(spec, plan)
        if problem:
            raise RuntimeError(f"xformers cannot run this call: {problem}")
        q, k, v = (t if call.layout == "bshd" else t.transpose(1, 2) for t in (call.query, call.key, call.value))
        b, sq, hq = q.shape[:3]
        empty = None
        order = None
        kept = None
        if isinstance(plan.document, Packed):
            bias, q, kept = _packed_bias(fmha.attn_bias, plan.document, q)
            empty = plan.empty_rows(sq, k.shape[1], q.device)
            empty = empty[None, None, :] if empty is not None else None
        elif kind == _TENSOR:
            bias, empty = _tensor_bias(call, spec, q)
        elif kind.startswith("BlockDiagonal"):
            bias, q, k, v, order = _block_diagonal(fmha.attn_bias, kind, plan, q, k, v)
        else:
            bias = _band_bias(fmha.attn_bias, kind, plan, sq, k.shape[1])
            rows = plan.empty_rows(sq, k.shape[1], q.device)
            empty = rows[None, None, :] if rows is not None else None
        grouped = spec.heads_q != spec.heads_kv and q.dim() == 4
        if grouped and (kind == _TENSOR or spec.requires_grad):
            k, v = (t.repeat_interleave(spec.gqa_groups, dim=2) for t in (k, v))  # BMHK: copies kv heads
        elif grouped:  # BMGHK: (B, M, Hkv, groups, K) with the kv heads broadcast, no copy
            q = q.unflatten(2, (spec.heads_kv, spec.gqa_groups))
            k, v = (t.unsqueeze(3).expand(*t.shape[:3], spec.gqa_groups, t.shape[-1]) for t in (k, v))
        try:
            out, lse = _attend(fmha, q, k, v, bias, call, spec)
        except NotImplementedError as exc:  # xFormers' own op-by-op reasons
            raise RuntimeError(f"xformers could not run {spec.summary()}: {exc}") from exc
        out = out.reshape(*out.shape[:2], hq, out.shape[-1])
        if lse is not None:
            lse = lse.reshape(lse.shape[0], hq, -1).float()
        if isinstance(plan.document, Packed):
            out, lse = _unpack_packed(out, lse, kept, sq)
        elif kind.startswith("BlockDiagonal"):
            out, lse = _unpack(out, lse, order, b, sq, hq)
        else:
            lse = lse[:, :, :sq] if lse is not None else None
        if empty is not None:
            out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)
            lse = lse.masked_fill(empty, float("-inf")) if lse is not None else None
        return (out if call.layout == "bshd" else out.transpose(1, 2)), (lse if call.return_lse else None)


def bias_kind(spec: AttentionSpec, plan: MaskPlan) -> tuple[str, Reason | None]:
    """The xFormers attn_bias class name for ``spec`` ("Tensor" for a materialised bias), or why none."""
    if plan.problem == "opaque" or (spec.score is not None and spec.structured_score is None):
        return "", Reason("opaque_mod", "an arbitrary score_mod/mask_mod cannot be expressed as an xFormers "
                          "attn_bias (use da.masks / da.scores objects)")
    score = spec.structured_score
    if isinstance(score, Softcap):
        return "", Reason("no_softcap", f"score_mod {score.__name__}: xFormers has no softcap "
                          "(tanh of the scores is not an additive bias)")
    if spec.mods_need_grad:
        return "", Reason("mod_grad", "a score_mod tensor requires grad; the xformers backend returns no "
                          "gradient for a materialised bias")
    needs_tensor = spec.attn_mask is not None or isinstance(score, (Alibi, RelativeBias)) or plan.problem
    if spec.attn_mask is not None and spec.mask is not None:
        return "", Reason("mask_and_attn_mask", "attn_mask together with mask_mod is not translated to xFormers")
    packed = isinstance(plan.document, Packed)
    if packed and torch.compiler.is_compiling():
        return "", Reason("packed_while_compiling", "xFormers' BlockDiagonalMask takes the sequence lengths as Python "
                          "ints (tensor values), which would break the compiled graph")
    if plan.document is not None and not packed and spec.seq_q != spec.seq_kv:
        return "", Reason("document_lengths", f"document masks need seq_q == seq_kv, got {spec.seq_q} and "
                          f"{spec.seq_kv}")
    kind = None if needs_tensor else _class_for(plan, spec.seq_q, spec.seq_kv)
    if kind is None:
        size = _bias_bytes(spec)
        budget = envs.dense_mask_budget_bytes()
        if spec.attn_mask is None and size > budget:
            return "", Reason("bias_too_large", f"the mask/score needs a {size / 2**20:.0f} MiB tensor bias for "
                              f"xFormers, over the {budget / 2**20:.0f} MiB budget ({envs.DENSE_MASK_BUDGET})")
        kind = _TENSOR
    return kind, None


def _class_for(plan: MaskPlan, sq: int, sk: int) -> str | None:
    lo, hi = plan.lo, plan.hi
    if isinstance(plan.document, Packed):  # per sequence bottom-right causal, or none
        return "BlockDiagonalCausalFromBottomRightMask" if hi == 0 else "BlockDiagonalMask"
    if plan.document is not None:
        if lo is None and hi is None:
            return "BlockDiagonalMask"
        if hi == 0:
            return "BlockDiagonalCausalMask" if lo is None else "BlockDiagonalCausalLocalAttentionMask"
        return None
    if lo is None and hi is None:
        return "NoneType"
    if lo is None and hi == 0:
        return "LowerTriangularMask"
    d = sk - sq
    left = None if lo is None else d - lo
    right = None if hi is None else hi - d
    if (left is not None and left < 0) or (right is not None and right < 0):
        return None
    if right == 0:
        return "LowerTriangularFromBottomRightMask" if left is None else \
            "LowerTriangularFromBottomRightLocalAttentionMask"
    return "LocalAttentionFromBottomRightMask"


def _bias_bytes(spec: AttentionSpec) -> int:
    padded = -(-spec.seq_kv // 8) * 8
    return spec.batch * spec.heads_q * spec.seq_q * padded * spec.dtype.itemsize


def table_reasons(spec: AttentionSpec, caps: DeviceCaps, bias: str) -> list[Reason]:
    """Predict from ``vendor_tables.XFORMERS_OPS`` whether one of xFormers' ops takes the call."""
    label = f"xformers {caps.libraries.xformers}"
    per_op = []
    for key in XFORMERS_ORDER.get(caps.vendor, ()):
        op = XFORMERS_OPS[key]
        problems = op_problems(op, spec, caps, bias)
        if not problems:
            return []
        per_op.append(f"{op.names[0]}/{op.names[1]}: " + ", ".join(problems))
    return [Reason("no_xformers_op", f"no {label} op takes it ({op_line})") for op_line in per_op]


def op_problems(op: XformersOp, spec: AttentionSpec, caps: DeviceCaps, bias: str) -> list[str]:
    """Why ``op`` cannot run ``spec`` with ``bias`` on ``caps`` (its ``not_supported_reasons``, predicted)."""
    if not xformers_op_runs_on(op, caps.arch or ""):
        span = sorted(op.archs) if op.archs else f"sm {op.min_sm}..{op.max_sm or 'any'}"
        return [f"device {caps.arch} (supported: {span})"]
    problems = []
    if spec.dtype not in op.dtypes:
        problems.append(f"dtype={str(spec.dtype).removeprefix('torch.')}")
    elif spec.dtype == torch.bfloat16 and caps.sm is not None and caps.sm < (8, 0):
        problems.append("bf16 needs sm_80+")
    k = max(spec.head_dim, spec.head_dim_v)
    phases = [("forward", op.min_k_forward, op.max_k_forward, op.biases_forward)]
    if spec.requires_grad:
        phases.append(("backward", op.min_k_backward, op.max_k_backward, op.biases_backward))
    for phase, lo, hi, biases in phases:
        if not lo <= k <= hi:
            problems.append(f"{phase} head dim {k} outside [{lo}, {hi}]")
        if bias not in biases:
            problems.append(f"{phase} attn_bias {bias}")
    if spec.head_dim != spec.head_dim_v and op.key in ("fa2",):
        problems.append("value head dim differs")
    if spec.dropout_p > 0 and not op.dropout:
        problems.append("dropout > 0")
    if op.key in ("fa2", "fa3") and bias == "LowerTriangularMask" and spec.seq_q != spec.seq_kv:
        problems.append("top-left LowerTriangularMask needs seq_q == seq_kv")
    if op.key == "fa2" and spec.requires_grad and spec.dropout_p > 0 and k > 224 and caps.arch not in (
            "sm_80", "sm_90"):
        problems.append(f"backward head dim {k} > 224 with dropout needs sm_80/sm_90")
    if op.key == "fa2" and spec.requires_grad and torch.are_deterministic_algorithms_enabled():
        problems.append("backward is not deterministic")
    return problems


def _on_real_device(caps: DeviceCaps) -> bool:
    """True when ``caps`` describe this machine's current GPU (not a device we only pretend to be on)."""
    if not caps.is_gpu or not torch.cuda.is_available():
        return False
    return caps == probe_device("cuda", torch.cuda.current_device())


def library_reasons(spec: AttentionSpec, bias: str, device: torch.device) -> list[Reason] | None:
    """xFormers' own ``not_supported_reasons`` for ``spec`` on ``device`` (inputs are zero-stride views of
    one element, so nothing of the problem's size is allocated); None when xFormers cannot be asked."""
    try:
        fmha = importlib.import_module("xformers.ops.fmha")
        dispatch = importlib.import_module("xformers.ops.fmha.dispatch")

        def fake(h, s, d):
            return torch.zeros(1, device=device, dtype=spec.dtype).expand(spec.batch, s, h, d)

        q, k = fake(spec.heads_q, spec.seq_q, spec.head_dim), fake(spec.heads_q, spec.seq_kv, spec.head_dim)
        v = fake(spec.heads_q, spec.seq_kv, spec.head_dim_v)
        attn_bias = _placeholder_bias(fmha.attn_bias, bias, spec, device)
        inp = fmha.Inputs(q, k, v, attn_bias=attn_bias, p=spec.dropout_p, scale=spec.scale)
        fw_ops = dispatch._dispatch_fw_priority_list(inp, spec.requires_grad)
    except Exception:  # noqa: BLE001 - any failure means "explain from our tables instead"
        return None
    lines = []
    for fw in fw_ops:
        problems = list(fw.not_supported_reasons(inp))
        bw = getattr(sys.modules.get(fw.__module__), "BwOp", None)
        if spec.requires_grad and bw is not None:
            problems += [f"backward: {r}" for r in bw.not_supported_reasons(inp)]
        if not problems:
            return []
        lines.append(f"{fw.NAME}: " + ", ".join(problems))
    return [Reason("xformers_reasons", f"xformers says: {line}") for line in lines]


def _placeholder_bias(ab, kind: str, spec: AttentionSpec, device):
    if kind == "NoneType":
        return None
    if kind == _TENSOR:
        return torch.zeros(1, device=device, dtype=spec.dtype).expand(spec.batch, spec.heads_q, spec.seq_q,
                                                                      spec.seq_kv)
    if kind.startswith("BlockDiagonal"):
        if kind == "BlockDiagonalCausalFromBottomRightMask":  # packed: one sequence stands for the lengths
            return ab.BlockDiagonalCausalFromBottomRightMask.from_seqlens([spec.seq_q], [max(spec.seq_q,
                                                                                             spec.seq_kv)])
        if kind == "BlockDiagonalMask" and isinstance(spec.mask, Packed):
            return ab.BlockDiagonalMask.from_seqlens([spec.seq_q], [spec.seq_kv])
        base = ab.BlockDiagonalMask.from_seqlens([spec.seq_q] * spec.batch)
        return {"BlockDiagonalMask": base, "BlockDiagonalCausalMask": base.make_causal()}.get(
            kind, base.make_local_attention(1))
    plan = mask_plan(spec)
    return _band_bias(ab, kind, plan, spec.seq_q, spec.seq_kv)


def _band_bias(ab, kind: str, plan: MaskPlan, sq: int, sk: int):
    d = sk - sq
    left = sq + sk if plan.lo is None else d - plan.lo
    right = sq + sk if plan.hi is None else plan.hi - d
    if kind == "NoneType":
        return None
    if kind == "LowerTriangularMask":
        return ab.LowerTriangularMask()
    if kind == "LowerTriangularFromBottomRightMask":
        return ab.LowerTriangularFromBottomRightMask()
    if kind == "LowerTriangularFromBottomRightLocalAttentionMask":
        return ab.LowerTriangularFromBottomRightLocalAttentionMask(left + 1)  # its window counts the diagonal
    return ab.LocalAttentionFromBottomRightMask(window_left=left, window_right=right)


def _block_diagonal(ab, kind: str, plan: MaskPlan, q, k, v):
    b, s = q.shape[:2]
    positional = plan.lo is not None
    cu, _, order = document_runs(plan.document.document_ids.to(q.device), b, s, not positional)
    lengths = (cu[1:] - cu[:-1]).tolist()
    base = ab.BlockDiagonalMask.from_seqlens(lengths)
    bias = {"BlockDiagonalMask": base, "BlockDiagonalCausalMask": base.make_causal()}.get(kind)
    if bias is None:  # causal local: keys q_idx - lo .. q_idx, i.e. a window of 1 - lo keys
        bias = base.make_local_attention(1 - plan.lo)
    packed = [t.reshape(1, b * s, *t.shape[2:]) for t in (q, k, v)]
    if order is not None:
        packed = [t.index_select(1, order) for t in packed]
    return bias, *packed, order


def _packed_bias(ab, packed: Packed, q):
    """(BlockDiagonal bias over the caller's sequence lengths, q, the query rows kept or None) for q (1, total_q, H, D).

    xFormers' bottom-right causal blocks need ``Lk >= Lq``: the first ``Lq - Lk`` queries of a longer sequence see
    no key, so those rows are left out of the call (their output is zeros, ``_unpack_packed``)."""
    lengths_q = (packed.cu_seqlens_q[1:] - packed.cu_seqlens_q[:-1]).tolist()
    lengths_k = (packed.cu_seqlens_k[1:] - packed.cu_seqlens_k[:-1]).tolist()
    if not packed.causal:
        return ab.BlockDiagonalMask.from_seqlens(lengths_q, lengths_k), q, None
    kept = None
    if any(lq > lk for lq, lk in zip(lengths_q, lengths_k)):
        kept = torch.nonzero(~packed.empty_rows).reshape(-1)
        q = q.index_select(1, kept)
        lengths_q = [min(lq, lk) for lq, lk in zip(lengths_q, lengths_k)]
    return ab.BlockDiagonalCausalFromBottomRightMask.from_seqlens(lengths_q, lengths_k), q, kept


def _unpack_packed(out, lse, kept, total_q):
    """(1, total_q, H, Dv) output and (1, H, total_q) lse, with the rows left out of the call (``kept``) as zeros and
    -inf."""
    lse = lse[:, :, : out.shape[1]] if lse is not None else None
    if kept is None:
        return out, lse
    out = out.new_zeros(1, total_q, *out.shape[2:]).index_copy(1, kept, out)
    if lse is not None:
        lse = lse.new_full((1, lse.shape[1], total_q), float("-inf")).index_copy(2, kept, lse)
    return out, lse


def _unpack(out, lse, order, b, sq, hq):
    out, lse = restore_order(out, lse, order, 1, 2)
    out = out.reshape(b, sq, hq, out.shape[-1])
    if lse is not None:
        lse = lse[:, :, : b * sq].reshape(hq, b, sq).transpose(0, 1)
    return out, lse


def _tensor_bias(call: AttentionCall, spec: AttentionSpec, q):
    """Additive (B, Hq, Sq, Sk) bias in q's dtype (rows 8-aligned, as xFormers requires) and the rows
    with no key (B, Hq, Sq)."""
    b, hq, sq, sk = spec.batch, spec.heads_q, spec.seq_q, spec.seq_kv
    if call.attn_mask is not None:
        mask = call.attn_mask.to(q.device)
        add = torch.zeros(mask.shape, device=q.device, dtype=torch.float32).masked_fill(~mask, -math.inf) \
            if mask.dtype == torch.bool else mask.float()
    else:
        bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        hi = torch.arange(hq, device=q.device).view(1, hq, 1, 1)
        qi = torch.arange(sq, device=q.device).view(1, 1, sq, 1)
        ki = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
        add = torch.zeros((1, 1, 1, 1), device=q.device)
        if call.score_mod is not None:
            add = call.score_mod(add, bi, hi, qi, ki).float()
        if call.mask_mod is not None or call.is_causal:
            keep = call.mask_mod(bi, hi, qi, ki) if call.mask_mod is not None else torch.ones((), dtype=torch.bool)
            if call.is_causal:
                keep = keep & (ki <= qi)
            add = add.masked_fill(~keep, -math.inf)
    add = add.expand(b, hq, sq, sk)
    storage = torch.empty(b, hq, sq, -(-sk // 8) * 8, device=q.device, dtype=q.dtype)
    bias = storage[..., :sk]
    bias.copy_(add)
    return bias, torch.isneginf(add).all(-1)


def _attend(fmha, q, k, v, bias, call: AttentionCall, spec: AttentionSpec):
    """(out, lse or None) with autograd through ``memory_efficient_attention`` where it is needed."""
    p = spec.dropout_p
    if not call.return_lse:
        return fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=call.scale), None
    if spec.requires_grad or p > 0:
        out = fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=call.scale)
        with torch.no_grad():
            _, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=bias, scale=call.scale)
        return out, lse
    return fmha.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=bias, scale=call.scale)
