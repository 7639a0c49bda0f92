"""``triton_flex``: the in-house block-sparse Triton kernel with generated score_mod / mask_mod.

Runs any traceable mod (``da.masks`` / ``da.scores`` objects or plain functions, see ``codegen.py``),
forward and backward, on NVIDIA and AMD GPUs, and on CPU through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before import (slow: for tests).  ``is_causal`` becomes a causal mask;
a dense ``attn_mask`` becomes a captured tensor read by a generated mask_mod (bool) or score_mod
(float, with its gradient when it requires one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...capabilities import DeviceCaps, probe
from ...masks import Causal, MaskMod, both, chain, from_dense
from ...spec import AttentionSpec
from ..base import AttentionCall, Backend, Reason

MIN_HEAD_DIM = 16  # tl.dot's smallest inner dimension; smaller dims are FlexAttention's limit too
MAX_HEAD_DIM_TRITON_FLEX = 256  # one padded head-dim tile per program; 512 spills registers on every arch


def _device(spec: AttentionSpec) -> str:
    return "cuda" if spec.device_type in ("cuda", "rocm") else spec.device_type


def decoding(spec: AttentionSpec, caps: DeviceCaps | None = None) -> bool:
    """Whether the split-KV decoding kernel (``decode.py``) runs ``spec``: few query rows, no gradient (compiled
    graphs call it through its custom op, ``ops.triton_flex_decode``), and, on ``caps``, a decoding tile that
    does not spill (else the forward kernel runs it: ``spill_refusals``)."""
    from .decode import MAX_DECODE_SEQ_Q

    if spec.seq_q > MAX_DECODE_SEQ_Q or spec.requires_grad or spec.mods_need_grad:
        return False
    return caps is None or "decode" not in spill_refusals(spec, caps)


def spill_refusals(spec: AttentionSpec, caps: DeviceCaps) -> dict[str, Reason]:
    """{"fwd" / "bwd" / "decode": Reason} for the kernels of ``spec``'s dtype and head dims that have no
    spill-free tile on ``caps``'s GPU: the shipped defaults of the target say so (``shipped.refusal``), measured by
    compiling every config tried ahead of time.  Empty off GPU and where every kernel has a tile that fits.  A
    config the user tuned on this device (the user cache) lifts the refusal: it was timed there."""
    if caps.vendor not in ("cuda", "rocm") or not caps.arch:
        return {}
    from ...tuning import lookup, shipped

    dtype_name = str(spec.dtype).removeprefix("torch.")
    found = {}
    for kernel in ("fwd", "bwd", "decode"):
        record = shipped.refusal(kernel, caps.arch, dtype_name, spec.head_dim, spec.head_dim_v)
        if record is not None and lookup.user_entry(kernel, spec, caps) is None:
            message = shipped.refusal_message(kernel, caps.arch, spec.head_dim, spec.head_dim_v, record, dtype_name)
            found[kernel] = Reason("no_spill_free_tile", message)
    return found


def spec_mask(spec: AttentionSpec) -> Callable | None:
    """The mask_mod of ``spec`` with ``is_causal`` folded in (the dense ``attn_mask`` is not: it is tensor data)."""
    return both(spec.mask, Causal()) if spec.is_causal else spec.mask


def call_mods(call: AttentionCall) -> tuple[Callable | None, Callable | None]:
    """(score_mod, mask_mod) of a call with ``is_causal`` and ``attn_mask`` folded in."""
    score_mod, mask_mod = call.score_mod, call.mask_mod
    if call.is_causal:
        mask_mod = both(mask_mod, Causal())
    if call.attn_mask is not None:
        dense_mask, dense_score = from_dense(call.attn_mask)
        mask_mod, score_mod = both(mask_mod, dense_mask), chain(score_mod, dense_score)
    return score_mod, mask_mod


class TritonFlexBackend(Backend):
    """The in-house Triton flex kernel: block-sparse, any traceable mod, forward and backward."""

    name = "triton_flex"
    SUPPORTED_VENDORS = frozenset({"cpu", "cuda", "rocm"})
    SUPPORTED_DTYPES = Backend.SUPPORTED_DTYPES  # fp16, bf16, fp32 (fp32 dots in IEEE precision)
    MAX_HEAD_DIM = MAX_HEAD_DIM_TRITON_FLEX
    MIN_HEAD_DIM = MIN_HEAD_DIM
    SUPPORTS_DROPOUT = False
    SUPPORTS_LSE = True
    SUPPORTS_BACKWARD = True
    SUPPORTS_DV_NE_D = True
    TUNABLE = True
    BACKWARD_FALLBACK = True

    def library_label(self, caps: DeviceCaps) -> str:
        version = caps.libraries.triton
        return f"triton {version} flex kernel" if version is not None else "triton flex kernel"

    def _generic_reasons(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        if caps.libraries.triton is None:
            return [Reason("not_installed", "triton is not installed (pip install triton, or the [triton] extra)")]
        if caps.vendor == "cpu" and not caps.triton_interpret:
            return [Reason(
                "device_unsupported",
                "no GPU: set TRITON_INTERPRET=1 before importing dispatchattn to run it on CPU through Triton's "
                "interpreter (slow; for tests)",
            )]
        return super()._generic_reasons(spec, caps)

    def _why_not(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        reasons = []
        smallest = min(spec.head_dim, spec.head_dim_v)
        if smallest < MIN_HEAD_DIM:
            reasons.append(Reason(
                "head_dim_too_small",
                f"head_dim {smallest} is below {MIN_HEAD_DIM}, the smallest the Triton flex kernel supports "
                "(tl.dot's minimum inner dimension)",
            ))
        unsupported = self._mods_reason(spec)
        if unsupported is not None:
            reasons.append(Reason("mod_unsupported", unsupported))
        return reasons

    def measured_refusals(self, spec: AttentionSpec, caps: DeviceCaps) -> list[Reason]:
        """Kernels with no spill-free tile on this GPU (``spill_refusals``, read from the shipped compile checks and
        the user's tuning).  Refuse only the kernels this call runs: the forward (or, without gradient and with few
        query rows, the decoding kernel, falling back to the forward kernel when only decoding spills) and, with a
        gradient, the backward."""
        refused = spill_refusals(spec, caps)
        if not refused:
            return []
        if spec.requires_grad or spec.mods_need_grad:
            runs = ("fwd", "bwd")
        elif decoding(spec):
            if "decode" not in refused or "fwd" not in refused:
                return []  # the decoding kernel runs it, or the forward kernel in its place
            runs = ("decode", "fwd")
        else:
            runs = ("fwd",)
        return [refused[kernel] for kernel in runs if kernel in refused]

    @staticmethod
    def _mods_reason(spec: AttentionSpec) -> str | None:
        if spec.score is None and spec.mask is None:
            return None
        from . import codegen

        return codegen.unsupported_reason(spec.score, spec.mask, _device(spec))

    def tile_config(self, spec: AttentionSpec, caps: DeviceCaps, kernel: str | None = None):
        """The config of ``kernel`` ("fwd", "bwd", "decode"; default: the forward kernel's, or the decoding kernel's
        when ``decoding(spec, caps)``), with its source; a config recorded as unable to launch here is replaced by
        the one the launch will run (``ladder``)."""
        kernel = kernel or ("decode" if decoding(spec, caps) else "fwd")
        return self._launchable(kernel, spec, caps, *self._config(kernel, spec, caps))

    @staticmethod
    def _launchable(kernel: str, spec: AttentionSpec, caps: DeviceCaps, config, source: str):
        """(config, source) with the failed configs ``ladder.run`` will skip already skipped, and said so."""
        from . import ladder

        try:
            from . import codegen

            generated = codegen.generate(spec.score, spec_mask(spec), _device(spec))
        except Exception:  # noqa: BLE001 - mods the kernel cannot take are refused elsewhere; nothing recorded
            return config, source
        problem = ladder.problem_key(spec.dtype, spec.head_dim, spec.head_dim_v, generated.key)
        runs, skipped = ladder.first_launchable(kernel, config, problem, caps)
        return (runs, f"{source}; then {skipped}") if skipped else (config, source)

    @staticmethod
    def _config(kernel: str, spec: AttentionSpec, caps: DeviceCaps):
        """(config, source) of ``kernel`` for ``spec`` on ``caps``: ``tuning.select_config``."""
        from ...tuning import select_config

        return select_config(kernel, spec, caps)

    def notes(self, spec: AttentionSpec, caps: DeviceCaps) -> list[str]:
        """Generated kernel (hash and file), block sparsity when known from structure, tile configs."""
        config, source = self.tile_config(spec, caps)
        if decoding(spec, caps):
            notes = [note for note in (self._kernel_note(spec), self._decode_note(spec, caps, config)) if note]
            notes.append(f"decoding tile config {config.short()} (from {source})")
            return notes
        notes = [note for note in (self._kernel_note(spec), self._sparsity_note(spec, config)) if note]
        if decoding(spec):  # few query rows without gradient, but the decoding kernel spills on this GPU
            notes.append(f"the forward kernel runs instead of the decoding kernel: "
                         f"{spill_refusals(spec, caps)['decode']}")
        notes.append(f"forward tile config {config.short()} (from {source})")
        if spec.requires_grad or spec.mods_need_grad:
            bwd_config, bwd_source = self.tile_config(spec, caps, "bwd")
            notes.append(f"backward tile config {bwd_config.short()} (from {bwd_source})")
        return notes

    @staticmethod
    def _kernel_note(spec: AttentionSpec) -> str | None:
        mask = spec_mask(spec)
        dense = " plus a read of the dense attn_mask" if spec.attn_mask is not None else ""
        if spec.score is None and mask is None:
            return f"plain kernel (no score_mod / mask_mod){dense}"
        try:
            from . import codegen

            generated = codegen.generate(spec.score, mask, _device(spec))
        except Exception:  # noqa: BLE001 - a note must never fail a decision
            return None
        return f"generated kernel {generated.short_key}{dense} (source: {generated.path})"

    @staticmethod
    def _decode_note(spec: AttentionSpec, caps: DeviceCaps, config) -> str:
        from .decode import decoding_plan, multiprocessors

        block_m, row_tiles, splits = decoding_plan(spec.batch, spec.heads_q, spec.heads_kv, spec.seq_q, spec.seq_kv,
                                                   config, caps)
        rows = spec.seq_q * (spec.heads_q // spec.heads_kv)
        sms = multiprocessors(caps)
        device = f"{sms} SMs/CUs" if sms else "CPU: fixed"
        return (f"decoding kernel (split-KV) with num_splits={splits}: {rows} query rows per kv head (Sq {spec.seq_q} "
                f"x {spec.heads_q // spec.heads_kv} q heads per kv head) in {row_tiles} tile(s) of BLOCK_M={block_m}; "
                f"splits from Sk={spec.seq_kv}, B*Hkv={spec.batch * spec.heads_kv} and the device ({device}); "
                "then a reduction of the splits")

    @staticmethod
    def _sparsity_note(spec: AttentionSpec, config) -> str | None:
        """Fraction of tiles computed, when the mask's structure alone tells (no tensor data read)."""
        mask = spec.mask
        if spec.is_causal:
            mask = Causal() if mask is None else (mask & Causal() if isinstance(mask, MaskMod) else None)
        if mask is None:
            return None if spec.attn_mask is not None or spec.mask is not None else "dense: every tile computed"
        if not isinstance(mask, MaskMod) or mask.captured():  # sparsity from tensor values: not read to decide
            return None
        maybe_any, _ = mask.bind(spec.seq_q, spec.seq_kv).tile_classes(
            config.block_m, config.block_n, spec.seq_q, spec.seq_kv)
        return (f"block sparsity: {float(maybe_any.float().mean()):.1%} of {config.block_m}x{config.block_n} "
                "tiles computed")

    def run(self, call: AttentionCall, spec: AttentionSpec, config=None):
        from ...tuning.config import TileConfig
        from .autograd import triton_flex_attention

        q, k, v = call.bhsd(call.query), call.bhsd(call.key), call.bhsd(call.value)
        caps = probe(q.device)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if decoding(spec, caps) and not grad:
            from ...failures import LaunchFailed
            from .decode import decode_flex_attention

            decode_config = config if isinstance(config, TileConfig) else self._config("decode", spec, caps)[0]
            score_mod, mask_mod = call_mods(call)
            try:
                out, lse = decode_flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=call.scale,
                                                 return_lse=call.return_lse, config=decode_config, caps=caps)
                return call.from_bhsd(out), lse
            except LaunchFailed:
                pass  # recorded: the forward kernel runs the call below, with its own configs
        if decoding(spec, caps):  # the decision's config is the decoding kernel's: the forward kernel has its own
            config = None
        fwd_config = config if isinstance(config, TileConfig) else self._config("fwd", spec, caps)[0]
        bwd_config = self._config("bwd", spec, caps)[0] if spec.requires_grad or spec.mods_need_grad else None
        score_mod, mask_mod = call_mods(call)
        out, lse = triton_flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, scale=call.scale,
                                         return_lse=call.return_lse, fwd_config=fwd_config, bwd_config=bwd_config,
                                         backward_fallback=call.backward_fallback)
        return call.from_bhsd(out), lse
