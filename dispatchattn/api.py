"""The universal call: ``attention()`` and ``explain()``.  spec -> select -> run, with a warm fast path."""

from __future__ import annotations

import inspect
import math

import torch
from torch.compiler import is_compiling  # by name: traced code reads fewer objects (guards)

from . import capabilities, envs, failures, fallback
from . import explain_log as _explain
from .backends import get_backend
from .backends.base import AttentionCall
from .compiled import traced_attention
from .decide import decide
from .selector import Decision, context_policies, current_policy, select_cached
from .spec import AttentionSpec, build_spec
from .tuning import rankings

# Warm-call memo: call signature (metadata only) -> (spec, decision, backend, resolved scale, the backend's
# ``direct`` function or None).  Bounded; cleared when full.  ``_LAST`` holds the latest (signature, entry): a
# model calls with one signature many times in a row, and comparing with one tuple is cheaper than hashing it
# (~0.6 us of a ~3 us budget).
_MEMO: dict[tuple, tuple] = {}
_MEMO_LIMIT = 4096
_LAST: tuple = ((), None)


def clear_memo() -> None:
    """Forget every memoised decision (the next call of each signature decides again)."""
    global _LAST
    _MEMO.clear()
    _LAST = ((), None)


def _signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, score_mod, mask_mod,
               layout, return_lse, backend, backend_env):
    """Everything a decision depends on, read from metadata only.  Flat and inline: this runs on every warm
    call; q/k/v are tensors or validation raises later.  The policy enters through what determines it
    (``backend=``, the innermost ``use_backends`` block, ``DISPATCHATTN_BACKEND``)."""
    policies, override = context_policies, capabilities.pretended
    return (
        query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device, key.device,
        value.device, query.requires_grad, key.requires_grad, value.requires_grad,
        None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device, attn_mask.requires_grad),
        dropout_p, is_causal, scale, enable_gqa, score_mod, mask_mod, layout, return_lse, backend,
        torch.is_grad_enabled(), policies[-1].allowed if policies else None, backend_env,
        override[-1] if override else None,
    )


def _decide(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, score_mod, mask_mod, layout,
            return_lse, backend) -> tuple[AttentionSpec, Decision, capabilities.DeviceCaps]:
    spec = build_spec(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, score_mod=score_mod,
                      mask_mod=mask_mod, layout=layout, return_lse=return_lse)
    caps = capabilities.probe(query.device)
    return spec, decide(spec, caps, current_policy(backend), query.device), caps


def _forget_decisions() -> None:
    """A launch failure or a ranking was recorded: every memoised decision and tile config is decided again on its
    next call."""
    from .tuning import clear_memo as clear_config_memo

    clear_memo()
    select_cached.cache_clear()
    clear_config_memo()


