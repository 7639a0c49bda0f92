"""A tiny random Llama twice, ours and transformers' SDPA with the same weights: the GPU tier's transformers
check, which the CPU suite also runs (tests/test_transformers.py) so that the recipe itself is tested.

Each model gets its own config: ``from_config(config, attn_implementation=...)`` writes the implementation into
the config object, so a second model built from the same object would switch the first one to SDPA too (its
layers read ``config._attn_implementation`` on every call), and the comparison would be SDPA against SDPA.
"""

from __future__ import annotations

import logging

import pytest
import torch


def _config(transformers):
    return transformers.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def layers_ran(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, device: str, dtype: torch.dtype,
               tol: float) -> list[str]:
    """Check the logits of ours against SDPA's on ``device`` in ``dtype``; return the backends the layers ran
    (from the explain log: one decision per distinct layer shape)."""
    transformers = pytest.importorskip("transformers")
    from dispatchattn.integrations.transformers import register

    monkeypatch.setenv("DISPATCHATTN_EXPLAIN", "1")
    name = register()
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(_config(transformers), attn_implementation=name)
    oracle = transformers.AutoModelForCausalLM.from_config(_config(transformers), attn_implementation="sdpa")
    oracle.load_state_dict(ours.state_dict())
    ours, oracle = (model.to(device, dtype).eval() for model in (ours, oracle))
    ids = torch.randint(1, 97, (2, 200), generator=torch.Generator().manual_seed(0)).to(device)
    with caplog.at_level(logging.INFO, logger="dispatchattn"), torch.no_grad():
        got, want = ours(ids).logits, oracle(ids).logits
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    messages = [r.getMessage() for r in caplog.records if r.name == "dispatchattn"]
    return sorted({m.split(" for ", 1)[0].removeprefix("dispatchattn: ") for m in messages})
