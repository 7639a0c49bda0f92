"""``python -m dispatchattn selftest``: every usable backend on this device against a float64 oracle.

One command to trust an install (or a GPU CI runner): for each case of a catalogue (structured masks and scores,
user mods that capture tensors, GQA, decoding, odd lengths; head dims and dtypes for the device) and each backend
that can run it here, the forced call's output, lse and gradients are compared with the ``reference`` backend in
float64.  Tolerance, flash-attn's rule: at most twice the error of plain PyTorch math in the same dtype, plus a
small floor.  A table (ok / wrong / crashed, error against tolerance, time), a JSON report, and exit status 1 on
any wrong answer or crash.  On CPU it runs at small sizes (``triton_flex`` through Triton's interpreter when
``TRITON_INTERPRET=1`` was set).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import dispatchattn as da

from ..backends import BACKEND_NAMES
from ..capabilities import probe
from ..tuning.rankings import bucket

#: Added to twice the plain-math error: what rounding alone may add (fp32 / 16-bit dtypes).
FLOOR = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 4e-3}


@dataclass
class Case:
    name: str
    make: Callable  # (generator, dtype, device, head_dim) -> (q, k, v, kwargs)
    grad: bool = True


@dataclass
class Row:
    backend: str
    case: str
    dtype: str
    head_dim: int
    status: str  # ok | wrong | crashed | skipped
    error: float | None = None
    tolerance: float | None = None
    ms: float | None = None
    detail: str = ""


def _tensors(gen, dtype, device, shape_q, shape_kv, head_dim):
    def one(shape):
        return torch.randn(*shape, head_dim, generator=gen).to(device=device, dtype=dtype)

    return one(shape_q), one(shape_kv), one(shape_kv)


def _qkv(b, hq, hkv, sq, sk):
    return lambda gen, dtype, device, d: _tensors(gen, dtype, device, (b, hq, sq), (b, hkv, sk), d)


def catalogue(seq: int) -> list[Case]:
    """The cases, at ``seq`` keys (odd on purpose: partial tiles everywhere)."""
    plain = _qkv(1, 2, 2, seq, seq)

    def with_kwargs(make, kwargs_of):
        def build(gen, dtype, device, d):
            q, k, v = make(gen, dtype, device, d)
            return q, k, v, kwargs_of(gen, device)

        return build

    def user_mask(gen, device):
        sink = torch.rand(seq, generator=gen).to(device) < 0.1
        return {"mask_mod": lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | sink[kv_idx]}

    def user_score(gen, device):
        table = torch.randn(2, 17, generator=gen).to(device)
        return {"score_mod": lambda s, b, h, q_idx, kv_idx: s + table[h, (q_idx - kv_idx).clamp(-8, 8) + 8]}

    masks, scores = da.masks, da.scores
    return [
        Case("plain", with_kwargs(plain, lambda g, d: {})),
        Case("causal", with_kwargs(plain, lambda g, d: {"is_causal": True})),
        Case("sliding_window", with_kwargs(plain, lambda g, d: {
            "mask_mod": masks.sliding_window(24) & masks.causal()})),
        Case("prefix_lm", with_kwargs(plain, lambda g, d: {"mask_mod": masks.prefix_lm(seq // 4)})),
        Case("document", with_kwargs(plain, lambda g, d: {
            "mask_mod": masks.document((torch.arange(seq) * 3 // seq).to(d)) & masks.causal()})),
        Case("softcap", with_kwargs(plain, lambda g, d: {"score_mod": scores.softcap(20.0), "is_causal": True})),
        Case("alibi", with_kwargs(plain, lambda g, d: {"score_mod": scores.alibi(torch.rand(2, generator=g).to(d)),
                                                       "is_causal": True})),
        Case("relative_bias", with_kwargs(plain, lambda g, d: {
            "score_mod": scores.relative_bias(torch.randn(2, 2 * seq - 1, generator=g).to(d))})),
        Case("user_mask_captured", with_kwargs(plain, user_mask)),
        Case("user_score_captured", with_kwargs(plain, user_score)),
        Case("gqa_causal", with_kwargs(_qkv(2, 4, 2, seq, seq), lambda g, d: {"is_causal": True, "enable_gqa": True})),
        Case("odd_lengths", with_kwargs(_qkv(1, 2, 2, seq - 13, seq + 23), lambda g, d: {})),
        Case("decode_alibi", with_kwargs(_qkv(2, 4, 2, 1, seq), lambda g, d: {
            "score_mod": scores.alibi(torch.rand(4, generator=g).to(d)), "enable_gqa": True}), grad=False),
    ]


def _outputs(q, k, v, kwargs, backend, grad, dout_seed, lse=True):
    """(out, lse or None, grads or None) of one forced call; inputs are fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    if lse:
        out, lse = da.attention(*leaves, **kwargs, return_lse=True, backend=backend)
    else:
        out, lse = da.attention(*leaves, **kwargs, backend=backend), None
    grads = None
    if grad:
        gen = torch.Generator().manual_seed(dout_seed)
        dout = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
    return out, lse, grads


def _error(got, want) -> float:
    if not got.numel():
        return 0.0
    return float((got.detach().double() - want.detach().double()).abs().nan_to_num(posinf=1e30).max())


def _compare(result, oracle, plain) -> tuple[float, float]:
    """(largest error, its tolerance) over out, lse (finite rows) and grads."""
    worst_ratio, worst = -1.0, (0.0, 0.0)
    for got, want, base in _pairs(result, oracle, plain):
        error, tolerance = _error(got, want), 2 * _error(base, want) + FLOOR.get(got.dtype, 2e-5)
        if error / tolerance > worst_ratio:
            worst_ratio, worst = error / tolerance, (error, tolerance)
    return worst


