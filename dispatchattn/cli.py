"""``python -m dispatchattn`` / ``dispatchattn``: info | explain | matrix | bench | aot | tune | selftest | defaults |
measured-space | rankings."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch
import torch.nn.functional as F

from .version import __version__

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
}

# Subcommands implemented next to the code they drive: name -> (module, add-parser fn, run fn).
_EXTERNAL = {
    "aot": ("dispatchattn.tools.aot_report", "add_aot_parser", "run_aot"),
    "tune": ("dispatchattn.tools.tune_backends", "add_tune_parser", "run_tune"),
    "rankings": ("dispatchattn.tools.shipped_rankings", "add_parser", "run"),
    "selftest": ("dispatchattn.tools.selftest", "add_selftest_parser", "run_selftest"),
    "defaults": ("dispatchattn.tools.defaults", "add_defaults_parser", "run_defaults"),
    "measured-space": ("dispatchattn.tools.measured_space", "add_measured_space_parser", "run_measured_space"),
}


def _local_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _add_problem_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--batch", type=int, default=1)
    add("--heads", type=int, default=8)
    add("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    add("--seq", type=int, default=1024)
    add("--kv-seq", type=int, default=None, help="default: --seq")
    add("--head-dim", type=int, default=64)
    add("--head-dim-v", type=int, default=None, help="value head dim; default: --head-dim")
    add("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    add("--layout", choices=["bhsd", "bshd"], default="bhsd")
    add("--causal", action="store_true", help="top-left causal (is_causal=True)")
    add("--causal-bottom-right", action="store_true")
    add("--window", type=int, default=None, help="sliding window of this many keys to the left")
    add("--prefix", type=int, default=None, help="prefix-LM with this prefix length")
    add("--documents", type=int, default=None, help="pack this many equal documents (document mask)")
    add("--softcap", type=float, default=None)
    add("--alibi", action="store_true")
    add("--dropout", type=float, default=0.0)
    add("--grad", action="store_true", help="inputs require grad (training)")
    add("--lse", action="store_true", help="return_lse=True")
    add("--backend", default=None, help="force one backend")


def _build_call(args, device: torch.device):
    """Random inputs and keyword arguments for the problem described on the command line."""
    import dispatchattn as da

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    heads_kv = args.kv_heads or args.heads
    seq_kv = args.kv_seq or args.seq
    dv = args.head_dim_v or args.head_dim

    def make(heads, seq, dim):
        shape = (args.batch, heads, seq, dim) if args.layout == "bhsd" else (args.batch, seq, heads, dim)
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=args.grad)

    q, k, v = (
        make(args.heads, args.seq, args.head_dim),
        make(heads_kv, seq_kv, args.head_dim),
        make(heads_kv, seq_kv, dv),
    )
    masks = []
    if args.causal_bottom_right:
        masks.append(da.masks.causal(bottom_right=True))
    if args.window is not None:
        masks.append(da.masks.sliding_window(args.window))
        if not args.causal:
            masks.append(da.masks.causal())
    if args.prefix is not None:
        masks.append(da.masks.prefix_lm(args.prefix))
    if args.documents:
        ids = torch.arange(seq_kv, device=device) * args.documents // seq_kv
        masks.append(da.masks.document(ids))
    mask_mod = None
    for m in masks:
        mask_mod = m if mask_mod is None else mask_mod & m
    score_mod = None
    if args.softcap is not None:
        score_mod = da.scores.softcap(args.softcap)
    elif args.alibi:
        slopes = 2.0 ** (-8.0 * torch.arange(1, args.heads + 1, device=device) / args.heads)
        score_mod = da.scores.alibi(slopes)
    kwargs = dict(
        is_causal=args.causal,
        dropout_p=args.dropout,
        enable_gqa=heads_kv != args.heads,
        mask_mod=mask_mod,
        score_mod=score_mod,
        layout=args.layout,
        return_lse=args.lse,
        backend=args.backend,
    )
    return (q, k, v), kwargs


def cmd_info(args) -> int:
    from . import capabilities
    from .backends import BACKEND_NAMES, get_backend
    from .spec import build_spec

    device = _local_device()
    caps = capabilities.probe(device)
    print(f"dispatchattn {__version__}")
    print(f"device: {caps.describe()}" + (f", {caps.total_memory / 2**30:.1f} GiB" if caps.total_memory else ""))
    if caps.arch_info:
        info = caps.arch_info
        print(
            f"arch: {info.name} ({info.flagship}): {info.smem_per_block // 1024} KiB shared memory per block, "
            f"warp {info.warp_size}, matrix instruction {info.matrix_instr}"
        )
    print(f"Triton interpreter (TRITON_INTERPRET=1): {'on' if caps.triton_interpret else 'off'}")
    print("libraries:")
    for name, version in caps.libraries.describe().items():
        print(f"  {name:<14} {version or 'not installed'}")
    dtype = torch.bfloat16 if caps.is_gpu else torch.float32
    q = torch.empty(1, 8, 1024, 64, device=device, dtype=dtype)
    spec = build_spec(q, q, q, is_causal=True)
    print(f"backends, for a causal {spec.summary()} call:")
    for name in BACKEND_NAMES:
        reasons = get_backend(name).why_not(spec, caps) or get_backend(name).measured_refusals(spec, caps)
        print(f"  {name:<12} " + ("usable" if not reasons else "no: " + "; ".join(reasons)))
    return 0


def cmd_explain(args) -> int:
    import dispatchattn as da

    device = _local_device()
    (q, k, v), kwargs = _build_call(args, device)
    decision = da.explain(q, k, v, **kwargs)
    out = da.attention(q, k, v, **kwargs)
    if args.grad:
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    if args.json:
        print(decision.to_json())
    else:
        print(decision)
        print(
            f"ran {decision.backend}: output {tuple((out[0] if isinstance(out, tuple) else out).shape)}"
            + (", backward done" if args.grad else "")
        )
    return 0


def cmd_matrix(args) -> int:
    from .matrix import render_matrix

    print(render_matrix(fmt=args.format))
    return 0


def _sdpa_baseline(q, k, v, kwargs: dict):
    """What a user would write with SDPA alone for the same problem: ``(callable, description)``, with a dense
    mask/bias built once from the masks and additive scores (outside the timing); ``(None, why)`` when SDPA
    cannot express the problem."""
    from .scores import Alibi

    score, mask = kwargs["score_mod"], kwargs["mask_mod"]
    if score is not None and not isinstance(score, Alibi):
        return None, f"SDPA has no equivalent of score_mod {score.__name__}"
    qs, ks, vs = ((t.transpose(1, 2) if kwargs["layout"] == "bshd" else t) for t in (q, k, v))
    extra = dict(dropout_p=kwargs["dropout_p"], enable_gqa=kwargs["enable_gqa"])
    if mask is None and score is None:
        return (lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=kwargs["is_causal"], **extra)), \
            "direct SDPA"
    # 4-D: SDPA's CPU kernels take a slow path for a 3-D mask (measured ~9x at (1, 8, 128, 64)).
    h = torch.arange(qs.shape[1], device=q.device).view(1, -1, 1, 1)
    i = torch.arange(qs.shape[2], device=q.device).view(1, 1, -1, 1)
    j = torch.arange(ks.shape[2], device=q.device).view(1, 1, 1, -1)
    keep = mask.bind(qs.shape[2], ks.shape[2])(0, h, i, j) if mask is not None else torch.ones((), dtype=torch.bool)
    if kwargs["is_causal"]:
        keep = keep & (i >= j)
    dense = keep
    if score is not None:
        zero = torch.zeros((), device=q.device)
        dense = score.bind(qs.shape[2], ks.shape[2])(zero, 0, h, i, j).to(q.dtype).masked_fill(~keep, float("-inf"))
    return (lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=dense, **extra)), \
        f"direct SDPA with a dense {list(dense.shape)} mask built once, outside the timing"


def cmd_bench(args) -> int:
    """Median time of ``da.attention`` vs direct SDPA on the same problem (this device)."""
    import dispatchattn as da

    from .timing import median_seconds

    device = _local_device()
    (q, k, v), kwargs = _build_call(args, device)
    decision = da.explain(q, k, v, **kwargs)
    ours = median_seconds(lambda: da.attention(q, k, v, **kwargs), repeats=args.repeats, device=device)
    result = {"device": str(device), "backend": decision.backend, "spec": decision.spec_summary, "dispatchattn_s": ours}
    baseline, what = _sdpa_baseline(q, k, v, kwargs)
    result["baseline"] = what
    if baseline is not None:
        try:
            ref = median_seconds(baseline, repeats=args.repeats, device=device)
            result.update(sdpa_s=ref, ratio_vs_sdpa=ours / ref)
        except RuntimeError as exc:
            result["sdpa_error"] = str(exc)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatchattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, arch, libraries, and which backends are usable").set_defaults(func=cmd_info)
    p = sub.add_parser("explain", help="run one call on the local device and print the decision")
    _add_problem_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("matrix", help="which backend and feature works on which arch (from the code's tables)")
    p.add_argument("--format", choices=["markdown", "text"], default="text")
    p.set_defaults(func=cmd_matrix)
    p = sub.add_parser("bench", help="time da.attention against direct SDPA on the local device")
    _add_problem_args(p)
    p.add_argument("--repeats", type=int, default=30)
    p.set_defaults(func=cmd_bench)
    for name, (module, add_name, run_name) in _EXTERNAL.items():
        try:
            mod = importlib.import_module(module)
            getattr(mod, add_name)(sub)
            sub.choices[name].set_defaults(func=getattr(mod, run_name))
        except (ImportError, AttributeError) as exc:
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda args, exc=exc, name=name: _unavailable(name, exc))
    return parser


def _unavailable(name: str, exc: BaseException) -> int:
    print(f"'{name}' is not available in this build: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
