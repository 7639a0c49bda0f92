"""Shipped backend rankings from a committed benchmark result: ``python -m dispatchattn rankings --from FILE``.

Reads a per-backend timing file of ``bench/results/`` (rows of ``case``, ``seq``, ``head_dim``, ``forward_ms`` and
``backward_ms`` per backend, the device and versions it ran with) and writes ``tuning/rankings/<arch>.json``: for
every row whose problem has a bucket (the structured masks and scores; a user function's bucket is its own
fingerprint, which a result file does not carry), a forward ranking and, where the backward was timed, a
forward + backward one.  The file names its source, device, versions and date; ``tuning.rankings`` uses it on
every device of that architecture until the user measures their own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import masks, scores
from ..spec import AttentionSpec
from ..tuning import rankings, store

#: The H200 run's shapes (bench/flex.py): B*S = 16k tokens, 16 heads; decoding B=8, 32 query / 8 kv heads, Sq=1.
BATCH_TOKENS, HEADS = 16384, 16
DECODE = dict(batch=8, heads_q=32, heads_kv=8, seq_q=1)


def case_mods(case: str, heads: int) -> tuple | None:
    """(score, mask, is_causal) of a result row's case, or None when it has no shippable bucket."""
    if case.startswith("user "):
        return None
    score = None
    if "softcap" in case:
        score = scores.softcap(30.0)
    elif "alibi" in case:
        score = scores.alibi(2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads))
    if case.startswith("decode") or case == "plain":
        return score, None, False
    if "(is_causal)" in case:
        return score, None, True
    mask = masks.causal()
    if "sliding window" in case:
        mask = masks.sliding_window(int(case.split()[2])) & mask
    elif "document" in case:
        mask = masks.document(torch.zeros(8, dtype=torch.long)) & mask  # the kind counts, not the ids
    return score, mask, False


def row_spec(row: dict, requires_grad: bool) -> AttentionSpec | None:
    decoding = row["case"].startswith("decode")
    heads = DECODE["heads_q"] if decoding else HEADS
    mods = case_mods(row["case"], heads)
    if mods is None:
        return None
    score, mask, is_causal = mods
    if decoding:
        shape = dict(DECODE, seq_kv=int(row["case"].split("KV ")[1].split(",")[0]))
    else:
        seq = int(row["seq"])
        shape = dict(batch=max(1, BATCH_TOKENS // seq), heads_q=HEADS, heads_kv=HEADS, seq_q=seq, seq_kv=seq)
    dim = int(row["head_dim"])
    return AttentionSpec(**shape, head_dim=dim, head_dim_v=dim, dtype=torch.bfloat16, device_type="cuda",
                         is_causal=is_causal, mask=mask, score=score, enable_gqa=shape["heads_q"] != shape["heads_kv"],
                         requires_grad=requires_grad)


def entries(result: dict) -> dict[str, dict]:
    """The rankings of a result file, by bucket."""
    found = {}
    for row in result["rows"]:
        forward = {n: t for n, t in row["forward_ms"].items() if t is not None}
        backward = row.get("backward_ms") or {}
        total = {n: round(t + backward[n], 3) for n, t in forward.items() if backward.get(n) is not None}
        for times, grad in ((forward, False), (total, True)):
            spec = row_spec(row, grad)
            if spec is None or len(times) < 2:
                continue
            found[rankings.bucket(spec)] = {"times_ms": times, "failed": {}, "when": result["date"],
                                            "device": result["device"]["name"], "shape": spec.summary(),
                                            "case": row["case"]}
    return found


def write(result_path: Path, out_dir: Path = rankings.SHIPPED_DIR) -> Path:
    result = json.loads(result_path.read_text(encoding="utf-8"))
    document = store.empty_document({
        "device": {"vendor": "cuda", **result["device"]}, "versions": result["versions"], "date": result["date"],
        "source": f"bench/results/{result_path.name}: {result.get('source', '')}".strip(": "),
        "how": f"python -m dispatchattn rankings --from bench/results/{result_path.name}",
    })
    document.pop("tile_configs", None)
    document[rankings.SECTION] = entries(result)
    path = out_dir / f"{result['device']['arch']}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("rankings", help="write shipped backend rankings from a committed bench result")
    parser.add_argument("--from", dest="source", type=Path, required=True,
                        help="a per-backend result file of bench/results/ (e.g. the H200 run)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    path = write(args.source)
    print(f"wrote {len(json.loads(path.read_text())[rankings.SECTION])} rankings to {path}")
    return 0
