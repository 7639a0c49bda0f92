"""Selection: a pure function (spec, caps, policy, ranking, exclude) -> Decision, memoised per signature.

Every backend answers "why not" as a list of sentences; those with none are eligible.  Among them a user
allow-list (``backend=``, ``DISPATCHATTN_BACKEND``, ``use_backends``) decides by its order; else a measured ranking
of this device and problem bucket (``tuning.rankings``, looked up by the caller) picks the fastest; else the
per-vendor default order chosen by problem class (``priority``).  Nothing here reads the disk or tunes: the
ranking and the launch failures to exclude are handed in, and the tile config is chosen after (``decide``).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import envs
from .backends import BACKEND_NAMES, get_backend
from .backends.base import Reason
from .capabilities import DeviceCaps
from .mask_plan import needs_dense_mask
from .spec import AttentionSpec
from .tuning.rankings import DECODE_MAX_SEQ_Q, Ranking


class UnsupportedError(RuntimeError):
    """No allowed backend can run the call; the message lists every backend with its reasons."""

    def __init__(self, message: str, decision: Decision | None = None):
        super().__init__(message)
        self.decision = decision


@dataclass(frozen=True)
class Policy:
    """Which backends the user allows, in their priority order (None = the default order)."""

    allowed: tuple[str, ...] | None = None
    source: str = "default"  # "backend=", "DISPATCHATTN_BACKEND", "use_backends", "default"

    def only(self, name: str) -> bool:
        """Whether ``name`` is the one backend allowed (nothing to fall back to when it cannot launch)."""
        return self.allowed is not None and all(allowed == name for allowed in self.allowed)

    def __post_init__(self):
        for name in self.allowed or ():
            if name not in BACKEND_NAMES:
                raise ValueError(f"{self.source}: expected backend names from {list(BACKEND_NAMES)}, got {name!r}")


context_policies: list[Policy] = []


@contextlib.contextmanager
def use_backends(*names: str) -> Iterator[None]:
    """Allow only these backends, in this priority order, inside the block.

    >>> import dispatchattn as da
    >>> with da.use_backends("sdpa", "reference"):
    ...     pass
    """
    context_policies.append(Policy(tuple(names), "use_backends"))
    try:
        yield
    finally:
        context_policies.pop()


def current_policy(backend: str | None = None) -> Policy:
    """``backend=`` wins over ``use_backends`` which wins over ``DISPATCHATTN_BACKEND``.  Cheap when warm:
    policies are built once per distinct setting."""
    if backend is not None:
        return _forced_policy(backend)
    if context_policies:
        return context_policies[-1]
    raw = envs.backend_raw()
    return _env_policy(raw) if raw else _DEFAULT_POLICY


_DEFAULT_POLICY = Policy()


@functools.lru_cache(maxsize=64)
def _forced_policy(backend) -> Policy:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)} or None, got {backend!r}")
    return Policy((backend,), "backend=")


@functools.lru_cache(maxsize=64)
def _env_policy(raw: str) -> Policy:
    allowed = envs.parse_backend_list(raw)
    return Policy(allowed, "DISPATCHATTN_BACKEND") if allowed else _DEFAULT_POLICY


@dataclass(frozen=True)
class Decision:
    """The record of one selection.  Every rendering (log line, ``str``, CLI, JSON) comes from it."""

    backend: str
    reasons: dict[str, list[Reason]]
    spec_summary: str
    device: str
    priority: tuple[str, ...]
    decided_by: str  # "measurement" (a ranking), "rule" (default priority), "user" (backend= / allow-list)
    rationale: str
    config: object = None
    config_source: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: The backends that could run the call, in the order they would be tried (the chosen one first); ``reasons``
    #: holds ``[]`` for them and the rejections of all others.
    eligible: tuple[str, ...] = ()
    #: Why each eligible backend other than the chosen one did not run (lower priority, slower when measured).
    lost: dict[str, str] = field(default_factory=dict)
    #: The measured ranking that decided (``Ranking.to_dict()``), or None when it was not measured.
    ranking: dict | None = None

    def __str__(self) -> str:
        lines = [
            f"dispatchattn: {self.backend} for {self.spec_summary} on {self.device}",
            f"  decided by {self.decided_by}: {self.rationale}",
        ]
        if self.decided_by == "rule" and self.ranking is None and len(self.eligible) > 1:
            lines.append(f"  {NOT_MEASURED}")
        if self.config is not None:
            config = self.config.short() if hasattr(self.config, "short") else self.config
            lines.append(f"  tile config: {config} (from {self.config_source})")
        lines += [f"  note: {note}" for note in self.notes]
        for name in self.priority:
            if name == self.backend:
                continue
            reasons = self.reasons.get(name) or []
            lines.append(f"  {name}: " + ("; ".join(reasons) if reasons else self.lost.get(name, "usable")))
        lines.append(f"  Available backends: {', '.join(self.available)}. Selected backend: {self.backend}")
        return "\n".join(lines)

    @property
    def available(self) -> list[str]:
        """Backends that could run the call, in the order they would be tried (the chosen one first)."""
        return list(self.eligible)

    def to_dict(self) -> dict:
        config = self.config.to_dict() if hasattr(self.config, "to_dict") else self.config
        return {
            "backend": self.backend,
            "reasons": {name: [r.to_dict() if isinstance(r, Reason) else {"code": "", "message": str(r)}
                               for r in reasons] for name, reasons in self.reasons.items()},
            "spec": self.spec_summary,
            "device": self.device,
            "priority": list(self.priority),
            "decided_by": self.decided_by,
            "rationale": self.rationale,
            "config": config,
            "config_source": self.config_source,
            "notes": list(self.notes),
            "eligible": list(self.eligible),
            "lost": dict(self.lost),
            "ranking": self.ranking,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_GPU_FIXED_FIRST = ("flash", "sdpa", "xformers", "triton_flex", "torch_flex", "reference")
_GPU_FLEX_FIRST = ("flash", "xformers", "triton_flex", "torch_flex", "sdpa", "reference")
#: Measured on an H200 (bf16, S 2k-8k, docs/performance.md): torch_flex's backward took 0.46-0.92x the time of
#: triton_flex's on every masked or scored case (forward within 0.97x median), so training calls take torch_flex.
_GPU_FLEX_TRAINING = ("flash", "xformers", "torch_flex", "triton_flex", "sdpa", "reference")
#: Same run, decoding (Sq=1, KV 16384, GQA 4, D=128, ALiBi): SDPA with the bias materialised 0.142 ms, the triton_flex
#: decoding kernel 0.307 ms: SDPA first where it can take the mods as a small dense mask or bias.
_GPU_DECODE_SDPA_FIRST = ("flash", "sdpa", "xformers", "triton_flex", "torch_flex", "reference")
_CPU_SDPA_FIRST = ("sdpa", "reference", "torch_flex", "triton_flex", "flash", "xformers")
_CPU_FLEX_FIRST = ("torch_flex", "sdpa", "reference", "triton_flex", "flash", "xformers")
#: On CPU, compiled FlexAttention repays its first compile (~7-13 s) only on large problems whose mask SDPA must
#: take densely (bench/cpu_masks.py, 2 cores, (1, 8, S, 64) fp32, bench/results/cpu-masks.json): sliding window
#: 256 runs 1.07x / 2.2x / 4.1x faster than SDPA with a cached dense mask at S=1024 / 2048 / 4096, documents
#: (8) 2.0x / 3.2x / 4.6x; plain causal, which SDPA takes as is_causal, runs ~3x slower through FlexAttention.
CPU_FLEX_MIN_SCORES = 2048 * 2048


def priority(spec: AttentionSpec, caps: DeviceCaps) -> tuple[tuple[str, ...], str]:
    """The default priority order for this problem on this device, and the sentence that justifies it."""
    masked = spec.mask is not None or spec.score is not None
    if caps.is_gpu:
        if masked and (spec.requires_grad or spec.mods_need_grad):
            return _GPU_FLEX_TRAINING, (
                "mask/score mods on a GPU, with gradients: fixed-function kernels when they compute exactly this, "
                "else FlexAttention, whose backward measured 1.1-2.2x faster than the triton_flex backward on an "
                "H200, then triton_flex, then SDPA with a dense mask"
            )
        if masked and spec.seq_q <= DECODE_MAX_SEQ_Q:
            return _GPU_DECODE_SDPA_FIRST, (
                f"decoding ({spec.seq_q} query rows) with mask/score mods on a GPU: memory-bound, and SDPA with the "
                "mods as a small dense mask/bias read the KV cache 2.2x faster than the triton_flex decoding kernel "
                "on an H200; then the flex kernels"
            )
        if masked:
            return _GPU_FLEX_FIRST, (
                "mask/score mods on a GPU: fixed-function kernels when they compute exactly this, else the fused "
                "flex kernels, which skip masked tiles, before SDPA with a dense mask"
            )
        return _GPU_FIXED_FIRST, "plain attention on a GPU: fixed-function kernels (flash-attn, SDPA) first"
    dense = masked and needs_dense_mask(spec)
    if dense and not spec.requires_grad and spec.seq_q * spec.seq_kv >= CPU_FLEX_MIN_SCORES:
        return _CPU_FLEX_FIRST, (
            f"masked problem of {spec.seq_q}x{spec.seq_kv} on CPU: compiled FlexAttention skips masked tiles and is "
            "several times faster than SDPA's dense masked product (after a ~20 s first compile per shape)"
        )
    why = "CPU: SDPA's kernels first, then plain math"
    if masked and not dense:
        why += "; SDPA takes this mask as is_causal, faster on CPU than compiled FlexAttention"
    elif masked:
        why += (f"; at {spec.seq_q}x{spec.seq_kv} a dense mask or plain math is cheaper than compiling FlexAttention "
                "(~20 s first call per shape)" if not spec.requires_grad else "; FlexAttention has no backward on CPU")
    return _CPU_SDPA_FIRST, why


#: How a decision the rule made among several backends says that measuring is possible.
NOT_MEASURED = ("not measured: DISPATCHATTN_AUTOTUNE=1 times the eligible backends on this problem's first call "
                "(`python -m dispatchattn tune --backends` ahead of time)")


def select(spec: AttentionSpec, caps: DeviceCaps, policy: Policy, ranking: Ranking | None = None,
           exclude: tuple[tuple[str, str], ...] = ()) -> Decision:
    """Decide which backend runs ``spec`` on ``caps`` under ``policy``.  Raises UnsupportedError.

    ``ranking``: the measured times of ``spec``'s bucket on this device (``tuning.rankings.lookup``), or None.
    ``exclude``: (backend, sentence or Reason) pairs of backends that must not run: those recorded as unable to
    launch this problem on this device (``failures.excluded_backends``; a sentence), and refusals measured ahead of
    time (``Backend.measured_refusals``; a Reason).  Both are looked up by the caller: this function
    reads no file and runs nothing.  The tile config is not chosen here (``decide.decide`` adds it)."""
    default_order, rationale = priority(spec, caps)
    excluded: dict[str, list[Reason]] = {}
    for name, why in exclude:
        excluded.setdefault(name, []).append(why if isinstance(why, Reason) else Reason("launch_failed", why))
    if policy.allowed:
        order = policy.allowed + tuple(n for n in default_order if n not in policy.allowed)
    else:
        order = default_order
    reasons: dict[str, list[Reason]] = {}
    eligible: list[str] = []
    for name in order:
        if policy.allowed and name not in policy.allowed:
            reasons[name] = [Reason("not_allowed", f"not in the allowed backends {list(policy.allowed)} "
                                                   f"(set by {policy.source})")]
            continue
        found = list(get_backend(name).why_not(spec, caps))
        if name in excluded and not found:
            found = list(excluded[name])
        reasons[name] = found
        if not found:
            eligible.append(name)
    decided_by, evidence = ("user" if policy.allowed else "rule"), None
    if policy.allowed:
        rationale = f"allowed backends {list(policy.allowed)} (set by {policy.source}), in that order"
    elif ranking is not None and any(ranking.time_ms(name) is not None for name in eligible):
        eligible = _by_measurement(eligible, ranking)
        evidence = ranking.to_dict()
        if ranking.time_ms(eligible[0]) is not None:
            decided_by = "measurement"
            rationale = (f"fastest measured: {eligible[0]} {ranking.time_ms(eligible[0]):.4g} ms "
                         f"({ranking.describe()})")
        else:  # the rule's first choice was not measured (e.g. a library the ranking's device did not have)
            rationale += f"; {eligible[0]} was not measured, the {ranking.describe()} orders the others"
    if not eligible:
        decision = Decision("none", reasons, spec.summary(), caps.describe(), order, decided_by, rationale)
        raise UnsupportedError(_unsupported_message(decision, policy), decision)
    chosen = eligible[0]
    failed = tuple(f"{name} did not run: {reasons[name][0]}; {chosen} runs instead" for name in order
                   if name in excluded and any(r.code == "launch_failed" for r in reasons.get(name, ())))
    return Decision(
        backend=chosen, reasons=reasons, spec_summary=spec.summary(), device=caps.describe(), priority=order,
        decided_by=decided_by, rationale=rationale, notes=failed, eligible=tuple(eligible),
        lost={name: _why_lost(name, chosen, ranking if evidence else None) for name in eligible[1:]},
        ranking=evidence,
    )


def _by_measurement(eligible: list[str], ranking: Ranking) -> list[str]:
    """Eligible backends reordered by ``ranking``: the places the measured ones hold in the rule's order are filled
    fastest first (a ranking says nothing of a backend it did not measure, which keeps its place); those that
    failed while being measured go last (never chosen while another can run)."""
    failed = dict(ranking.failed)
    fastest = iter(name for name in ranking.order() if name in eligible)
    measured = {name for name in eligible if ranking.time_ms(name) is not None}
    order = [next(fastest) if name in measured else name for name in eligible if name not in failed or name in measured]
    return order + [name for name in eligible if name in failed and name not in measured]


def _why_lost(name: str, chosen: str, ranking: Ranking | None) -> str:
    time, best = (ranking.time_ms(name), ranking.time_ms(chosen)) if ranking is not None else (None, None)
    if time is not None and best is not None:
        return f"could run; measured {time:.4g} ms, {time / best:.2f}x the time of {chosen}"
    if time is not None:
        return f"could run; measured {time:.4g} ms, but {chosen} (not measured) comes first in the priority order"
    failed = dict(ranking.failed).get(name) if ranking is not None else None
    if failed is not None:
        return f"could run, but failed while being measured: {failed}"
    return f"could run, but {chosen} comes first in the priority order" + (" (not measured)" if ranking else "")


def _unsupported_message(decision: Decision, policy: Policy) -> str:
    head = ("the forced backend cannot run this call" if policy.source == "backend="
            else "no allowed backend can run this call")
    lines = [f"dispatchattn: {head}: {decision.spec_summary} on {decision.device}"]
    for name in decision.priority:
        lines.append(f"  {name}: " + "; ".join(decision.reasons.get(name) or ["(not tried)"]))
    return "\n".join(lines)


@functools.lru_cache(maxsize=1024)
def select_cached(spec: AttentionSpec, caps: DeviceCaps, policy: Policy, ranking: Ranking | None = None,
                  exclude: tuple[tuple[str, str], ...] = ()) -> Decision:
    """``select`` memoised per (spec, caps, policy, ranking, exclude): a warm call pays a dictionary lookup."""
    return select(spec, caps, policy, ranking, exclude)
