"""Explain mode through the environment (in a fresh interpreter) and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import torch, dispatchattn as da
q = torch.randn(1, 2, 32, 16)
for _ in range(3):
    da.attention(q, q, q, is_causal=True)
da.attention(q, q, q, mask_mod=da.masks.sliding_window(4))
"""


def _run(args, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHATTN_")}
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("level,expected", [("0", 0), ("1", 2), ("2", 4)])
def test_explain_env_logs_distinct_decisions(level, expected):
    result = _run([sys.executable, "-c", SCRIPT], {"DISPATCHATTN_EXPLAIN": level})
    assert result.returncode == 0, result.stderr
    blocks = [line for line in result.stderr.splitlines() if line.startswith("dispatchattn: ")]
    assert len(blocks) == expected, result.stderr
    if expected:
        assert "Selected backend: sdpa" in result.stderr
        assert "flash:" in result.stderr and "xformers:" in result.stderr  # why every other backend did not


def test_explain_respects_user_logging_config():
    script = "import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n" + SCRIPT
    result = _run([sys.executable, "-c", script], {"DISPATCHATTN_EXPLAIN": "1"})
    assert result.returncode == 0, result.stderr
    assert "INFO:dispatchattn:dispatchattn: sdpa" in result.stdout


def test_backend_env_restricts_and_orders():
    script = SCRIPT + "print(da.explain(q, q, q).backend)"
    result = _run([sys.executable, "-c", script], {"DISPATCHATTN_BACKEND": "reference,sdpa"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


def test_cli_info():
    result = _run([sys.executable, "-m", "dispatchattn", "info"])
    assert result.returncode == 0, result.stderr
    for word in ("device: cpu", "torch", "triton", "sdpa", "usable", "flash", "no: "):
        assert word in result.stdout


def test_cli_explain_runs_the_call_and_prints_the_decision():
    result = _run([sys.executable, "-m", "dispatchattn", "explain", "--seq", "128", "--heads", "4", "--kv-heads", "2",
                   "--window", "16", "--causal", "--grad"])
    assert result.returncode == 0, result.stderr
    assert "dispatchattn: sdpa for q(1,4,128,64) kv(1,2,128,64,64)" in result.stdout
    assert "backward done" in result.stdout


def test_cli_explain_json():
    result = _run([sys.executable, "-m", "dispatchattn", "explain", "--seq", "64", "--softcap", "10", "--json"])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert data["backend"] == "reference"
    assert any(r["code"] == "score_mod_unsupported" for r in data["reasons"]["sdpa"])


def test_cli_matrix_and_bench():
    matrix = _run([sys.executable, "-m", "dispatchattn", "matrix"])
    assert matrix.returncode == 0, matrix.stderr
    assert "sm_90" in matrix.stdout and "gfx942" in matrix.stdout
    bench = _run([sys.executable, "-m", "dispatchattn", "bench", "--seq", "64", "--repeats", "3", "--causal"])
    assert bench.returncode == 0, bench.stderr
    data = json.loads(bench.stdout)
    assert data["backend"] == "sdpa" and data["ratio_vs_sdpa"] > 0 and data["baseline"] == "direct SDPA"


@pytest.mark.parametrize("problem, baseline", [
    (["--window", "16", "--causal"], "direct SDPA with a dense [1, 1, 64, 64] mask built once, outside the timing"),
    (["--alibi"], "direct SDPA with a dense [1, 8, 64, 64] mask built once, outside the timing"),
    (["--softcap", "20"], "SDPA has no equivalent of score_mod softcap_20.0"),
])
def test_cli_bench_compares_the_same_problem(capsys, problem, baseline):
    """The SDPA side of `bench` computes what the call computes (a masked call is not timed against plain SDPA)."""
    from dispatchattn.cli import main

    assert main(["bench", "--seq", "64", "--repeats", "2", *problem]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["baseline"] == baseline
    assert ("ratio_vs_sdpa" in data) is baseline.startswith("direct")


def test_console_script_entry_point_matches_module():
    from dispatchattn.cli import main

    assert main(["matrix", "--format", "text"]) == 0


@pytest.mark.parametrize("mask, score", [("window", None), (None, "alibi"), ("document", "alibi")])
def test_bench_baseline_computes_what_the_call_computes(mask, score):
    import dispatchattn as da
    from dispatchattn.cli import _sdpa_baseline

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=gen) for _ in range(3))
    masks = {"window": da.masks.sliding_window(7), "document": da.masks.document(torch.arange(40) // 13)}
    kwargs = dict(is_causal=True, dropout_p=0.0, enable_gqa=False, mask_mod=masks.get(mask), layout="bhsd",
                  score_mod=da.scores.alibi(torch.rand(4, generator=gen)) if score else None)
    baseline, _ = _sdpa_baseline(q, k, v, kwargs)
    want = da.attention(q, k, v, backend="reference", **{n: kwargs[n] for n in ("is_causal", "mask_mod", "score_mod")})
    torch.testing.assert_close(baseline(), want, atol=1e-6, rtol=0)  # fp32 vs fp32 math: 4.8e-7 max over 5 seeds
