"""Measuring backends on the device: each eligible backend timed on a problem, the ranking stored.

Used by ``decide`` on the first call of an unmeasured bucket under ``DISPATCHATTN_AUTOTUNE=1``, by
``python -m dispatchattn tune --backends`` and by ``bench/regret.py``.  Each backend runs on random inputs of the
call's shapes with its best known tile config: once untimed (its first call, which compiles: reported, not
ranked), then ``timer`` takes the median.  The forward alone, or forward + backward when the inputs require grad.
A backend that raises while being measured is ranked "failed" with the error's first line, never chosen over one
that ran.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from . import timing
from .backends import get_backend
from .backends.base import random_call
from .capabilities import DeviceCaps
from .failures import first_line
from .spec import AttentionSpec
from .tuning import rankings

logger = logging.getLogger("dispatchattn")

#: ``timer(backend name, fn, device) -> seconds per call of fn`` (tests inject a fake one).
Timer = Callable[[str, Callable[[], object], torch.device], float]
#: Samples per backend (after the untimed first call): the median of these is its time.
REPEATS = 10


def default_timer(name: str, fn: Callable[[], object], device: torch.device) -> float:
    return timing.median_seconds(fn, repeats=REPEATS, warmup=1, device=device)


def skip_reason(name: str, caps: DeviceCaps) -> str | None:
    """Why ``name`` is not timed here although it can run (None: it is timed)."""
    if name == "triton_flex" and caps.triton_interpret and not caps.is_gpu:
        return "runs through Triton's interpreter here (a test mode): its time says nothing"
    return None


def _runner(name: str, spec: AttentionSpec, caps: DeviceCaps, device: torch.device) -> Callable[[], object]:
    backend = get_backend(name)
    config = backend.tile_config(spec, caps) if backend.TUNABLE else None
    grad = spec.requires_grad or spec.mods_need_grad
    call = random_call(spec, device, requires_grad=grad)
    inputs = [call.query, call.key, call.value]
    grad_out = None

    def run() -> None:
        nonlocal grad_out
        with torch.set_grad_enabled(grad):
            out, _lse = backend.run(call, spec, config[0] if config else None)
            if grad:
                grad_out = torch.randn_like(out) if grad_out is None else grad_out
                torch.autograd.grad(out, inputs, grad_out)

    return run


def measure(spec: AttentionSpec, caps: DeviceCaps, names: Iterable[str], device: torch.device,
            timer: Timer | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[dict[str, float], dict[str, str], dict[str, float]]:
    """Time each of ``names`` on ``spec`` on ``device``: ({name: ms}, {name: why it failed}, {name: first call s})."""
    timer = timer or default_timer  # looked up per call (tests replace it)
    times, failed, first = {}, {}, {}
    for name in names:
        if skip_reason(name, caps) is not None:
            continue
        if progress is not None:
            progress(name)
        try:
            run = _runner(name, spec, caps, device)
            start = time.perf_counter()
            run()
            timing.sync(device)
            first[name] = time.perf_counter() - start
            times[name] = timer(name, run, device) * 1e3
        except Exception as error:  # noqa: BLE001 - a backend that cannot run here is ranked failed, not chosen
            failed[name] = f"{type(error).__name__}: {first_line(str(error))}"
    return times, failed, first


def measure_and_record(spec: AttentionSpec, caps: DeviceCaps, names: Iterable[str], device: torch.device,
                       timer: Timer | None = None) -> rankings.Ranking | None:
    """Measure ``names`` on ``spec`` and store the ranking (None when nothing could be timed)."""
    times, failed, first = measure(spec, caps, names, device, timer)
    if not times:
        return None
    ranking, status = rankings.record(spec, caps, times, failed, first)
    compile_s = sum(first.values())
    logger.info("dispatchattn measured %s: %s (first calls, compiling included, took %.1f s; %s)", ranking.bucket,
                ", ".join(f"{n} {t:.4g} ms" for n, t in ranking.times_ms), compile_s, status)
    return ranking
