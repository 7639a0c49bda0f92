"""Hugging Face transformers adapter: ``attn_implementation="dispatchattn"`` for any model using
``AttentionInterface``.

>>> from dispatchattn.integrations.transformers import register
>>> register()  # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="dispatchattn")  # doctest: +SKIP

Translation (exact, or refused):

- the mask: transformers builds it with the registered mask function, ``sdpa_mask`` (a boolean
  ``(B, 1, Sq, Sk)`` mask, True = attend) that already holds causality, padding, sliding windows
  (``sliding_window``) and packed-sequence boundaries (from ``position_ids``); it is passed as ``attn_mask``.
  Registering the attention function without a mask function would make transformers pass no mask at all,
  so ``register`` always registers both.
- no mask (transformers skipped it: plain causal, no padding): a causal mask, bottom-right aligned when
  ``Sq != Sk`` (decoding and chunked prefill against a KV cache), ``is_causal`` for ``Sq == Sk``; none when the
  module is not causal (encoders) or ``Sq == 1``.
- ``softcap`` -> ``da.scores.softcap``; ``scaling`` -> ``scale``; ``dropout`` -> ``dropout_p``;
  fewer key/value heads -> ``enable_gqa``.
- packed sequences with flash-attn's keyword arguments (``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` /
  ``max_length_k``, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` makes them) and one batch row:
  ``dispatchattn.varlen_attention`` (causal per sequence), unless a sliding window, active dropout or a paged
  ``block_table`` comes with them (then the mask above, which holds the same boundaries from ``position_ids``).
- refused with a ``ValueError``: ``output_attentions=True`` (no kernel returns the probabilities), attention
  sinks (``s_aux``/``sinks``), ALiBi or position biases passed as kwargs, a paged cache.

Returns ``(out, None)`` with ``out`` of shape ``(B, S, H, D)``, contiguous, as transformers expects.
"""

from __future__ import annotations

import torch

from .. import api, scores, varlen

__all__ = ["register", "attention_forward", "DEFAULT_NAME"]

DEFAULT_NAME = "dispatchattn"
#: Keyword arguments transformers may pass that change the result and that this adapter cannot compute exactly.
REFUSED = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "a position bias",
    "alibi_slopes": "ALiBi slopes",
    "cache": "a paged KV cache",
}


def _refuse(kwargs: dict) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError(
            "dispatchattn attention: output_attentions=True is not supported (no fused kernel returns the "
            "attention probabilities); load the model with attn_implementation='eager' to get them"
        )
    for name, what in REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"dispatchattn attention: {what} ({name}=...) cannot be computed exactly by dispatchattn; "
                "use attn_implementation='eager' (or 'sdpa') for this model"
            )


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature -> ``dispatchattn.attention``.  q, k, v are (B, H, S, D)."""
    _refuse(kwargs)
    seq_q, seq_kv = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap")
    score_mod = scores.softcap(float(softcap)) if softcap is not None else None
    dropout_p = dropout if module.training else 0.0
    if _packed(query, kwargs, dropout_p):
        out = varlen.varlen_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), _int32(kwargs["cu_seq_lens_q"]),
            _int32(kwargs["cu_seq_lens_k"]), kwargs["max_length_q"], kwargs["max_length_k"], is_causal=bool(causal),
            scale=scaling, enable_gqa=query.shape[1] != key.shape[1], score_mod=score_mod)
        return out.unsqueeze(0), None
    mask_mod = None
    causal_flag = False
    if attention_mask is not None:
        if attention_mask.dim() == 4 and attention_mask.shape[-1] != seq_kv:
            attention_mask = attention_mask[..., :seq_kv]
    elif causal and seq_q > 1:
        if seq_q == seq_kv:
            causal_flag = True
        else:
            from .. import masks

            mask_mod = masks.causal(bottom_right=True)
    out = api.attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout_p,
        is_causal=causal_flag, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        score_mod=score_mod, mask_mod=mask_mod,
    )
    return out.transpose(1, 2).contiguous(), None


def _packed(query: torch.Tensor, kwargs: dict, dropout_p: float) -> bool:
    """Whether transformers handed packed sequences in flash-attn's varlen form that ``varlen_attention`` computes
    exactly: one batch row, integer max lengths, no sliding window, no dropout, no paged cache."""
    varlen_kwargs = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if any(value is None for value in varlen_kwargs) or query.shape[0] != 1:
        return False
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in varlen_kwargs[2:]):
        return False
    return kwargs.get("sliding_window") is None and not dropout_p and kwargs.get("block_table") is None


def _int32(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)


def register(name: str = DEFAULT_NAME) -> str:
    """Register ``name`` as an ``attn_implementation``: the attention function and its mask function.

    Returns ``name``.  Needs transformers with ``AttentionInterface`` and ``AttentionMaskInterface``
    (``pip install dispatchattn[transformers]``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError(
            "dispatchattn.integrations.transformers.register: needs transformers with AttentionInterface and "
            f"AttentionMaskInterface (pip install 'dispatchattn[transformers]'): {error}"
        ) from error
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
