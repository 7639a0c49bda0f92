"""``python -m dispatchattn selftest``: usable backends against the float64 oracle, wrong answers and crashes
reported with a non-zero exit."""

from __future__ import annotations

import json

import torch.nn.functional as F

from dispatchattn.cli import main

REAL_SDPA = F.scaled_dot_product_attention


def _report(tmp_path, *args) -> tuple[int, dict]:
    path = tmp_path / "selftest.json"
    status = main(["selftest", "--quick", *args, "--json", str(path)])
    return status, json.loads(path.read_text())


def test_every_usable_backend_passes_on_cpu(tmp_path, capsys):
    status, report = _report(tmp_path, "--backends", "sdpa,triton_flex,flash")
    assert status == 0, capsys.readouterr().out
    ran = {(r["backend"], r["case"]) for r in report["rows"] if r["status"] == "ok"}
    assert ("triton_flex", "user_score_captured") in ran and ("triton_flex", "decode_alibi") in ran
    assert ("sdpa", "gqa_causal") in ran
    flash = [r for r in report["rows"] if r["backend"] == "flash"]
    assert flash and all(r["status"] == "skipped" and "cpu" in r["detail"] for r in flash)
    assert report["counts"]["wrong"] == report["counts"]["crashed"] == 0
    assert all(r["error"] <= r["tolerance"] for r in report["rows"] if r["status"] == "ok")


def test_a_wrong_answer_and_a_crash_fail_the_selftest(tmp_path, monkeypatch, capsys):
    calls = []

    def off_by_a_little(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        if q.shape[2] == 1:  # decoding: a crash inside the library
            raise RuntimeError("kernel went away")
        return REAL_SDPA(q, k, v, *args, **kwargs) * 1.001  # 0.1% off: far above fp32 rounding

    monkeypatch.setattr(F, "scaled_dot_product_attention", off_by_a_little)
    status, report = _report(tmp_path, "--backends", "sdpa")
    assert status == 1 and calls
    by_case = {r["case"]: r for r in report["rows"]}
    assert by_case["plain"]["status"] == "wrong" and by_case["plain"]["error"] > by_case["plain"]["tolerance"]
    assert by_case["decode_alibi"]["status"] == "crashed" and "kernel went away" in by_case["decode_alibi"]["detail"]
    assert "wrong" in capsys.readouterr().out


def test_selftest_then_measures_and_stores_the_ranking_grid(tmp_path, monkeypatch, capsys):
    import torch

    from dispatchattn import measured
    from dispatchattn.capabilities import probe
    from dispatchattn.tools import tune_backends
    from dispatchattn.tuning import rankings

    small = [(f"causal S={s}", tune_backends._spec(torch.device("cpu"), torch.float32, 1, 2, 2, s, s, 16,
                                                   is_causal=True)) for s in (64, 96)]
    monkeypatch.setattr(tune_backends, "grid", lambda device: iter(small))
    ms = {"sdpa": 2.0, "reference": 3.0, "torch_flex": 5.0}
    monkeypatch.setattr(measured, "default_timer", lambda name, fn, device: fn() or ms[name] / 1e3)
    status, report = _report(tmp_path, "--backends", "sdpa", "--rankings")
    assert status == 0, capsys.readouterr().out
    assert [r["problem"] for r in report["rankings"]] == ["causal S=64", "causal S=96"]
    assert report["rankings"][0]["times_ms"] == ms  # every backend that can run it (the fake timer's times)
    assert "stored in" in report["rankings"][0]["stored"]
    found = rankings.lookup(small[1][1], probe(torch.device("cpu")))
    assert found is not None and found.order() == ("sdpa", "reference", "torch_flex")
    assert "sdpa" in capsys.readouterr().out


def test_selftest_on_cpu_measures_no_rankings_unless_asked(tmp_path, capsys):
    status, report = _report(tmp_path, "--backends", "sdpa")
    assert status == 0 and report["rankings"] == []
    assert "backend rankings: not measured (--rankings" in capsys.readouterr().out
