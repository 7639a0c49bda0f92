"""Packed sequences: ``da.varlen_attention`` vs the same tokens as one row with a document mask, and vs padding.

    python bench/varlen.py [--device cuda] [--dtype bfloat16] [--seqs 8] [--mean-len 512] [--heads 16]
                           [--head-dim 128] [--causal] [--backward] [--json bench/results/varlen-<device>.json]

Three ways to run the same B sequences of random lengths (self-attention, equal q/k lengths):
- ``packed``: ``da.varlen_attention`` over (total, H, D) with cu_seqlens;
- ``document``: ``da.attention`` over (1, total, H, D) with ``da.masks.document(ids)`` (``& causal()``);
- ``padded``: ``da.attention`` over (B, max_len, H, D) with a boolean key-padding mask (and ``is_causal`` folded
  into it), the work a padded batch does.
Each row is the median of the warm calls (forward, or forward + backward with ``--backward``), the backend the
automatic choice ran, and the ratio to ``packed``.  On CPU the sizes must stay small (the reference and SDPA
materialise the scores); the figures are for checking the script, not claims.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch

import dispatchattn as da
from dispatchattn.timing import median_seconds


def _lengths(seqs: int, mean_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(max(1, mean_len // 2), mean_len * 3 // 2 + 1, (seqs,), generator=gen)).tolist()


def _cases(lengths, heads, head_dim, dtype, device, causal, grad):
    total, longest = sum(lengths), max(lengths)
    make = dict(dtype=dtype, device=device)
    q, k, v = (torch.randn(total, heads, head_dim, **make).requires_grad_(grad) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    document = da.masks.document(ids) & da.masks.causal() if causal else da.masks.document(ids)
    padded = [torch.zeros(len(lengths), longest, heads, head_dim, **make).requires_grad_(grad) for _ in range(3)]
    valid = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    keep = valid[:, None, None, :].expand(-1, 1, longest, -1)
    if causal:
        keep = keep & torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    keep = keep | ~valid[:, None, :, None]  # padded query rows keep every key (their output is ignored)
    return {
        "packed": lambda: da.varlen_attention(q, k, v, cu, cu, longest, longest, is_causal=causal),
        "document": lambda: da.attention(q[None], k[None], v[None], layout="bshd", mask_mod=document),
        "padded": lambda: da.attention(*padded, attn_mask=keep, layout="bshd"),
    }, {
        "packed": lambda: da.varlen.explain(q, k, v, cu, cu, longest, longest, is_causal=causal).backend,
        "document": lambda: da.explain(q[None], k[None], v[None], layout="bshd", mask_mod=document).backend,
        "padded": lambda: da.explain(*padded, attn_mask=keep, layout="bshd").backend,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--mean-len", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = _lengths(args.seqs, args.mean_len, args.seed)
    calls, backends = _cases(lengths, args.heads, args.head_dim, dtype, device, args.causal, args.backward)

    def timed(fn):
        if not args.backward:
            with torch.no_grad():
                return median_seconds(fn, repeats=args.repeats, device=device)
        return median_seconds(lambda: fn().sum().backward(), repeats=args.repeats, device=device)

    times = {name: timed(fn) for name, fn in calls.items()}
    print(f"{args.seqs} sequences, lengths {min(lengths)}..{max(lengths)} (total {sum(lengths)}), H={args.heads}, "
          f"D={args.head_dim}, {str(dtype).removeprefix('torch.')}, {device}, causal={args.causal}, "
          f"{'fwd+bwd' if args.backward else 'fwd'}")
    print(f"{'layout':<10} {'backend':<12} {'median ms':>10} {'x packed':>9}")
    rows = []
    for name, seconds in times.items():
        backend = backends[name]()
        ratio = seconds / times["packed"]
        print(f"{name:<10} {backend:<12} {seconds * 1e3:>10.3f} {ratio:>9.2f}")
        rows.append({"layout": name, "backend": backend, "median_ms": seconds * 1e3, "ratio_to_packed": ratio})
    if args.json:
        record = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(device)
                  if device.type == "cuda" else platform.processor() or platform.machine(),
                  "torch": torch.__version__, "dispatchattn": da.__version__, "lengths": lengths,
                  "args": vars(args), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
