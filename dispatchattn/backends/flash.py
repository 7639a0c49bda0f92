"""flash-attn: FA2 (``flash_attn``), FA3 (``flash_attn_interface``, Hopper), FA4 (``flash_attn.cute``) and the
ROCm builds of FA2 (CK, or Triton with FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE).

Translation (exact, or the backend refuses with the sentence saying why):
- masks become a band ``q_idx + lo <= kv_idx <= q_idx + hi`` (top-left coordinates); flash's causal and
  ``window_size=(left, right)`` are bottom-right aligned (``[i + Sk - Sq - left, i + Sk - Sq + right]``),
  so ``left = Sk - Sq - lo`` and ``right = hi - Sk + Sq``, each >= 0 or unbounded (-1);
- ``da.masks.document`` -> ``flash_attn_varlen_func`` with int32 ``cu_seqlens`` (the runs are found at
  run time; ids whose documents are not contiguous are gathered into runs when the mask allows it);
- ``da.scores.softcap`` -> ``softcap``; ``da.scores.alibi`` -> ``alibi_slopes`` under a causal band
  (flash's bias ``-slope*|i + Sk - Sq - j|`` equals ours up to the per-row constant ``slope*(Sk-Sq)``,
  added back to the lse);
- rows with no key return zeros and ``-inf`` lse (flash writes ``+inf`` there).

FA4 has no ``torch.library`` op of its own: inside ``torch.compile`` it runs through ``flash_ops``
(``dispatchattn::flash4_fwd`` / ``flash4_bwd``), and so do eager calls whose lse needs a gradient (FA4's
autograd.Function gives its lse none; the ops' backward adds the exact lse term).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch
from packaging.version import Version

from .. import envs
from ..capabilities import DeviceCaps, probe
from ..mask_plan import MaskPlan, document_runs, mask_plan, restore_order
from ..packed import Packed
from ..scores import Alibi, Softcap
from ..spec import AttentionSpec
from ..vendor_tables import FLASH_DETERMINISTIC_MAX_HEAD_DIM, FLASH_HEAD_DIM_RULES, FLASH_IMPLS, FLASH_ORDER, FlashImpl
from .base import AttentionCall, Backend, Reason

_CHOICES: dict[tuple, tuple[FlashImpl, Version, MaskPlan]] = {}


def _fmt(v: Version | None) -> str:
    return str(v) if v is not None else "?"


class FlashBackend(Backend):
    name: ClassVar[str] = "flash"
    SUPPORTED_VENDORS = frozenset({"cuda", "rocm"})
    # Union over the entry points (fp32 only on ROCm Triton); each entry point narrows it (vendor_tables).
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    MAX_HEAD_DIM = 256  # FA flash_api.cpp "FlashAttention forward only supports head dimension at most 256"
    SUPPORTS_DROPOUT = True  # FA2 only (FA3/FA4 refuse per entry point)
    SUPPORTS_LSE = True
    SUPPORTS_BACKWARD = True
    SUPPORTS_DV_NE_D = False  # FA2 checks v's head dim equals q's; FA3/FA4 allow only MLA-style pairs

    def library_label(self, caps: DeviceCaps) -> str:
        libs = caps.libraries
        for key in self._order(caps):
            version = getattr(libs, FLASH_IMPLS[key].library)
            if version is not None:
                return f"flash-attn {version}"
        return "flash-attn"

    # ---------------------------------------------------------------------------------------- deciding
    @staticmethod
    def _order(caps: DeviceCaps) -> tuple[str, ...]:
        if caps.vendor == "rocm":
            return ("fa2_triton_amd",) if envs.flash_triton_amd() else FLASH_ORDER["rocm"]
        return FLASH_ORDER.get(caps.vendor, ())

    def _candidates(self, caps: DeviceCaps) -> list[tuple[FlashImpl, Version]]:
        out = []
        for key in self._order(caps):
            impl = FLASH_IMPLS[key]
            version = getattr(caps.libraries, impl.library)
            if version is not None:
                out.append((impl, version))
        return out

    def _why_not(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        candidates = self._candidates(caps)
        if not candidates:
            return [Reason("not_installed", "flash-attn is not installed (pip install 'dispatchattn[flash]'; "
                           "FA3: the flash-attn-3 package, FA4: flash-attn-4)")]
        plan = mask_plan(spec)
        shared = structure_reasons(spec, plan)
        if shared:
            return shared
        all_reasons: list[Reason] = []
        for impl, version in candidates:
            reasons = impl_reasons(impl, version, spec, caps, plan)
            if not reasons:
                return []
            all_reasons.extend(reasons)
        return all_reasons

    def choose(self, spec: AttentionSpec, caps: DeviceCaps) -> tuple[FlashImpl, Version, MaskPlan]:
        """The entry point that runs ``spec`` on ``caps`` (raises with every reason when none can).
        Memoised per (spec, caps, determinism, env) outside of tracing, so a warm eager call pays a lookup."""
        key = (spec, caps, torch.are_deterministic_algorithms_enabled(), envs.flash_triton_amd())
        try:
            skip_memo = torch.compiler.is_compiling() or hash(key) is None
        except TypeError:  # a user callable without __hash__ in the spec: no memo
            skip_memo = True
        hit = None if skip_memo else _CHOICES.get(key)
        if hit is not None:
            return hit
        plan = mask_plan(spec)
        if not structure_reasons(spec, plan):
            for impl, version in self._candidates(caps):
                if not impl_reasons(impl, version, spec, caps, plan):
                    if not skip_memo:
                        if len(_CHOICES) >= 256:
                            _CHOICES.clear()
                        _CHOICES[key] = (impl, version, plan)
                    return impl, version, plan
        raise RuntimeError("flash cannot run this call: " + "; ".join(self.why_not(spec, caps)))

    def notes(self, spec: AttentionSpec, caps: DeviceCaps) -> list[str]:
        try:
            impl, version, plan = self.choose(spec, caps)
        except RuntimeError:
            return []
        notes = [f"entry point: flash-attn {version} {impl.label}"]
        if isinstance(plan.document, Packed):
            notes.append("packed sequences -> flash_attn_varlen_func with the caller's cu_seqlens and max_seqlen")
        elif plan.document is not None:
            notes.append("document mask -> flash_attn_varlen_func (cu_seqlens computed from document_ids)")
        if spec.return_lse and spec.dropout_p > 0 and impl.key != "fa4":
            notes.append("lse with dropout: flash-attn also returns the (B, H, Sq, Sk) dropout mask it computes")
        return notes

    # ----------------------------------------------------------------------------------------- running
    def direct(self, spec: AttentionSpec, caps: DeviceCaps, config: Any = None):
        # Inference calls that reach one dense entry point unchanged.  Not: the lse or a gradient (the
        # backward's determinism flag is read per call), a document mask (run lengths come from tensor
        # values), ALiBi (its slopes are a tensor the user may edit), rows to zero, FA4 (an op in graphs).
        if spec.return_lse or spec.requires_grad or spec.mods_need_grad or isinstance(spec.score, Alibi):
            return None
        try:
            impl, _, plan = self.choose(spec, caps)
        except RuntimeError:
            return None
        if impl.key == "fa4" or plan.document is not None or plan.empty_rows(spec.seq_q, spec.seq_kv, "cpu") \
                is not None:
            return None
        kwargs = _kwargs(impl, spec, plan, spec.scale if spec.scale is not None else spec.head_dim ** -0.5,
                         spec.score, None)
        fn = _module(impl).flash_attn_func

        def first(result):  # FA3 returns (out, lse) even when the lse is not asked for
            return result[0] if isinstance(result, (tuple, list)) else result

        if spec.layout == "bshd":
            return lambda query, key, value: first(fn(query, key, value, **kwargs))
        return lambda query, key, value: first(fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                  **kwargs)).transpose(1, 2)

    def run(self, call: AttentionCall, spec: AttentionSpec, config: Any = None):
        impl, _, plan = self.choose(spec, probe(call.query.device))
        q, k, v = (t if call.layout == "bshd" else t.transpose(1, 2) for t in (call.query, call.key, call.value))
        kwargs = _kwargs(impl, spec, plan, call.scale, call.score_mod, call.query.device)
        if plan.document is not None:
            out, lse = _run_varlen(impl, q, k, v, plan, kwargs, call.return_lse)
        elif impl.key == "fa4" and (torch.compiler.is_compiling() or (call.return_lse and spec.requires_grad)):
            from . import flash_ops  # FA4 as dispatchattn::flash4_* ops: one graph node, exact lse gradient

            out, lse = flash_ops.flash4_attention(q, k, v, **kwargs)
        else:
            out, lse = _call(impl, "flash_attn_func", (q, k, v), kwargs, call.return_lse)
        lse = _fix_lse(lse, spec, plan, call, out.device) if call.return_lse else None
        rows = plan.empty_rows(spec.seq_q, spec.seq_kv, out.device)
        if rows is not None:  # flash already writes zeros there; make it explicit and NaN-proof
            out = out.masked_fill(rows[None, :, None, None], 0.0)
        return (out if call.layout == "bshd" else out.transpose(1, 2)), lse


def structure_reasons(spec: AttentionSpec, plan: MaskPlan) -> list[Reason]:
    """Reasons shared by every entry point: what the mask/score/attn_mask mean vs what flash computes."""
    reasons = []
    if spec.attn_mask is not None:
        reasons.append(Reason("dense_mask", f"a dense {spec.attn_mask[0]} attn_mask cannot be passed to flash-attn "
                              "(no bias input); use da.masks for structured masks"))
    if plan.problem == "opaque" or (spec.score is not None and spec.structured_score is None):
        reasons.append(Reason("opaque_mod", "an arbitrary score_mod/mask_mod cannot be expressed as flash-attn "
                              "arguments (use da.masks / da.scores objects)"))
    elif plan.problem:
        reasons.append(Reason("mask_unsupported",
                              f"mask {plan.problem}; flash-attn has causal, window and varlen only"))
    score = spec.structured_score
    if score is not None and not isinstance(score, (Softcap, Alibi)):
        reasons.append(Reason("score_unsupported", f"score_mod {score.__name__} has no flash-attn argument "
                              "(only softcap and alibi do)"))
    if spec.mods_need_grad:
        reasons.append(Reason("mod_grad", "a score_mod tensor requires grad; flash-attn returns no gradient for it"))
    packed = isinstance(plan.document, Packed)
    if packed and torch.compiler.is_compiling():
        reasons.append(Reason("packed_while_compiling", "packed sequences are not routed to flash_attn_varlen_func "
                              "inside torch.compile yet (the trace-time launch check has no cu_seqlens values)"))
    elif plan.document is not None and torch.compiler.is_compiling():
        reasons.append(Reason("document_while_compiling", "document masks need the run lengths of the ids "
                              "(tensor values) for flash_attn_varlen_func, which would break the compiled graph"))
    if plan.document is not None and not packed and spec.seq_q != spec.seq_kv:
        reasons.append(Reason("document_lengths", f"document masks map to flash_attn_varlen_func only when "
                              f"seq_q == seq_kv, got {spec.seq_q} and {spec.seq_kv}"))
    return reasons


def flash_window(plan: MaskPlan, seq_q: int, seq_kv: int) -> tuple[int, int] | str:
    """(left, right) for flash's bottom-right ``window_size`` (-1 = unbounded), or why there is none."""
    shift = 0 if plan.document is not None else seq_kv - seq_q
    left = -1 if plan.lo is None else shift - plan.lo
    right = -1 if plan.hi is None else plan.hi - shift
    if plan.lo is not None and left < 0:
        return (f"keys start {-left} after flash-attn's bottom-right diagonal (seq_q {seq_q}, seq_kv {seq_kv}), "
                "which window_size cannot express")
    if plan.hi is not None and right < 0:
        what = "top-left causal" if plan.hi == 0 else f"the mask (kv_idx <= q_idx + {plan.hi})"
        return (f"{what} with seq_q {seq_q} != seq_kv {seq_kv} is not expressible: flash-attn's causal mask "
                "is bottom-right aligned (equal only when seq_q == seq_kv)")
    if plan.document is None:
        left = -1 if left > 0 and left >= seq_kv - 1 else left  # reaches every key: unbounded (exact)
        right = -1 if right > 0 and right >= seq_q - 1 else right
    return left, right