def _pairs(result, oracle, plain):
    out, lse, grads = result
    yield out, oracle[0], plain[0]
    if lse is not None and oracle[1] is not None:
        finite = torch.isfinite(oracle[1])
        yield lse[finite].float(), oracle[1][finite], plain[1][finite].float()
    yield from zip(grads or (), oracle[2] or (), plain[2] or ())


def run_cases(device: torch.device, dtypes, head_dims, backends, seq: int, log=print) -> list[Row]:
    rows = []
    for case in catalogue(seq):
        for dtype in dtypes:
            for head_dim in head_dims:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{case.name} {dtype} {head_dim}".encode()))
                q, k, v, kwargs = case.make(gen, dtype, device, head_dim)
                wide = [t.double() for t in (q, k, v)]
                oracle = _outputs(*wide, kwargs, "reference", case.grad, 7)
                plain = _outputs(q, k, v, kwargs, "reference", case.grad, 7)
                for backend in backends:
                    row = _one(backend, case, q, k, v, kwargs, oracle, plain, dtype, head_dim)
                    rows.append(row)
                    if row.status != "skipped":
                        log(_line(row))
    return rows


def _one(backend, case, q, k, v, kwargs, oracle, plain, dtype, head_dim) -> Row:
    row = Row(backend, case.name, str(dtype).removeprefix("torch."), head_dim, "skipped")
    lse = True
    for lse in (True, False):  # with the lse when the backend returns it, else the output alone
        try:
            da.explain(q, k, v, **kwargs, return_lse=lse, backend=backend)
            break
        except da.UnsupportedError as refusal:
            reasons = refusal.decision.reasons.get(backend, []) if refusal.decision else []
            row.detail = "; ".join(str(r) for r in reasons)
    else:
        return row
    row.detail = "" if lse else "no lse from this backend"
    start = time.perf_counter()
    try:
        result = _outputs(q, k, v, kwargs, backend, case.grad, 7, lse)
        if q.is_cuda:
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - a crash is a result here
        row.status, row.detail = "crashed", f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return row
    row.ms = (time.perf_counter() - start) * 1e3
    row.error, row.tolerance = _compare(result, oracle, plain)
    row.status = "ok" if row.error <= row.tolerance else "wrong"
    return row


def _line(row: Row) -> str:
    numbers = f"{row.error:.2e} / {row.tolerance:.2e}" if row.error is not None else "-"
    time_text = f"{row.ms:8.1f} ms" if row.ms is not None else ""
    return (f"{row.status:8s} {row.backend:12s} {row.case:22s} {row.dtype:9s} d{row.head_dim:<4d} {numbers:21s} "
            f"{time_text} {row.detail}")


def add_selftest_parser(sub) -> None:
    p = sub.add_parser("selftest", help="every usable backend on this device against a float64 oracle")
    p.add_argument("--backends", default=",".join(n for n in BACKEND_NAMES if n != "reference"),
                   help="comma-separated backends to check (default: all but the oracle itself)")
    p.add_argument("--quick", action="store_true", help="one head dim and dtype, short sequences")
    p.add_argument("--seq", type=int, default=None, help="keys per case (default 77 on CPU, 333 on a GPU)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--rankings", action=argparse.BooleanOptionalAction, default=None,
                   help="then measure the backend rankings of the default grid and store them (default: on a GPU)")
    p.set_defaults(func=run_selftest)


def run_selftest(args) -> int:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = device.type == "cuda"
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = [name for name in backends if name not in BACKEND_NAMES]
    if unknown:
        print(f"--backends: expected names from {list(BACKEND_NAMES)}, got {unknown}", file=sys.stderr)
        return 2
    dtypes = [torch.bfloat16, torch.float16] if gpu else [torch.float32]
    head_dims = [64, 128, 256] if gpu else [32, 64]
    if args.quick:
        dtypes, head_dims = dtypes[:1], head_dims[:1]
    seq = args.seq or (333 if gpu else 77)
    caps = probe(device)
    print(f"dispatchattn selftest on {caps.describe()}: backends {backends}, dtypes "
          f"{[str(d).removeprefix('torch.') for d in dtypes]}, head dims {head_dims}, {seq} keys")
    start = time.perf_counter()
    rows = run_cases(device, dtypes, head_dims, backends, seq)
    counts = {status: sum(r.status == status for r in rows) for status in ("ok", "wrong", "crashed", "skipped")}
    print(f"{counts['ok']} ok, {counts['wrong']} wrong, {counts['crashed']} crashed, {counts['skipped']} skipped "
          f"(not runnable here) in {time.perf_counter() - start:.0f} s")
    ranked = []
    if args.rankings if args.rankings is not None else gpu:
        from .tune_backends import grid, measure_problems, summary

        problems = list(grid(device))
        ranked = measure_problems(problems[:4] if args.quick else problems, caps, device)
        print(summary(ranked))
    else:
        print("backend rankings: not measured (--rankings measures the default grid and stores it)")
    if args.json:
        report = {"device": caps.to_dict(), "python": platform.python_version(), "counts": counts,
                  "rows": [asdict(r) for r in rows],
                  "rankings": [{"problem": name, "bucket": bucket(spec), "rule": rule, "times_ms": times,
                                "failed": failed, "stored": status}
                               for name, spec, rule, times, failed, status in ranked]}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    return 1 if counts["wrong"] or counts["crashed"] else 0
