"""Benchmark the in-house Triton flex kernel against torch's FlexAttention, SDPA and FlashAttention.

    python bench/flex.py                 # GPU: S 1k..16k, D 64/128, bf16, forward and backward
    python bench/flex.py --dry-run       # CPU smoke run through Triton's interpreter, tiny sizes

TFLOP/s count only the unmasked work: 4 * B * H * Sq * Sk * D * density forward, 2.5x that backward,
where density is the exact fraction of (q, kv) pairs the mask keeps.  Ratios are triton_flex over each
other backend (time_other / time_triton_flex; > 1 means triton_flex is faster).  Targets (H100): forward
>= 1.10x torch_flex on the masked cases and >= 0.90x the best SDPA on plain causal; backward >= 1.0x
torch_flex; sliding-window speedup over causal >= 0.8x the density ratio; no S x S allocation at S=64k.
Results are printed and written as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU through Triton's interpreter")
    parser.add_argument("--seqs", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--batch-tokens", type=int, default=16384, help="batch = max(1, this // S)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--memory-seq", type=int, default=65536, help="peak-memory check length (GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dispatchattn as da  # noqa: E402
from dispatchattn.backends.triton_flex.autograd import triton_flex_attention  # noqa: E402
from dispatchattn.tuning.config import TileConfig  # noqa: E402


def _documents(seq: int, count: int, device) -> torch.Tensor:
    cuts = torch.linspace(0, seq, count + 1).round().long()
    ids = torch.zeros(seq, dtype=torch.int64)
    for index in range(count):
        ids[cuts[index]:cuts[index + 1]] = index
    return ids.to(device)


def case_mods(name: str, seq: int, heads: int, window: int, device) -> tuple:
    """(score_mod, mask_mod, density of kept pairs) of a benchmark case."""
    causal_density = (seq + 1) / (2 * seq)
    if name == "causal":
        return None, da.masks.causal(), causal_density
    if name == "sliding_window":
        kept = sum(min(i, window) + 1 for i in range(seq))
        return None, da.masks.sliding_window(window) & da.masks.causal(), kept / seq**2
    if name == "document":
        ids = _documents(seq, 8, device)
        lengths = torch.bincount(ids.cpu()).tolist()
        return None, da.masks.document(ids) & da.masks.causal(), sum(n * (n + 1) / 2 for n in lengths) / seq**2
    if name == "softcap":
        return da.scores.softcap(30.0), da.masks.causal(), causal_density
    if name == "alibi":
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads)
        return da.scores.alibi(slopes), da.masks.causal(), causal_density
    raise ValueError(f"case: expected one of causal, sliding_window, document, softcap, alibi; got {name!r}")


def timer(fn, gpu: bool) -> float:
    """Seconds per call: triton.testing.do_bench on a GPU, one timed call after a warm-up on CPU."""
    if gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e-3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def runners(name: str, q, k, v, score_mod, mask_mod, gpu: bool, config, window: int) -> dict:
    """backend -> forward closure (returning out) for every backend that can express the case."""
    scale = q.shape[-1] ** -0.5
    seq = q.shape[2]
    result = {"triton_flex": lambda: triton_flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                                           scale=scale, fwd_config=config, bwd_config=config)[0]}
    if name == "causal":
        result["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif score_mod is None and seq <= 8192:  # a dense bool mask: S x S bytes
        positions = torch.arange(seq, device=q.device)
        dense = mask_mod(0, 0, positions[:, None], positions[None, :])
        result["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if gpu:
        result.update(_gpu_only_runners(name, q, k, v, score_mod, mask_mod, window))
    return result


def _gpu_only_runners(name, q, k, v, score_mod, mask_mod, window: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    block = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device=q.device)
    result = {"torch_flex": lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block)}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return result
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    extra = {"causal": True}
    if name == "sliding_window":
        extra["window_size"] = (window, 0)
    elif name == "softcap":
        extra["softcap"] = score_mod.cap
    elif name == "alibi":
        extra["alibi_slopes"] = score_mod.slopes.float()  # flash adds -slope*|i-j|: ours under causal
    if name != "document":
        result["flash"] = lambda: flash_attn_func(qs, ks, vs, **extra)
    return result


def measure(fn, leaves: list, backward: bool, gpu: bool) -> float:
    """Forward: the call without autograd.  Backward: one forward, then timed gradient passes."""
    if not backward:
        with torch.no_grad():
            return timer(fn, gpu)
    out = fn()
    grad = torch.randn_like(out)
    return timer(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), gpu)


def bench_case(name, seq, dim, args, gpu, device, dtype) -> list[dict]:
    batch = max(1, args.batch_tokens // seq)
    gen = torch.Generator(device="cpu").manual_seed(seq + dim)
    q, k, v = (torch.randn(batch, args.heads, seq, dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    score_mod, mask_mod, density = case_mods(name, seq, args.heads, args.window, device)
    config = TileConfig(64, 64) if not gpu else None
    rows = []
    for direction in ("fwd",) if args.no_backward else ("fwd", "bwd"):
        flops = 4 * batch * args.heads * seq * seq * dim * density * (2.5 if direction == "bwd" else 1.0)
        row = {"case": name, "seq": seq, "head_dim": dim, "batch": batch, "heads": args.heads,
               "direction": direction, "density": density, "seconds": {}, "tflops": {}}
        for backend, fn in runners(name, q, k, v, score_mod, mask_mod, gpu, config, args.window).items():
            try:
                seconds = measure(fn, [q, k, v], direction == "bwd", gpu)
            except Exception as error:  # noqa: BLE001 - one failing backend must not stop the table
                row.setdefault("errors", {})[backend] = f"{type(error).__name__}: {error}"[:300]
                continue
            row["seconds"][backend] = seconds
            row["tflops"][backend] = flops / seconds / 1e12
        mine = row["seconds"].get("triton_flex")
        row["ratio"] = {b: s / mine for b, s in row["seconds"].items() if mine and b != "triton_flex"}
        rows.append(row)
    return rows


def peak_memory(seq: int, args, device, dtype) -> dict:
    """Peak memory of a sliding-window forward + backward at ``seq`` (GPU only)."""
    torch.cuda.reset_peak_memory_stats()
    q, k, v = (torch.randn(1, 4, seq, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = da.masks.sliding_window(args.window) & da.masks.causal()
    out, _ = triton_flex_attention(q, k, v, mask_mod=mask, scale=0.125)
    out.sum().backward()
    torch.cuda.synchronize()
    return {"seq": seq, "peak_bytes": torch.cuda.max_memory_allocated(), "s_by_s_bool_bytes": seq * seq * 4}


def print_table(rows: list[dict]) -> None:
    print("TFLOP/s count only unmasked (q, kv) pairs; ratio = other backend's time / triton_flex's time")
    header = f"{'case':15} {'S':>6} {'D':>4} {'dir':4} {'density':>8} {'triton_flex':>12}  ratios"
    print(header)
    for row in rows:
        mine = row["tflops"].get("triton_flex", float("nan"))
        ratios = "  ".join(f"vs {b} {r:.2f}x" for b, r in sorted(row["ratio"].items()))
        print(f"{row['case']:15} {row['seq']:>6} {row['head_dim']:>4} {row['direction']:4} {row['density']:>8.3f} "
              f"{mine:>9.3f} TF  ratio {ratios or 'n/a'}")


def window_speedups(rows: list[dict]) -> list[dict]:
    """Sliding window vs causal, same S/D/direction: measured speedup vs the density ratio (target 0.8x)."""
    found = []
    for row in rows:
        if row["case"] != "sliding_window" or "triton_flex" not in row["seconds"]:
            continue
        twin = next((r for r in rows if r["case"] == "causal" and all(
            r[f] == row[f] for f in ("seq", "head_dim", "direction"))), None)
        if twin and "triton_flex" in twin["seconds"]:
            speedup = twin["seconds"]["triton_flex"] / row["seconds"]["triton_flex"]
            ideal = twin["density"] / row["density"]
            found.append({"seq": row["seq"], "head_dim": row["head_dim"], "direction": row["direction"],
                          "speedup": speedup, "ideal": ideal, "fraction_of_ideal": speedup / ideal})
    return found


def main(args: argparse.Namespace) -> int:
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("no GPU: run with --dry-run for the CPU smoke mode (Triton's interpreter, tiny sizes)")
        return 2
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    seqs, dims = (args.seqs, args.head_dims) if gpu else ([96], [32])
    if not gpu:  # the interpreter: one sequence of two heads
        args.batch_tokens, args.heads = 96, 2
    args.window = 1024 if gpu else 24
    cases = args.cases or (["causal", "sliding_window", "document", "softcap", "alibi"] if gpu
                           else ["causal", "sliding_window"])
    rows = [row for name in cases for seq in seqs for dim in dims
            for row in bench_case(name, seq, dim, args, gpu, device, dtype)]
    print_table(rows)
    speedups = window_speedups(rows)
    for s in speedups:
        print(f"sliding window speedup over causal S={s['seq']} D={s['head_dim']} {s['direction']}: "
              f"{s['speedup']:.2f}x of an ideal {s['ideal']:.2f}x ({s['fraction_of_ideal']:.0%}; target 80%)")
    memory = peak_memory(args.memory_seq, args, device, dtype) if gpu else None
    if memory:
        print(f"peak memory at S={memory['seq']}: {memory['peak_bytes'] / 2**30:.2f} GiB "
              f"(an S x S fp32 score matrix alone would be {memory['s_by_s_bool_bytes'] / 2**30:.1f} GiB)")
    return _write(args, rows, speedups, memory, device, dtype)


def _write(args, rows, speedups, memory, device, dtype) -> int:
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    record = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype),
              "dry_run": bool(args.dry_run), "flops": "unmasked pairs only; backward = 2.5x forward",
              "rows": rows, "window_speedups": speedups, "peak_memory": memory}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in name.lower())
    path = args.out / f"flex_{slug}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