def _needs(impl: FlashImpl, version: Version, feature: str, what: str, label: str) -> list[Reason]:
    since = impl.since(feature)
    if since is None:
        return [Reason(f"no_{feature}", f"{what} but {label} has no {feature.replace('_', ' ')}")]
    if version < Version(since):
        return [Reason(f"{feature}_too_old", f"{what} needs flash-attn >= {since}, installed {label}")]
    return []


def impl_reasons(impl: FlashImpl, version: Version, spec: AttentionSpec, caps: DeviceCaps,
                  plan: MaskPlan) -> list[Reason]:
    label = f"flash-attn {_fmt(version)} {impl.label}"
    if version < Version(impl.min_version):
        return [Reason("version_too_old", f"{label} is older than {impl.min_version}, the first release whose "
                       "causal mask is bottom-right aligned (what this backend translates to)")]
    reasons = []
    if caps.arch not in impl.archs:
        sm = caps.sm
        if sm is not None and sm < (8, 0) and impl.vendor == "cuda":
            msg = f"{label} needs sm_80+, device is {caps.arch} ({caps.device_name})"
        else:
            msg = f"{label} has no kernels for {caps.arch} ({caps.device_name}); built for {sorted(impl.archs)}"
        return [Reason("arch_unsupported", msg)]
    if spec.dtype not in impl.dtypes:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in impl.dtypes))
        reasons.append(Reason("dtype_unsupported", f"dtype={str(spec.dtype).removeprefix('torch.')} "
                              f"(supported by {label} on {caps.arch}: {{{names}}})"))
    hd = max(spec.head_dim, spec.head_dim_v)
    if spec.head_dim % impl.head_dim_multiple:
        reasons.append(Reason("head_dim_multiple", f"head_dim {spec.head_dim} is not a multiple of "
                              f"{impl.head_dim_multiple}, required by {label}"))
    for rule in FLASH_HEAD_DIM_RULES:
        applies = rule.impl == impl.key and caps.arch in rule.archs and hd > rule.max_head_dim
        applies = applies and (spec.requires_grad or not rule.backward_only)
        if applies and (spec.dropout_p > 0 or not rule.with_dropout_only):
            cond = " backward" * rule.backward_only + " with dropout" * rule.with_dropout_only
            reasons.append(Reason("head_dim_too_large", f"head_dim {hd}{cond} exceeds {rule.max_head_dim}, the "
                                  f"{label} limit on {caps.arch} ({rule.source})"))
    if spec.dropout_p > 0:
        reasons += _needs(impl, version, "dropout", f"dropout_p={spec.dropout_p}", label)
    if spec.requires_grad:
        reasons += _needs(impl, version, "backward", "inputs require grad", label)
    if spec.return_lse:
        reasons += _needs(impl, version, "lse", "return_lse=True", label)
        if spec.requires_grad and (impl.key != "fa4" or plan.document is not None):
            reasons.append(Reason("lse_grad_unsupported", f"{label} gives its lse no gradient (its autograd Function "
                                  "marks it non-differentiable) and this call returns the lse with gradients on; "
                                  "only the FA4 path without documents adds the lse term exactly"))
    if plan.document is not None:
        reasons += _needs(impl, version, "varlen", f"mask {spec.mask.__name__}", label)
    window = flash_window(plan, spec.seq_q, spec.seq_kv)
    if isinstance(window, str):
        reasons.append(Reason("mask_alignment", window))
    elif window[0] != -1 or window[1] not in (-1, 0):
        reasons += _needs(impl, version, "window", f"window_size={window}", label)
        if spec.requires_grad:
            reasons += _needs(impl, version, "window_backward", f"window_size={window} with grad", label)
        if impl.key.startswith("fa2") and plan.document is None and window[1] >= spec.seq_kv:
            reasons.append(Reason("window_clamped", f"window right {window[1]} >= seq_kv {spec.seq_kv}: {label} "
                                  "would turn it into an unbounded window (flash_api.cpp)"))
    score = spec.structured_score
    if isinstance(score, Softcap):
        reasons += _needs(impl, version, "softcap", f"score_mod {score.__name__}", label)
        if spec.dropout_p > 0:
            reasons.append(Reason("softcap_dropout", f"{label} has no softcap with dropout "
                                  "(\"Softcapping does not support dropout for now\")"))
    if isinstance(score, Alibi):
        reasons += _needs(impl, version, "alibi", f"score_mod {score.__name__}", label)
        if isinstance(window, tuple) and window[1] != 0:
            reasons.append(Reason("alibi_not_causal", "flash-attn's ALiBi bias is -slope*|i-j| while ours is signed "
                                  "(slope*(kv_idx - q_idx)): equal only under a causal mask"))
    if spec.requires_grad and torch.are_deterministic_algorithms_enabled():
        reasons += _needs(impl, version, "deterministic", "torch deterministic algorithms are on", label)
        limit = FLASH_DETERMINISTIC_MAX_HEAD_DIM.get(impl.key)
        if limit is not None and hd > limit:
            reasons.append(Reason("deterministic_head_dim", f"{label} has no deterministic backward for head_dim "
                                  f"{hd} (> {limit})"))
    return reasons


