"""The catalogue of attention variants every backend is checked on: name -> kwargs for da.attention.

Each builder takes (batch, heads_q, seq_q, seq_kv, generator) and returns fresh random structure
(tables, slopes, document ids, dense masks) so no test runs on constants.
"""

from __future__ import annotations

import torch

import dispatchattn as da


def _documents(seq: int, gen: torch.Generator) -> torch.Tensor:
    cuts = torch.sort(torch.randperm(seq - 1, generator=gen)[:3] + 1).values
    ids = torch.zeros(seq, dtype=torch.int64)
    for c in cuts:
        ids[c:] += 1
    return ids


def _slopes(heads: int) -> torch.Tensor:
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float32) / heads)


CASES = {
    "plain": lambda b, h, sq, sk, g: {},
    "is_causal": lambda b, h, sq, sk, g: {"is_causal": True},
    "causal": lambda b, h, sq, sk, g: {"mask_mod": da.masks.causal()},
    "causal_bottom_right": lambda b, h, sq, sk, g: {"mask_mod": da.masks.causal(bottom_right=True)},
    "sliding_window": lambda b, h, sq, sk, g: {"mask_mod": da.masks.sliding_window(13) & da.masks.causal()},
    "window_two_sided": lambda b, h, sq, sk, g: {"mask_mod": da.masks.sliding_window(9, 5)},
    "prefix_lm": lambda b, h, sq, sk, g: {"mask_mod": da.masks.prefix_lm(20)},
    "document_causal": lambda b, h, sq, sk, g: {
        "mask_mod": da.masks.document(_documents(sk, g)) & da.masks.causal()},
    "softcap": lambda b, h, sq, sk, g: {"score_mod": da.scores.softcap(2.5)},
    "alibi_causal": lambda b, h, sq, sk, g: {"score_mod": da.scores.alibi(_slopes(h)), "is_causal": True},
    "relative_bias": lambda b, h, sq, sk, g: {
        "score_mod": da.scores.relative_bias(torch.randn(h, sq + sk - 1, generator=g))},
    "lambda_score_table": lambda b, h, sq, sk, g: _lambda_table(h, g),
    "lambda_mask_dilated": lambda b, h, sq, sk, g: {
        "mask_mod": lambda b_, h_, q, kv: (q >= kv) & ((q - kv) % 3 == 0)},
    "dense_bool": lambda b, h, sq, sk, g: {"attn_mask": torch.rand(b, 1, sq, sk, generator=g) > 0.3},
    "dense_float": lambda b, h, sq, sk, g: {"attn_mask": torch.randn(1, h, sq, sk, generator=g)},
}


def _lambda_table(heads: int, gen: torch.Generator) -> dict:
    table = torch.randn(heads, 16, generator=gen)

    def bucketed_bias(score, b, h, q_idx, kv_idx):
        bucket = torch.clamp((q_idx - kv_idx).abs(), max=15)
        return score + table[h, bucket]

    return {"score_mod": bucketed_bias}
