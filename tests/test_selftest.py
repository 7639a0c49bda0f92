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