def _kwargs(impl: FlashImpl, spec: AttentionSpec, plan: MaskPlan, scale: float, score, device) -> dict:
    """The library keyword arguments, non-default ones only (so older releases accept them)."""
    left, right = flash_window(plan, spec.seq_q, spec.seq_kv)
    kwargs: dict[str, Any] = {"softmax_scale": scale}
    if left == -1 and right == 0:
        kwargs["causal"] = True
    elif (left, right) != (-1, -1):
        kwargs["window_size"] = (None if left < 0 else left, None if right < 0 else right) \
            if impl.key == "fa4" else (left, right)
    if spec.dropout_p > 0:
        kwargs["dropout_p"] = spec.dropout_p
    if isinstance(score, Softcap):
        kwargs["softcap"] = score.cap
    if isinstance(score, Alibi):
        kwargs["alibi_slopes"] = score.slopes.detach().to(device, torch.float32).contiguous()
    if spec.requires_grad and torch.are_deterministic_algorithms_enabled():
        kwargs["deterministic"] = True
    return kwargs


def _module(impl: FlashImpl):
    if impl.key == "fa3":
        try:
            return importlib.import_module("flash_attn_3.flash_attn_interface")
        except ImportError:
            return importlib.import_module("flash_attn_interface")
    return importlib.import_module("flash_attn.cute" if impl.key == "fa4" else "flash_attn")


