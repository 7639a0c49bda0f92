"""``python -m dispatchattn tune``: time tile configs on this GPU and store the fastest; ``--show`` / ``--clear``.

Wired into ``dispatchattn/cli.py`` through ``add_tune_parser(subparsers)`` and ``run_tune(args)``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .. import capabilities, masks
from ..spec import AttentionSpec
from . import shipped, store
from .key import autotune_dir
from .lookup import clear_memo
from .measure import candidates_for, kernel_bench_fn, tune

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32}
DEFAULT_SEQ = 4096
NO_GPU = (
    "tune needs a CUDA or ROCm GPU: it times the Triton kernels on the device, and torch sees none here "
    "(torch.cuda.is_available() is False). Without tuning, tile configs come from the shipped defaults "
    "or the heuristic; `python -m dispatchattn tune --show` lists what is cached."
)


def add_tune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``tune`` sub-command to an ``argparse`` sub-parsers object; returns its parser."""
    parser = subparsers.add_parser("tune", help="time tile configs of the triton_flex kernels on this GPU")
    add = parser.add_argument
    add("--seq", type=int, default=None, help=f"query length (default {DEFAULT_SEQ})")
    add("--kv-seq", type=int, default=None, help="key/value length (default: --seq)")
    add("--head-dim", type=int, default=128)
    add("--head-dim-v", type=int, default=None, help="value head dim (default: --head-dim)")
    add("--dtype", choices=sorted(DTYPES), default="bf16")
    add("--mask", default="none", help="none | causal | window:N (causal, N keys back) | document:N (N-token docs)")
    add("--batch", type=int, default=1)
    add("--heads", type=int, default=16)
    add("--kv-heads", type=int, default=None, help="key/value heads for GQA (default: --heads)")
    add("--backward", action="store_true", help="tune the backward kernel too")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--export-defaults", action="store_true",
        help="also record the results as measured shipped defaults (tuning/defaults/<arch>.json)")
    add("--show", action="store_true", help="print the cached tile configs and exit")
    add("--clear", action="store_true", help="delete the cached tile configs and exit")
    parser.set_defaults(func=run_tune)
    return parser


def parse_mask(text: str, seq_kv: int, device: torch.device) -> masks.MaskMod | None:
    """``none`` / ``causal`` / ``window:N`` / ``document:N`` -> a ``da.masks`` object (None for none)."""
    name, _, number = text.partition(":")
    if name in ("none", "dense") and not number:
        return None
    if name == "causal" and not number:
        return masks.causal()
    if name in ("window", "document") and number.isdigit() and int(number) > 0:
        if name == "window":
            return masks.sliding_window(int(number)) & masks.causal()
        return masks.document(torch.arange(seq_kv, device=device) // int(number))
    raise ValueError(f"--mask: expected none, causal, window:N or document:N with N > 0, got {text!r}")


def spec_from_args(args: argparse.Namespace, device: torch.device) -> AttentionSpec:
    """The problem described by the command line, as the spec ``select_config`` will later see."""
    seq_q = args.seq or DEFAULT_SEQ
    seq_kv = args.kv_seq or seq_q
    heads_kv = args.kv_heads or args.heads
    return AttentionSpec(
        batch=args.batch, heads_q=args.heads, heads_kv=heads_kv, seq_q=seq_q, seq_kv=seq_kv,
        head_dim=args.head_dim, head_dim_v=args.head_dim_v or args.head_dim, dtype=DTYPES[args.dtype],
        device_type=device.type, mask=parse_mask(args.mask, seq_kv, device),
        enable_gqa=heads_kv != args.heads, requires_grad=args.backward,
    )


def run_tune(args: argparse.Namespace) -> int:
    """Run ``tune`` as parsed by ``add_tune_parser``; returns the exit status (2 without a GPU)."""
    if args.show:
        return show_cache()
    if args.clear:
        return clear_cache()
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        spec = spec_from_args(args, device)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    caps = capabilities.probe(device)
    status = 0
    for kernel in ("fwd", "bwd") if args.backward else ("fwd",):
        bench = kernel_bench_fn(kernel, spec, caps, device)
        result = tune(kernel, spec, caps, candidates_for(kernel, spec, caps), bench, not args.no_progress)
        print(result.table())
        for config, error in result.failures.items():
            print(f"  failed: {config.short()}: {error}")
        print(result.store_status or "nothing stored: every candidate failed")
        if args.export_defaults and result.succeeded:
            print(f"shipped default updated: {shipped.export_measured(result)}")
        status = status or (0 if result.succeeded else 1)
    clear_memo()
    return status


def _cache_files() -> list:
    root = autotune_dir()
    return sorted(root.glob("*/*.json")) if root.is_dir() else []


def show_cache() -> int:
    """Print every cached entry: key, config, time and speedup over the default."""
    files = _cache_files()
    if not files:
        print(f"no tuned tile configs under {autotune_dir()}")
    for path in files:
        loaded = store.load(path)
        print(f"{path}: {loaded.status}")
        for name, entry in sorted(loaded.entries.items()):
            print(f"  {name}: {_describe_entry(entry)}")
    return 0


def _describe_entry(entry) -> str:
    try:
        config = entry["config"]
        text = " ".join(f"{k}={v}" for k, v in config.items())
        seconds, default = entry.get("seconds"), entry.get("default_seconds")
        if seconds and default:
            text += f"  {seconds * 1e3:.4f} ms, {default / seconds:.2f}x over default"
        return text
    except (TypeError, KeyError, AttributeError):
        return json.dumps(entry)[:120]


def clear_cache() -> int:
    """Delete every cached tile-config file (under its lock)."""
    files = _cache_files()
    for path in files:
        print(store.remove(path))
    clear_memo()
    if not files:
        print(f"nothing to clear under {autotune_dir()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dispatchattn.tuning.cli tune ...`` (the same as ``python -m dispatchattn tune``)."""
    parser = argparse.ArgumentParser(prog="dispatchattn")
    add_tune_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_tune(args)


if __name__ == "__main__":
    raise SystemExit(main())
