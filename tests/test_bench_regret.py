"""bench/regret.py runs on CPU and records, per problem, every forced backend's time and each mode's choice and
regret (the figures themselves come from a quiet run of the script, not from CI)."""

from __future__ import annotations

import json

import bench_scripts
import pytest
import torch


@pytest.fixture(scope="module")
def regret():
    return bench_scripts.load("regret")


def test_a_small_grid_records_times_choices_and_regret(regret, tmp_path, monkeypatch, capsys):
    from dispatchattn.tools import tune_backends

    cpu = torch.device("cpu")
    small = [("causal S=64", tune_backends._spec(cpu, torch.float32, 1, 2, 2, 64, 64, 16, is_causal=True)),
             ("window S=96", tune_backends._spec(cpu, torch.float32, 1, 2, 2, 96, 96, 16,
                                                 mask=tune_backends._case("sliding_window", 96, 2, cpu)[0]))]
    monkeypatch.setattr(regret, "grid", lambda device: iter(small))
    out = tmp_path / "regret.json"
    assert regret.main(["--quick", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["problem"] for r in result["rows"]][:2] == ["causal S=64", "window S=96"]
    for row in result["rows"]:
        assert {"sdpa", "reference"} <= set(row["times_ms"]) and row["fastest"] in row["times_ms"]
        for mode in ("rule", "measured"):
            assert row[f"auto_{mode}"] in row["times_ms"] and row[f"regret_{mode}"] >= 1.0
    assert set(result["summary"]) == {"rule", "measured"} and result["device"]["vendor"] == "cpu"
    assert "measured: median regret" in capsys.readouterr().out