def _call(impl: FlashImpl, fn: str, args: tuple, kwargs: dict, want_lse: bool):
    """Call ``fn`` of the entry point; returns (out, lse or None)."""
    if want_lse:
        kwargs = {**kwargs, ("return_lse" if impl.key == "fa4" else "return_attn_probs"): True}
    result = getattr(_module(impl), fn)(*args, **kwargs)
    if isinstance(result, (tuple, list)):
        return result[0], (result[1] if len(result) > 1 else None)
    return result, None


def _run_packed(impl, q, k, v, packed: Packed, kwargs: dict, want_lse: bool):
    """q/k/v (1, total, H, D): one flash_attn_varlen_func call over the caller's cu_seqlens; lse (1, Hq, total_q)."""
    args = (q[0], k[0], v[0], packed.cu_seqlens_q, packed.cu_seqlens_k, packed.max_seqlen_q, packed.max_seqlen_k)
    out, lse = _call(impl, "flash_attn_varlen_func", args, kwargs, want_lse)
    if lse is not None and lse.dim() == 3:  # releases before the (H, total) layout: (B, H, max_seqlen_q)
        lse = lse[packed.q_seq.long(), :, _local_q(packed)].transpose(0, 1)
    return out.unsqueeze(0), (lse.unsqueeze(0) if lse is not None else None)


