"""Deciding inside ``torch.compile``: the selection runs as plain Python at trace time, never traced.

Dynamo would otherwise trace the whole selector (library probing, tile-config files, the Triton flex
kernel's mod tracer): slow, fragile and a source of graph breaks.  Instead ``decide_static`` is marked
``torch.compiler.assume_constant_result``: dynamo calls it once per trace with Python constants (shapes,
dtypes, flags, the structure of ``da.masks`` / ``da.scores`` objects, the policy settings) and bakes the
result into the graph as a constant.  The guards that make this sound are dynamo's own, installed by the
reads in the traced caller, ``traced_attention``: tensor metadata (inputs and tensors captured by structured
mods), the mods' attributes, ``os.environ`` and the ``use_backends`` stack.

The decision is data the selector already produces (spec, ``Decision``, backend); the kernels then run,
traced, on the caller's own tensors and mods.  ``triton_flex`` runs through its custom ops (``ops.py``).

Under ``dynamic=True`` the decision depends on the sizes (thresholds such as torch_flex's minimum CPU
sequence length), so the sizes of the attention inputs are specialised: one graph per distinct shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor  # traced code reads these names, not ``torch``: fewer guards
from torch.nn.functional import scaled_dot_product_attention as _sdpa

from . import capabilities, failures
from . import explain_log as _explain
from .backends import get_backend
from .backends.base import AttentionCall, random_call
from .capabilities import pretended as _caps_override  # the list itself: pushed and popped in place
from .decide import decide
from .envs import TRACED_ENVIRON, as_text, explain_level  # by name: reaching a module adds guards
from .failures import GENERATION as FAILURES
from .failures import LaunchFailed
from .masks import MaskMod
from .scores import ScoreMod
from .selector import Decision, Policy, UnsupportedError, context_policies, current_policy
from .spec import build_spec


def _constant(value):
    """A traced argument as a Python constant for ``decide_static`` (one function for all: each function dynamo
    inlines is a guard).  A tensor as ([sizes as ints], dtype, device, requires_grad); a float specialised
    (under ``dynamic=True`` dynamo tracks floats symbolically); anything else realised (dynamo tracks an
    argument left at its default lazily, and a lazy value cannot be handed to ``decide_static``)."""
    if isinstance(value, Tensor):
        # range(size).stop makes dynamo specialise a symbolic size to a Python int (int() would keep it symbolic).
        return ([range(size).stop for size in value.shape], value.dtype, value.device, value.requires_grad)
    if isinstance(value, float):
        return float.fromhex(value.hex())  # specialises a symbolic float (float() would keep it symbolic)
    if value:  # control flow on it realises a lazy tracker (with a constant-match guard)
        pass
    return value


def _stand_in(static):
    """A tensor with the metadata of ``static`` and one element of storage (for validation and the spec)."""
    if static is None or not isinstance(static, tuple):
        return static
    shape, dtype, device, requires_grad = static
    one = torch.empty((1,) * len(shape), dtype=dtype, device=device, requires_grad=requires_grad)
    return one.expand(shape)


def _static_mod(mod):
    """A mod as constants, read in traced code: a ``da.masks`` / ``da.scores`` object as its class and the fields
    it declares (``_fields``, read by name: plain attribute reads, which every dynamo traces and guards; tensors as
    metadata: one made inside the compiled region has no real counterpart at trace time); a closure-free function
    as itself; any other callable as "opaque"."""
    if isinstance(mod, (MaskMod, ScoreMod)):
        return ("mod", type(mod), tuple([(name, _static_mod(getattr(mod, name))) for name in mod._fields]))
    if isinstance(mod, Tensor):
        return ("tensor", _constant(mod))
    if mod is None or not callable(mod):
        return mod  # validation at trace time says what is wrong with it
    code = getattr(mod, "__code__", None)
    if code is not None and not (code.co_freevars or code.co_kwonlyargcount or mod.__defaults__):
        # Its code and module globals fix what it computes: the function itself is a constant (dynamo guards it).
        return ("function", mod)
    return ("opaque",)  # a closure may hold traced values: only "some user function" is constant


def _opaque_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx  # stands in for a user's mask_mod in the spec of a traced call: never run


def _opaque_score(score, b, h, q_idx, kv_idx):
    return score * (q_idx - kv_idx)  # stands in for a user's score_mod in the spec of a traced call: never run


def _rebuild_mod(static, opaque=None):
    """The structural twin of a ``_static_mod`` description: same class and parameters, stand-in tensors."""
    if not isinstance(static, tuple) or not static or static[0] not in ("mod", "tensor", "opaque", "function"):
        return static
    if static[0] == "opaque":
        return opaque
    if static[0] == "function":
        return static[1]
    if static[0] == "tensor":
        return _stand_in(static[1])
    _, cls, fields = static
    return cls(**{name: _rebuild_mod(value) for name, value in fields})


class _Decided:
    """Every (spec, decision, backend) decided while tracing, one attribute each (``d0``, ``d1``...), never changed.

    Attributes rather than a list or dict: dynamo guards one attribute by name, but a container by its length
    or keys, which every later trace would change (a recompile of every other graph)."""

    count = 0


DECIDED = _Decided()


@torch.compiler.assume_constant_result
def decide_static(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, score_mod, mask_mod,
                  layout, return_lse, policy: tuple, explain_raw, backend_raw, caps_override, failures_seen) -> tuple:
    """Decide a traced call; runs eagerly at trace time.  Tensors come as static tuples, the two environment
    settings as ``os.environ`` stores them (``backend_raw`` is passed only so that the traced caller reads it,
    which makes dynamo guard it; ``current_policy`` reads the same value here; ``failures_seen``, the count of
    recorded launch failures, likewise: a graph is traced again after a backend failed to launch, without it).

    Returns ``(name, sdpa_arguments, run_message)``: the name in ``DECIDED`` of ``(spec, decision, backend)``
    (dynamo cannot guard attributes of a constant result, so the objects are read from that module-level holder
    in traced code, guarded by identity, never changed); where the decision is SDPA called as it is, the
    arguments of that call after the mask (constants: nothing more to guard), else None; with
    ``DISPATCHATTN_EXPLAIN=2`` the decision as text, which the graph logs on every run, else None."""
    tensors = [_stand_in(t) for t in (query, key, value, attn_mask)]
    score_mod, mask_mod = _rebuild_mod(score_mod, _opaque_score), _rebuild_mod(mask_mod, _opaque_mask)
    # build_spec reads the grad mode: the traced code's own (dynamo sets it as the region's no_grad /
    # enable_grad blocks say while tracing, and guards it on entry with the rest of the global state).
    spec = build_spec(*tensors[:3], tensors[3], dropout_p, is_causal, scale, enable_gqa, score_mod=score_mod,
                      mask_mod=mask_mod, layout=layout, return_lse=return_lse, check_mods=False)
    caps = caps_override if caps_override is not None else capabilities.probe(tensors[0].device)
    policy = _policy(policy)
    decision = decide(spec, caps, policy, may_measure=False)
    decision = _launchable_library(spec, caps, policy, decision, tensors[0].device)
    runner = get_backend(decision.backend)
    if decision.backend == "triton_flex":
        decision, runner = _triton_flex_ops(spec, caps, policy, decision, tensors[0].device)
    level = explain_level(as_text(explain_raw))
    if level == 1:  # reported when traced (each distinct decision once); level 2: by the graph, on every run
        _explain.report(str(decision), level)
    name = f"d{DECIDED.count}"
    setattr(DECIDED, name, (spec, decision, runner))
    DECIDED.count += 1
    return (name, runner.direct_arguments(spec) if decision.backend == "sdpa" else None,
            str(decision) if level >= 2 else None)


#: How many times compiled graphs logged their decision (``DISPATCHATTN_EXPLAIN=2``): the tensor ``explain_run``
#: counts in, since a graph drops an op without outputs unless it mutates an input.
EXPLAIN_RUNS = torch.zeros((), dtype=torch.int64)


@torch.library.custom_op("dispatchattn::explain", mutates_args=("runs",))
def explain_run(runs: torch.Tensor, message: str) -> None:
    """Logs a decision each time a compiled graph runs (``DISPATCHATTN_EXPLAIN=2``).  An op, because dynamo
    drops logging calls made in the functions it inlines; it counts in ``runs`` so that the graph keeps it."""
    runs.add_(1)
    _explain.emit(message)


@explain_run.register_fake
def _(runs: torch.Tensor, message: str) -> None:
    return None


def _policy(settings: tuple) -> Policy:
    """The Policy from ``traced_attention``'s constants: ("context", allowed, source) for a use_backends block,
    else ("call", backend) resolved by ``current_policy`` (run here, not traced: it reads DISPATCHATTN_BACKEND,
    the value the traced code read, which dynamo guards)."""
    if settings[0] == "context":
        return Policy(settings[1], settings[2])
    return current_policy(settings[1])


#: Library backends whose call is tried once while tracing (``_launchable_library``).
PROBED_LIBRARIES = ("flash", "xformers", "sdpa")


def _launchable_library(spec, caps, policy: Policy, decision: Decision, device) -> Decision:
    """While tracing, call a chosen library backend (flash-attn, xFormers, SDPA) once, on inputs of the call's
    shapes with one batch row (random values, the mods' structural twins): a library that refuses the call does so
    here, where the failure is recorded and the next backend chosen (or, forced, ``UnsupportedError`` raised),
    rather than inside the graph.  The forward only: a backward that refuses inside a graph raises there (eager
    calls take the next backend)."""
    while decision.backend in PROBED_LIBRARIES:
        call = random_call(spec, device, batch=1)  # one batch row: refusals are per row
        # the mods' structural twins stand in (their captured tensors are placeholders): a refusal is about shapes
        try:
            with torch.no_grad():
                get_backend(decision.backend).run(call, spec, decision.config)
            return decision
        except Exception as error:  # only a launch failure is handled; anything else is the graph's to raise
            why = failures.launch_failure(error)
            if why is None:
                return decision
            failures.record(caps, failures.backend_key(decision.backend, "fwd", spec), why)
            if policy.only(decision.backend):
                raise UnsupportedError(f"dispatchattn: {decision.backend} was forced ({policy.source}) and could "
                                       f"not launch on {decision.device}: {why}", decision) from error
            decision = decide(spec, caps, policy, may_measure=False)
    return decision


def _triton_flex_ops(spec, caps, policy: Policy, decision: Decision, device):
    """The in-house kernel runs in a graph through ``torch.ops.dispatchattn.triton_flex_*`` (see its ``ops.py``).
    When those cannot run the call, the next allowed backend is chosen, or the forced choice is refused."""
    from .backends.triton_flex import ops
    from .backends.triton_flex.backend import decoding, spec_mask

    backend = get_backend("triton_flex")
    try:
        if spec.mask is _opaque_mask or spec.score is _opaque_score:
            # The plan generates the kernel from the mods at trace time, where a closure is known only as "some
            # function" (its cells may hold traced tensors, so it cannot be made a constant).
            raise ValueError("a mod that is a closure (or has defaults) is opaque at trace time; closure-free "
                             "functions and da.masks / da.scores objects are planned")
        fwd_config, bwd_config = decision.config, backend.tile_config(spec, caps, "bwd")[0]
        plan = ops.plan(spec, spec.score, spec.mask, fwd_config, bwd_config, device, caps)  # or ValueError
        if not decoding(spec, caps):  # a config that cannot launch here fails now, not inside the graph
            launched = ops.probe_configs(spec, spec.score, spec_mask(spec), fwd_config, bwd_config, device)
            if launched != (fwd_config, bwd_config):
                plan = ops.plan(spec, spec.score, spec.mask, *launched, device, caps)
        return decision, plan
    except LaunchFailed as error:
        failures.record(caps, failures.backend_key("triton_flex", error.kernel, spec), str(error))
        why = f"triton_flex could not launch on this device: {error}"
    except ValueError as error:
        why = f"inside torch.compile triton_flex runs through its custom ops, which cannot run this call: {error}"
    if policy.only("triton_flex"):
        raise UnsupportedError(f"dispatchattn: {why}", decision)
    fallback = decide(spec, caps, policy, may_measure=False, exclude=(("triton_flex", why),))
    return fallback, get_backend(fallback.backend)


def _kernel_mod(mod, twin, spec):
    """The structured mod the kernels run in a traced call: ``twin`` (``spec``'s, bound) where it captures no
    tensor, else the caller's ``mod`` bound to the lengths."""
    return twin if not twin.captured() else mod.bind(spec.seq_q, spec.seq_kv)


def traced_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                     *, score_mod=None, mask_mod=None, layout="bhsd", return_lse=False, backend=None):
    """``attention`` as torch.compile traces it (dynamo inlines this function in its place, see ``api.py``; the
    signature is the same): reads what dynamo must guard, decides at trace time, then runs the chosen backend,
    traced, on the caller's tensors and mods.

    Every object read here becomes a guard that dynamo checks on each call of the compiled function, with the
    CPU's caches cold after the previous kernel: at (1, 8, 128, 64) on CPU, 58 guards cost ~2% over SDPA's own
    function (15 guards) and 33 cost ~1% (``bench/overhead.py``, paired single calls).  So this reads as few
    objects as it can: names imported directly rather than through modules, one function to make constants,
    the environment's raw bytes (decoded at trace time), SDPA called with constant arguments rather than
    through a backend's function."""
    if backend is None and context_policies:  # a use_backends block (maybe entered inside the region)
        policy = ("context", context_policies[-1].allowed, context_policies[-1].source)
    else:  # backend= or the environment (dynamo guards the two os.environ entries read below)
        policy = ("call", _constant(backend))
    arguments = [_constant(x) for x in (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)]
    # Without mods, _static_mod is not even called: each function dynamo inlines adds guards.
    mods = (score_mod, mask_mod) if score_mod is None and mask_mod is None else (_static_mod(score_mod),
                                                                                  _static_mod(mask_mod))
    name, sdpa_arguments, run_message = decide_static(
        *arguments, *mods, _constant(layout), _constant(return_lse), policy,
        TRACED_ENVIRON.get(b"DISPATCHATTN_EXPLAIN"), TRACED_ENVIRON.get(b"DISPATCHATTN_BACKEND"),
        _caps_override[-1] if _caps_override else None, FAILURES.count,
    )
    if run_message is not None:  # DISPATCHATTN_EXPLAIN=2
        explain_run(EXPLAIN_RUNS, run_message)
    if sdpa_arguments is not None:
        sdpa_dropout, sdpa_causal, sdpa_scale, sdpa_gqa = sdpa_arguments
        return _sdpa(query, key, value, None, sdpa_dropout, sdpa_causal, scale=sdpa_scale, enable_gqa=sdpa_gqa)
    spec, decision, runner = getattr(DECIDED, name)
    # The spec holds structural twins of the mods, bound to the lengths.  A twin that captures no tensor computes
    # what the caller's mod computes, and existed before tracing: the kernels run it (not every dynamo can read the
    # attributes of a mod made in the traced code, by ``bind`` or by the caller inside the region: torch 2.11
    # cannot).  One that captures tensors holds stand-ins: the kernels run the caller's own, bound here.
    mask = _kernel_mod(mask_mod, spec.mask, spec) if isinstance(mask_mod, MaskMod) else mask_mod
    score = _kernel_mod(score_mod, spec.score, spec) if isinstance(score_mod, ScoreMod) else score_mod
    call = AttentionCall(query, key, value, attn_mask, mask, score,
                         scale if scale is not None else 1.0 / math.sqrt(spec.head_dim), spec.dropout_p, is_causal,
                         enable_gqa, return_lse, layout)
    out, lse = runner.run(call, spec, decision.config)
    return (out, lse) if return_lse else out
