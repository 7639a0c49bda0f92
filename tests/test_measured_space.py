"""The autotune space of RDNA3 (gfx1100) comes from ahead-of-time compiles, not from the resource estimate.

The committed verdicts (``tuning/measured_space/gfx1100.json``) are read by ``config_space``; the slow
cases recompile every candidate and compare with them (``test_config_space_is_pruned_to_configs_that_fit`` in
``test_aot_kernels.py`` compiles the resulting D=128 space).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dispatchattn.tools import measured_space as measuring
from dispatchattn.tuning import measured_space
from dispatchattn.tuning.config import TileConfig
from dispatchattn.tuning.space import config_space, estimate_resources


@pytest.mark.parametrize("kernel, head_dim", list(itertools.product(measuring.LAUNCHES, measured_space.HEAD_DIMS)))
def test_every_candidate_has_a_verdict_and_the_space_is_what_fits(kernel, head_dim):
    verdicts = measured_space.verdicts(kernel, "gfx1100", torch.bfloat16, head_dim)
    assert set(verdicts) == set(measuring.candidates(kernel))
    fitting = sorted(config for config, rejected in verdicts.items() if rejected is None)
    for dtype in measured_space.SIXTEEN_BIT:
        assert config_space(kernel, "gfx1100", dtype, head_dim) == fitting
    for rejected in verdicts.values():  # a rejection says what and where, as the compiler reported it
        assert rejected is None or "gfx1100" in rejected, rejected


def test_measured_facts_the_estimate_cannot_predict():
    """The cases that made the estimate unusable on RDNA3 (Triton 3.9, bf16): the space keeps what compiled
    without a spill, even where the estimate says otherwise, and drops what spilled."""
    fwd_256 = measured_space.verdicts("fwd", "gfx1100", torch.bfloat16, 256)
    assert fwd_256[TileConfig(16, 32, 16, 1)] is None and "spills" in fwd_256[TileConfig(16, 16, 16, 1)]
    small, large = (estimate_resources("fwd", TileConfig(16, s, 16, 1), torch.bfloat16, 256, 256, 32, "rocm")
                    for s in (16, 32))
    assert small.registers < large.registers  # the estimate ranks them the other way round
    bwd_128 = measured_space.verdicts("bwd", "gfx1100", torch.bfloat16, 128)
    assert [c for c, rejected in bwd_128.items() if rejected is None] == [TileConfig(16, 16, 8, 1)]
    assert config_space("bwd", "gfx1100", torch.bfloat16, 256) == []  # every backward tile spills at D=256


def test_other_targets_and_fp32_keep_the_estimate():
    assert measured_space.verdicts("fwd", "gfx1100", torch.float32, 128) is None
    assert measured_space.verdicts("fwd", "gfx942", torch.bfloat16, 128) is None
    assert measured_space.verdicts("fwd", "gfx1100", torch.bfloat16, 512) is None  # a head dim not measured
    fp32 = config_space("fwd", "gfx1100", torch.float32, 128)
    assert fp32 and not set(fp32) <= set(measuring.candidates("fwd"))  # the ROCm candidates, estimated
    head_dim_96 = config_space("fwd", "gfx1100", torch.float16, 96)  # padded to the measured D=128
    assert head_dim_96 == config_space("fwd", "gfx1100", torch.float16, 128)


@pytest.mark.slow
def test_committed_verdicts_are_what_a_fresh_compile_gives():
    pytest.importorskip("triton")
    fresh = measuring.measure("gfx1100")
    committed = measured_space.load("gfx1100")
    assert fresh["triton"] == committed["triton"], "regenerate with python -m dispatchattn measured-space --write"
    assert fresh["verdicts"] == committed["verdicts"]
