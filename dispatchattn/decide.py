"""From a call's spec to its Decision, the same for eager calls, compiled calls (at trace time) and fallbacks:

1. the launch failures recorded for this problem on this device (``failures.excluded_backends``) and the refusals
   measured ahead of time (``Backend.measured_refusals``: e.g. triton_flex kernels with no spill-free tile);
2. the measured ranking of its bucket (``tuning.rankings.lookup``: the user's, else a shipped one), or, under
   ``DISPATCHATTN_AUTOTUNE=1`` in an eager call, a measurement made now (``measured``);
3. ``selector.select``, a pure function of (spec, caps, policy, ranking, exclude);
4. then, for the chosen backend only, its tile config (user cache, shipped default or heuristic; may tune under
   ``DISPATCHATTN_AUTOTUNE=1``) and the notes it adds to the explanation.
"""

from __future__ import annotations

import dataclasses

import torch

from . import envs, failures, measured
from .backends import BACKEND_NAMES, get_backend
from .backends.base import Reason
from .capabilities import DeviceCaps
from .selector import Decision, Policy, select_cached
from .spec import AttentionSpec
from .tuning import rankings


def decide(spec: AttentionSpec, caps: DeviceCaps, policy: Policy, device: torch.device | None = None,
           may_measure: bool = True, exclude: tuple[tuple[str, str], ...] = ()) -> Decision:
    """The Decision for ``spec`` on ``caps`` under ``policy``, config and notes included.  Raises UnsupportedError.

    ``may_measure``: whether an unmeasured bucket may be measured now (``DISPATCHATTN_AUTOTUNE=1``, eager calls on
    ``device`` only: a compiled call decides while being traced, with the rankings already stored).  ``exclude``:
    (backend, why) pairs that must not run besides the recorded launch failures."""
    exclude = tuple(exclude) + exclusions(spec, caps)
    ranking = rankings.lookup(spec, caps) if policy.allowed is None else None
    decision = select_cached(spec, caps, policy, ranking, exclude)
    if (ranking is None and may_measure and device is not None and decision.decided_by == "rule"
            and len(decision.eligible) > 1 and envs.autotune_on_miss() and not torch.compiler.is_compiling()):
        ranking = measured.measure_and_record(spec, caps, decision.eligible, device)
        if ranking is not None:
            decision = select_cached(spec, caps, policy, ranking, exclude)
    return with_config(decision, spec, caps)


def exclusions(spec: AttentionSpec, caps: DeviceCaps) -> tuple[tuple[str, str | Reason], ...]:
    """(backend, why) for each backend that what is on disk rules out for ``spec`` on ``caps``: recorded launch
    failures, and refusals measured ahead of time (``Backend.measured_refusals``).  ``select``'s ``exclude``."""
    found = list(failures.excluded_backends(spec, caps, BACKEND_NAMES))
    for name in BACKEND_NAMES:
        found += [(name, reason) for reason in get_backend(name).measured_refusals(spec, caps)]
    return tuple(found)


def with_config(decision: Decision, spec: AttentionSpec, caps: DeviceCaps) -> Decision:
    """``decision`` with its backend's tile config (where tunable) and the notes that backend adds."""
    backend = get_backend(decision.backend)
    config = backend.tile_config(spec, caps) if backend.TUNABLE else None
    notes = tuple(backend.notes(spec, caps))
    if config is None and not notes:
        return decision
    return dataclasses.replace(decision, config=config[0] if config else None,
                               config_source=config[1] if config else None, notes=decision.notes + notes)
