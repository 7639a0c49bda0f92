"""What a call does when its backend cannot launch on the device (see ``failures`` for what counts as one).

- The forward: ``after_launch_failure`` records it and the call decides again without that backend, unless it
  was the only backend the user allowed (then ``UnsupportedError`` names the failure).
- The backward: the Triton flex kernel calls ``backward_fallback`` itself once its smaller configs are exhausted;
  a library backend's call that needs grad runs inside ``GuardedBackward``, whose backward catches the failure.
  Either way the gradients come from the next allowed backend, which runs the forward again under autograd.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import capabilities, failures
from .backends import get_backend
from .backends.base import AttentionCall
from .decide import decide
from .selector import Decision, UnsupportedError, current_policy
from .spec import AttentionSpec


def _unsupported(name: str, why: str, decision: Decision, policy) -> UnsupportedError:
    return UnsupportedError(
        f"dispatchattn: {name} could not launch on {decision.device} for {decision.spec_summary}: {why}. "
        f"It was the only backend allowed ({policy.source}); allow others (e.g. DISPATCHATTN_BACKEND={name},sdpa) "
        "to fall back to them", decision)


def after_launch_failure(error: Exception, why: str, spec: AttentionSpec, decision: Decision, backend, device,
                          rerun):
    """The chosen backend could not launch: remember it, then ``rerun()`` (the call decides again, without it) or,
    when it was the only backend the user allowed, raise UnsupportedError naming the failure."""
    caps = capabilities.probe(device)
    failures.record(caps, failures.backend_key(decision.backend, "fwd", spec), why)
    policy = current_policy(backend)
    if policy.only(decision.backend):
        raise _unsupported(decision.backend, why, decision, policy) from error
    return rerun()


def backward_fallback(spec: AttentionSpec, decision: Decision, backend, call: AttentionCall, layout: str = "bhsd"):
    """For a backward that fails to launch: the gradients from the next allowed backend, computed by running its
    forward again under autograd on the saved inputs (in ``layout``)."""

    def gradients(q, k, v, dout, dlse, grad_tensors, failure):
        caps = capabilities.probe(q.device)
        why = failures.launch_failure(failure) or str(failure)
        failures.record(caps, failures.backend_key(decision.backend, "bwd", spec), why)
        policy = current_policy(backend)
        if policy.only(decision.backend):
            raise _unsupported(f"{decision.backend}'s backward", why, decision, policy) from failure
        if spec.dropout_p > 0:  # a second forward would draw another dropout mask: its gradients are not these
            raise UnsupportedError(f"dispatchattn: {decision.backend}'s backward could not launch on "
                                   f"{decision.device} ({why}), and with dropout_p={spec.dropout_p} another backend "
                                   "cannot recompute the same gradients; the failure is recorded, so the next call "
                                   "runs another backend", decision) from failure
        runner = get_backend(decide(spec, caps, policy, may_measure=False).backend)
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            again = AttentionCall(*inputs, call.attn_mask, call.mask_mod, call.score_mod, call.scale, call.dropout_p,
                                  call.is_causal, call.enable_gqa, dlse is not None, layout)
            out, lse = runner.run(again, spec, None)
            wrt = [t for t in (*inputs, *grad_tensors) if t.requires_grad]
            outputs, grads_out = [out], [dout]
            if dlse is not None:
                outputs.append(lse)
                grads_out.append(dlse)
            found = iter(torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True))
        return [next(found) if t.requires_grad else None for t in (*inputs, *grad_tensors)]

    return gradients


class GuardedBackward(torch.autograd.Function):
    """A library backend's call whose backward may refuse to launch (a flash-attn, xFormers, cuDNN or compiled
    FlexAttention backward kernel that does not support these shapes here): its forward runs inside, under
    autograd, and its backward is run by ``torch.autograd.grad``, so that a launch failure there can be caught and
    the gradients taken from the next backend instead.  Eager calls whose inputs require grad only."""

    @staticmethod
    def forward(ctx, run, fallback, query, key, value):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value)]
            out, lse = run(*inputs)
        ctx.inner, ctx.fallback = (inputs, out, lse), fallback
        ctx.set_materialize_grads(False)
        return out.detach(), (lse.detach() if lse is not None else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        inputs, out, lse = ctx.inner
        outputs, grads_out = [], []
        for output, grad in ((out, dout), (lse, dlse)):
            if output is not None and grad is not None:
                outputs.append(output)
                grads_out.append(grad)
        wrt = [t for t in inputs if t.requires_grad]
        try:
            found = iter(torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True))
            grads = [next(found) if t.requires_grad else None for t in inputs]
        except Exception as error:
            if failures.launch_failure(error) is None:
                raise
            grads = ctx.fallback(*inputs, dout if dout is not None else torch.zeros_like(out), dlse, [], error)
        return (None, None, *grads[:3])


def guarded(runner, spec: AttentionSpec, decision: Decision, backend, call: AttentionCall, direct):
    """``(out, lse)`` of ``runner`` with its backward guarded against launch failures (``GuardedBackward``)."""
    if direct is not None:
        def run(query, key, value):
            return direct(query, key, value), None
    else:
        def run(query, key, value):
            inner = AttentionCall(query, key, value, *(getattr(call, f) for f in _CALL_REST))
            return runner.run(inner, spec, decision.config)
    fallback = backward_fallback(spec, decision, backend, call, call.layout)
    return GuardedBackward.apply(run, fallback, call.query, call.key, call.value)


_CALL_REST = ("attn_mask", "mask_mod", "score_mod", "scale", "dropout_p", "is_causal", "enable_gqa", "return_lse",
              "layout")
