"""``python -m dispatchattn tune --backends``: measure backend rankings on this device and store them.

Without shape options it measures a default grid: on a GPU the cases of the H200 table (causal, sliding window,
documents, softcap, ALiBi and plain at S 2k-8k, D 64/128, forward and forward + backward), the prefill and
decoding shapes of a Llama-3-8B-style model (32 query / 8 key-value heads, D 128), and decoding with ALiBi; on CPU
a small grid (float32, S 1k-4k, causal / sliding window / documents, forward).  With ``--seq`` (and the other
shape options of ``tune``) it measures that one problem.  Each problem's ranking goes to the user cache
(``tuning.rankings``), where every later call and process on this device finds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from .. import capabilities, masks, scores
from ..decide import exclusions
from ..measured import measure
from ..selector import Policy, UnsupportedError, select
from ..spec import AttentionSpec
from ..tuning import cli as tile_cli
from ..tuning import rankings


def add_tune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``tune`` with ``--backends`` added to the tile-config options."""
    parser = tile_cli.add_tune_parser(subparsers)
    parser.add_argument("--backends", action="store_true",
                        help="measure backend rankings (the problem of --seq/--mask/..., else a default grid)")
    parser.add_argument("--score", default="none", help="with --backends: none | softcap:N | alibi")
    parser.set_defaults(func=run_tune, seq=None)
    return parser


def run_tune(args: argparse.Namespace) -> int:
    if not args.backends:
        return tile_cli.run_tune(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        problems = [("command line", _command_line_spec(args, device))] if args.seq else list(grid(device))
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    rows = measure_problems(problems, capabilities.probe(device), device, progress=not args.no_progress)
    print(summary(rows))
    return 0 if all(times for _, _, _, times, _, _ in rows) else 1


def measure_problems(problems: list[tuple[str, AttentionSpec]], caps, device: torch.device,
                     progress: bool = True) -> list[tuple]:
    """Measure and store the ranking of each (name, spec): rows of (name, spec, rule's choice, times in ms,
    failures, store status)."""
    rows = []
    bar = tqdm(problems, desc="backend rankings", disable=not progress, file=sys.stderr)
    for name, spec in bar:
        try:  # the rule's decision: no ranking
            ruled = select(spec, caps, Policy(), None, exclusions(spec, caps))
        except UnsupportedError:
            rows.append((name, spec, "none", {}, {}, "no backend can run it here"))
            continue
        rule, eligible = ruled.backend, ruled.eligible
        times, failed, first = measure(spec, caps, eligible, device,
                                       progress=lambda backend, name=name: bar.set_postfix_str(f"{name}: {backend}"))
        status = rankings.record(spec, caps, times, failed, first)[1] if times else "nothing measured"
        rows.append((name, spec, rule, times, failed, status))
    return rows


def _command_line_spec(args: argparse.Namespace, device: torch.device) -> AttentionSpec:
    spec = tile_cli.spec_from_args(args, device)
    name, _, number = args.score.partition(":")
    if name == "none":
        return spec
    if name == "softcap" and number:
        score = scores.softcap(float(number))
    elif name == "alibi" and not number:
        score = scores.alibi(2.0 ** (-8.0 * torch.arange(1, spec.heads_q + 1, device=device) / spec.heads_q))
    else:
        raise ValueError(f"--score: expected none, softcap:N or alibi, got {args.score!r}")
    return dataclasses.replace(spec, score=score)


def _spec(device, dtype, batch, heads_q, heads_kv, seq_q, seq_kv, dim, mask=None, score=None, grad=False,
          is_causal=False) -> AttentionSpec:
    return AttentionSpec(batch=batch, heads_q=heads_q, heads_kv=heads_kv, seq_q=seq_q, seq_kv=seq_kv, head_dim=dim,
                         head_dim_v=dim, dtype=dtype, device_type=device.type, is_causal=is_causal, mask=mask,
                         score=score, enable_gqa=heads_q != heads_kv, requires_grad=grad)


def _case(name: str, seq: int, heads: int, device) -> tuple:
    """(mask, score, is_causal) of a grid case."""
    causal = masks.causal()
    if name == "causal":
        return None, None, True
    if name == "plain":
        return None, None, False
    if name == "sliding_window":
        return masks.sliding_window(min(1024, seq // 4)) & causal, None, False
    if name == "document":
        return masks.document(torch.arange(seq, device=device) * 8 // seq) & causal, None, False
    if name == "softcap":
        return causal, scores.softcap(30.0), False
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads)
    return causal, scores.alibi(slopes), False


def grid(device: torch.device) -> Iterator[tuple[str, AttentionSpec]]:
    """The default problems: (a name, its spec)."""
    if device.type == "cpu":
        for seq in (1024, 2048, 4096):
            for name in ("causal", "sliding_window", "document"):
                mask, score, is_causal = _case(name, seq, 8, device)
                yield f"{name} S={seq}", _spec(device, torch.float32, 1, 8, 8, seq, seq, 64, mask, score,
                                               is_causal=is_causal)
        return
    bf16 = torch.bfloat16
    for seq, dim, names in ((8192, 128, ("causal", "plain", "sliding_window", "document", "softcap", "alibi")),
                            (2048, 128, ("causal", "sliding_window", "softcap")),
                            (4096, 64, ("causal", "sliding_window"))):
        for name in names:
            for grad in (False, True):
                mask, score, is_causal = _case(name, seq, 16, device)
                yield (f"{name} S={seq} D={dim}{' fwd+bwd' if grad else ''}",
                       _spec(device, bf16, max(1, 16384 // seq), 16, 16, seq, seq, dim, mask, score, grad, is_causal))
    for seq in (4096, 8192):  # a Llama-3-8B-style prefill, training and inference
        for grad in (False, True):
            yield (f"llama prefill S={seq}{' fwd+bwd' if grad else ''}",
                   _spec(device, bf16, 1, 32, 8, seq, seq, 128, None, None, grad, True))
    for kv in (4096, 16384):  # decoding, plain and with ALiBi
        yield f"decode KV={kv}", _spec(device, bf16, 8, 32, 8, 1, kv, 128)
        alibi = _case("alibi", kv, 32, device)[1]
        yield f"decode alibi KV={kv}", _spec(device, bf16, 8, 32, 8, 1, kv, 128, None, alibi)


def summary(rows: list) -> str:
    """A table: each problem, each backend's time, the fastest and the rule's choice."""
    names = sorted({n for row in rows for n in row[3]} | {n for row in rows for n in row[4]})
    header = ["problem", *names, "fastest", "rule", "rule/fastest"]
    lines = [header]
    for problem, _, rule, times, failed, _status in rows:
        cells = [problem] + [f"{times[n]:.4g}" if n in times else ("failed" if n in failed else "-") for n in names]
        fastest = min(times, key=times.get) if times else "-"
        ratio = f"{times[rule] / times[fastest]:.2f}" if rule in times and fastest in times else "-"
        lines.append(cells + [fastest, rule, ratio])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in lines)
    stored = {row[5] for row in rows}
    return text + "\n(times in ms; " + "; ".join(sorted(stored)) + ")"