failures.on_record(_forget_decisions)
rankings.on_record(_forget_decisions)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    score_mod=None,
    mask_mod=None,
    layout: str = "bhsd",
    return_lse: bool = False,
    backend: str | None = None,
):
    """Scaled dot-product attention on the fastest correct kernel for this device and problem.

    A drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention`` that also takes
    FlexAttention's ``score_mod`` / ``mask_mod`` (or ``da.masks`` / ``da.scores`` objects), a ``bshd``
    layout, ``return_lse`` and a forced ``backend``.

    >>> import torch, dispatchattn as da
    >>> q = k = v = torch.randn(1, 2, 16, 32)
    >>> da.attention(q, k, v, mask_mod=da.masks.causal()).shape
    torch.Size([1, 2, 16, 32])
    """
    if is_compiling():  # decided at trace time, explained there (see compiled.py)
        return traced_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                score_mod=score_mod, mask_mod=mask_mod, layout=layout, return_lse=return_lse,
                                backend=backend)
    global _LAST
    explain_env, backend_env = envs.eager_raw()
    try:
        sig = _signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, score_mod,
                         mask_mod, layout, return_lse, backend, backend_env)
        last_sig, entry = _LAST
        if sig != last_sig:
            entry = _MEMO.get(sig)
    except (AttributeError, TypeError, ValueError, RuntimeError):  # not tensors, unhashable, a tensor where a
        # number goes (its == is ambiguous): validation will say why
        sig, entry = None, None
    fresh = entry is None
    if fresh:
        spec, decision, caps = _decide(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       score_mod, mask_mod, layout, return_lse, backend)
        runner = get_backend(decision.backend)
        entry = (spec, decision, runner, scale if scale is not None else 1.0 / math.sqrt(spec.head_dim),
                 runner.direct(spec, caps, decision.config))
        if len(_MEMO) >= _MEMO_LIMIT:
            _MEMO.clear()
        if sig is not None:
            _MEMO[sig] = entry
    if sig is not None:
        _LAST = (sig, entry)
    spec, decision, runner, resolved_scale, direct = entry
    if explain_env is not None:
        level = envs.explain_level(envs.as_text(explain_env))
        if level and (fresh or level >= 2):
            _explain.report(str(decision), level)
    try:
        if direct is not None and not spec.requires_grad:
            return direct(query, key, value)
        # Inline and positional (in field order): keywords cost ~1 us on the warm eager path.
        call = AttentionCall(query, key, value, attn_mask, spec.mask, spec.score, resolved_scale, spec.dropout_p,
                             is_causal, enable_gqa, return_lse, layout)
        if not spec.requires_grad or not torch.is_grad_enabled():
            out, lse = runner.run(call, spec, decision.config)
        elif runner.BACKWARD_FALLBACK:  # the backend runs the fallback itself (after its own smaller configs)
            call.backward_fallback = fallback.backward_fallback(spec, decision, backend, call)
            out, lse = runner.run(call, spec, decision.config)
        elif runner.BACKWARD_MAY_FAIL and not spec.mods_need_grad and (
                attn_mask is None or not attn_mask.requires_grad):
            out, lse = fallback.guarded(runner, spec, decision, backend, call, direct)
            if direct is not None:
                return out
        elif direct is not None:
            return direct(query, key, value)
        else:
            out, lse = runner.run(call, spec, decision.config)
    except Exception as error:  # free when nothing is raised; only launch failures are caught
        why = failures.launch_failure(error)
        if why is None:
            raise
        return fallback.after_launch_failure(error, why, spec, decision, backend, query.device, lambda: attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, score_mod=score_mod,
            mask_mod=mask_mod, layout=layout, return_lse=return_lse, backend=backend))
    return (out, lse) if return_lse else out


# Dynamo inlines ``traced_attention`` wherever a compiled function calls ``attention``: the graph is then guarded
# on ``attention``'s identity alone, rather than on its code, the defaults of every argument a call leaves out
# and the names the compiling branch above reads (a plain causal call: 47 -> 33 guards).  The two signatures
# must be the same: registering checks it.  (Without this hook dynamo inlines ``attention`` and takes its
# compiling branch: the same graph, more guards.)
if hasattr(torch.compiler, "substitute_in_graph"):
    torch.compiler.substitute_in_graph(attention)(traced_attention)


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> Decision:
    """Decide without running: which backend ``attention`` would use for these arguments, and why.  Takes exactly
    ``attention``'s arguments (its signature is ``attention``'s).

    >>> import torch, dispatchattn as da
    >>> q = k = v = torch.randn(1, 2, 16, 32)
    >>> da.explain(q, k, v, is_causal=True).backend
    'sdpa'
    """
    bound = _ATTENTION_SIGNATURE.bind(query, key, value, *args, **kwargs)
    bound.apply_defaults()
    return _decide(*bound.arguments.values())[1]


_ATTENTION_SIGNATURE = inspect.signature(attention)
explain.__signature__ = _ATTENTION_SIGNATURE.replace(return_annotation=Decision)