def _local_q(packed: Packed) -> torch.Tensor:
    """Each query's position inside its sequence (from the packing's cu_seqlens)."""
    return torch.arange(packed.q_seq.shape[0], device=packed.q_seq.device) - \
        packed.cu_seqlens_q.long()[packed.q_seq.long()]


def _run_varlen(impl, q, k, v, plan: MaskPlan, kwargs: dict, want_lse: bool):
    if isinstance(plan.document, Packed):
        return _run_packed(impl, q, k, v, plan.document, kwargs, want_lse)
    b, s, hq = q.shape[:3]
    positional = plan.lo is not None or (plan.hi not in (None, 0)) or "alibi_slopes" in kwargs
    cu, max_len, order = document_runs(plan.document.document_ids.to(q.device), b, s, not positional)
    packed = [t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)]
    if order is not None:
        packed = [t.index_select(0, order) for t in packed]
    out, lse = _call(impl, "flash_attn_varlen_func", (*packed, cu, cu, max_len, max_len), kwargs, want_lse)
    if lse is not None and lse.dim() == 3:  # releases before the (H, total) layout: (docs, H, max_len)
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu[1:] - cu[:-1])
        pos = torch.arange(b * s, device=cu.device) - cu[:-1].long()[doc]
        lse = lse[doc, :, pos].transpose(0, 1)
    out, lse = restore_order(out, lse, order, 0, 1)
    out = out.reshape(b, s, hq, out.shape[-1])
    if lse is not None:
        lse = lse.reshape(hq, b, s).transpose(0, 1)
    return out, lse


def _fix_lse(lse, spec: AttentionSpec, plan: MaskPlan, call: AttentionCall, device) -> torch.Tensor:
    """(B, Hq, Sq) float32 natural-log lse with our ALiBi offset and -inf on rows with no key."""
    if lse is None:
        raise RuntimeError("flash-attn returned no softmax lse although it was requested")
    lse = lse.float()
    if isinstance(call.score_mod, Alibi) and plan.document is None and spec.seq_kv != spec.seq_q:
        slopes = call.score_mod.slopes.detach().to(device, torch.float32)
        lse = lse + slopes[None, :, None] * (spec.seq_kv - spec.seq_q)
    rows = plan.empty_rows(spec.seq_q, spec.seq_kv, device)
    if rows is not None:
        lse = lse.masked_fill(rows[None, None, :], float("-inf"))
    return lse
