"""Measured dispatch: problem buckets, the rankings store, ranking -> decision, measuring on first use
(``DISPATCHATTN_AUTOTUNE=1``) with a fake timer, the shipped sm_90 ranking, ``tune --backends`` and compiled calls."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import dispatchattn as da
from dispatchattn import api, measured
from dispatchattn.capabilities import DeviceCaps, Libraries, installed_libraries, pretend
from dispatchattn.selector import Policy, select
from dispatchattn.spec import build_spec
from dispatchattn.tuning import rankings, store
from dispatchattn.tuning.rankings import Ranking, bucket

CPU = DeviceCaps.synthetic("cpu")
LIBS = installed_libraries()
H100 = DeviceCaps.synthetic("sm_90", libraries=Libraries(torch=LIBS.torch, triton=LIBS.triton))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path / "cache"))
    rankings.clear_memory()
    return tmp_path / "cache"


def _qkv(seq=64, heads=2, dim=16, grad=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seq + heads + dim)
    return [torch.randn(1, heads, seq, dim, generator=gen, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def _spec(**kwargs):
    q, k, v = _qkv(grad=kwargs.pop("grad", False))
    return build_spec(q, k, v, **kwargs)


# --- buckets -----------------------------------------------------------------------------------------------------


def test_a_bucket_names_every_axis():
    key = bucket(_spec(mask_mod=da.masks.sliding_window(8) & da.masks.causal(), score_mod=da.scores.softcap(5.0)))
    assert key == "float32 d16/16 gqa1 mask=causal & sliding_window score=softcap q64 k64 prefill fwd"
    assert bucket(_spec(is_causal=True, grad=True)).endswith("mask=causal score=- q64 k64 prefill fwd+bwd")
    q = torch.randn(2, 8, 3, 16)
    kv = torch.randn(2, 2, 1000, 16)
    assert bucket(build_spec(q, kv, kv, enable_gqa=True)) == "float32 d16/16 gqa4 mask=- score=- q16 k1024 decode fwd"


def test_causal_as_a_flag_or_a_mask_is_one_bucket_and_and_is_commutative():
    causal, window = da.masks.causal(), da.masks.sliding_window(8)
    assert bucket(_spec(is_causal=True)) == bucket(_spec(mask_mod=causal))
    assert bucket(_spec(mask_mod=window & causal)) == bucket(_spec(mask_mod=causal & window))


def test_user_functions_are_bucketed_by_what_their_kernel_depends_on():
    def make(width):
        def near(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= width
        return near

    def far(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() > 4

    same = bucket(_spec(mask_mod=make(4)))
    assert same == bucket(_spec(mask_mod=make(4)))  # another closure, same code and value
    assert same != bucket(_spec(mask_mod=make(5)))  # a captured number is compiled into the kernel
    assert same != bucket(_spec(mask_mod=far))
    assert "mask=fn:near#" in same


# --- ranking -> decision (pure) ------------------------------------------------------------------------------------


def _ranking(spec, times, failed=(), source=rankings.USER):
    return Ranking(bucket(spec), tuple(sorted(times.items(), key=lambda item: item[1])), tuple(failed), source,
                   "/some/rankings.json", "2026-12-04T00:00:00+00:00", "test device")


def test_the_fastest_measured_eligible_backend_runs_and_the_decision_says_so():
    spec = _spec(mask_mod=da.masks.sliding_window(8) & da.masks.causal())
    ranking = _ranking(spec, {"sdpa": 2.0, "reference": 1.0, "torch_flex": 3.0, "flash": 0.1})  # flash cannot run
    decision = select(spec, CPU, Policy(), ranking)
    assert decision.backend == "reference" and decision.decided_by == "measurement"
    assert decision.eligible == ("reference", "sdpa", "torch_flex")
    assert decision.lost["sdpa"] == "could run; measured 2 ms, 2.00x the time of reference"
    assert "fastest measured: reference 1 ms (user cache ranking measured on test device" in decision.rationale
    assert decision.ranking["times_ms"] == {"reference": 1.0, "sdpa": 2.0, "torch_flex": 3.0, "flash": 0.1}
    assert json.loads(decision.to_json())["ranking"]["source"] == "user cache"
    text = str(decision)
    assert "decided by measurement" in text and "sdpa: could run; measured 2 ms" in text


def test_a_ranking_orders_only_what_it_measured_and_failed_backends_go_last():
    spec = _spec(mask_mod=da.masks.sliding_window(8) & da.masks.causal())
    rule = select(spec, CPU, Policy())
    assert rule.eligible == ("sdpa", "reference", "torch_flex") and rule.ranking is None
    assert "not measured: DISPATCHATTN_AUTOTUNE=1" in str(rule)
    partial = select(spec, CPU, Policy(), _ranking(spec, {"torch_flex": 1.0, "reference": 2.0}))
    assert partial.eligible == ("sdpa", "torch_flex", "reference")  # sdpa was not measured: it keeps its place
    assert partial.decided_by == "rule" and "sdpa was not measured" in partial.rationale
    failed = select(spec, CPU, Policy(), _ranking(spec, {"torch_flex": 1.0, "reference": 2.0},
                                                  [("sdpa", "RuntimeError: boom")]))
    assert failed.eligible == ("torch_flex", "reference", "sdpa") and failed.backend == "torch_flex"
    assert failed.lost["sdpa"] == "could run, but failed while being measured: RuntimeError: boom"


def test_the_users_order_wins_over_a_ranking():
    spec = _spec(is_causal=True)
    ranking = _ranking(spec, {"reference": 1.0, "sdpa": 2.0})
    decision = select(spec, CPU, Policy(("sdpa", "reference"), "use_backends"), ranking)
    assert decision.backend == "sdpa" and decision.decided_by == "user" and decision.ranking is None


# --- the store -----------------------------------------------------------------------------------------------------


def test_a_recorded_ranking_is_read_back_by_the_next_process(_cache_dir):
    spec = _spec(is_causal=True)
    ranking, status = rankings.record(spec, CPU, {"sdpa": 2.5, "reference": 1.5}, {}, {"sdpa": 0.1})
    assert status.startswith("stored in") and ranking.order() == ("reference", "sdpa")
    rankings.clear_memory()  # a new process: only the file
    found = rankings.lookup(spec, CPU)
    assert found is not None and found.order() == ("reference", "sdpa") and found.source == rankings.USER
    assert found.where == str(_cache_dir / "autotune" / "cpu-cpu" / "rankings.json")
    document = json.loads(found_path(found).read_text())
    assert document["versions"]["torch"] == str(LIBS.torch) and "dispatchattn" in document["versions"]
    assert rankings.lookup(_spec(), CPU) is None  # another bucket


def found_path(ranking):
    from pathlib import Path

    return Path(ranking.where)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign versions", "bad entry"])
def test_a_damaged_or_stale_file_reads_as_unmeasured(_cache_dir, damage):
    spec = _spec(is_causal=True)
    ranking, _ = rankings.record(spec, CPU, {"sdpa": 2.5, "reference": 1.5}, {}, {})
    path = found_path(ranking)
    document = json.loads(path.read_text())
    if damage == "corrupt":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    elif damage == "foreign versions":  # another torch: every ranking in the file is void
        document["versions"]["torch"] = "2.0.0"
        path.write_text(json.dumps(document))
    else:
        document[rankings.SECTION][bucket(spec)]["times_ms"] = "fast"
        path.write_text(json.dumps(document))
    rankings.clear_memory()
    assert rankings.lookup(spec, CPU) is None
    assert da.explain(*_qkv(), is_causal=True).decided_by == "rule"  # the call decides by rule, nothing raises
    again, status = rankings.record(spec, CPU, {"sdpa": 1.0, "reference": 2.0}, {}, {})  # replaced on next write
    rankings.clear_memory()
    assert status.startswith("stored in") and rankings.lookup(spec, CPU).order() == ("sdpa", "reference")


def test_an_unwritable_cache_keeps_the_ranking_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(blocker))
    spec = _spec(is_causal=True)
    _, status = rankings.record(spec, CPU, {"sdpa": 2.0, "reference": 1.0}, {}, {})
    assert "unwritable" in status and "memory" in status
    assert rankings.lookup(spec, CPU).order() == ("reference", "sdpa")


def test_concurrent_writers_keep_every_ranking(_cache_dir):
    specs = [_spec(is_causal=True), _spec(), _spec(grad=True), _spec(mask_mod=da.masks.sliding_window(4))]
    threads = [threading.Thread(target=rankings.record, args=(s, CPU, {"sdpa": 1.0 + i}, {}, {}))
               for i, s in enumerate(specs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    path = _cache_dir / "autotune" / "cpu-cpu" / "rankings.json"
    assert set(json.loads(path.read_text())[rankings.SECTION]) == {bucket(s) for s in specs}
    assert store.load(path, store.device_header(CPU), rankings.SECTION).healthy


# --- measuring on first use ----------------------------------------------------------------------------------------


class FakeTimer:
    """Milliseconds per backend, and the calls made (the function really runs once per timing)."""

    def __init__(self, ms: dict[str, float]):
        self.ms, self.calls = ms, []

    def __call__(self, name, fn, device):
        fn()
        self.calls.append(name)
        return self.ms[name] / 1e3


def test_autotune_measures_an_unmeasured_bucket_once_and_runs_the_fastest(monkeypatch, caplog):
    timer = FakeTimer({"sdpa": 3.0, "reference": 1.0, "torch_flex": 2.0})
    monkeypatch.setattr(measured, "default_timer", timer)
    monkeypatch.setenv("DISPATCHATTN_AUTOTUNE", "1")
    q, k, v = _qkv()
    mask = da.masks.sliding_window(8) & da.masks.causal()
    expected = _oracle(q, k, v, mask)
    with caplog.at_level("INFO", logger="dispatchattn"):
        out = da.attention(q, k, v, mask_mod=mask)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)
    assert sorted(timer.calls) == ["reference", "sdpa", "torch_flex"]
    assert "dispatchattn measured float32 d16/16" in caplog.text
    decision = da.explain(q, k, v, mask_mod=mask)
    assert decision.backend == "reference" and decision.decided_by == "measurement"
    assert decision.ranking["first_call_s"].keys() == {"sdpa", "reference", "torch_flex"}
    api.clear_memo()
    da.attention(q, k, v, mask_mod=mask)
    assert len(timer.calls) == 3  # measured once: later calls (and processes) read the ranking


def _oracle(q, k, v, mask):
    q, k, v = (t.detach().double() for t in (q, k, v))
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    keep = mask(0, 0, i, j)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_autotune_measures_forward_and_backward_when_inputs_require_grad(monkeypatch):
    runs = []
    monkeypatch.setattr(measured, "default_timer", lambda name, fn, device: runs.append(name) or fn() or 1e-3)
    # (``fn()`` returns None: the timer sees no tensor)
    monkeypatch.setenv("DISPATCHATTN_AUTOTUNE", "1")
    q, k, v = _qkv(grad=True)
    out = da.attention(q, k, v, is_causal=True)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    decision = da.explain(q, k, v, is_causal=True)
    assert decision.decided_by == "measurement" and decision.ranking["bucket"].endswith("fwd+bwd")
    assert set(runs) == {"sdpa", "reference"}  # torch_flex has no backward on CPU: not eligible


def test_a_backend_that_fails_while_measured_is_ranked_failed_not_chosen(monkeypatch):
    from dispatchattn.backends import get_backend

    sdpa = get_backend("sdpa")

    def broken(call, spec, config=None):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(sdpa, "run", broken)
    monkeypatch.setattr(measured, "default_timer", FakeTimer({"reference": 2.0, "torch_flex": 1.5}))
    monkeypatch.setenv("DISPATCHATTN_AUTOTUNE", "1")
    spec = _spec(mask_mod=da.masks.sliding_window(8) & da.masks.causal())
    times, failed, _ = measured.measure(spec, CPU, ["sdpa", "reference"], torch.device("cpu"))
    assert times == {"reference": 2.0} and failed == {"sdpa": "RuntimeError: No available kernel. Aborting execution."}
    rankings.record(spec, CPU, times, failed, {})
    decision = select(spec, CPU, Policy(), rankings.lookup(spec, CPU))
    assert decision.backend == "reference" and decision.eligible[-1] == "sdpa"


def test_without_autotune_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(measured, "default_timer", lambda *a: pytest.fail("must not measure"))
    monkeypatch.delenv("DISPATCHATTN_AUTOTUNE", raising=False)
    q, k, v = _qkv()
    assert da.explain(q, k, v, is_causal=True).decided_by == "rule"


# --- shipped rankings ----------------------------------------------------------------------------------------------


def test_the_shipped_sm90_ranking_decides_on_any_hopper_device_until_the_user_measures():
    one = torch.empty(1, 1, 1, 1, dtype=torch.bfloat16)
    q = one.expand(2, 16, 8192, 128).requires_grad_()
    window = da.masks.sliding_window(1024) & da.masks.causal()
    with pretend(H100):
        training = da.explain(q, q, q, mask_mod=window)
        plain = da.explain(q, q, q, is_causal=True)
    assert training.decided_by == "measurement" and training.backend == "torch_flex"
    assert training.ranking["source"] == "shipped" and training.ranking["device"] == "NVIDIA H200"
    assert "triton_flex: could run; measured 2.337 ms, 1.57x the time of torch_flex" in str(training)
    assert plain.backend == "sdpa" and plain.decided_by == "measurement"
    spec = build_spec(q, q, q, mask_mod=window)
    rankings.record(spec, H100, {"triton_flex": 1.0, "torch_flex": 2.0}, {}, {})  # the user's own measurement
    with pretend(H100):
        mine = da.explain(q, q, q, mask_mod=window)
    assert mine.backend == "triton_flex" and mine.ranking["source"] == "user cache"


def test_the_shipped_file_is_what_the_committed_result_gives(tmp_path):
    from dispatchattn.tools import shipped_rankings

    written = shipped_rankings.write(rankings.SHIPPED_DIR.parents[2] / "bench/results/h200-backends-2026-12-04.json",
                                     tmp_path)
    shipped = rankings.SHIPPED_DIR / "sm_90.json"
    assert json.loads(written.read_text()) == json.loads(shipped.read_text())
    document = json.loads(shipped.read_text())
    assert document["device"]["name"] == "NVIDIA H200" and document["versions"]["triton"] == "3.6.0"
    assert len(document[rankings.SECTION]) == 24


# --- compiled calls and the warm path --------------------------------------------------------------------------------


def test_a_compiled_call_uses_the_stored_ranking_without_a_graph_break():
    q, k, v = _qkv()
    spec = build_spec(q, k, v, is_causal=True)
    rankings.record(spec, CPU, {"reference": 1.0, "sdpa": 5.0}, {}, {})
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: da.attention(q, k, v, is_causal=True), fullgraph=True)
    out = compiled(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)
    from dispatchattn.compiled import DECIDED

    _spec_, decision, _runner = getattr(DECIDED, f"d{DECIDED.count - 1}")
    assert decision.backend == "reference" and decision.decided_by == "measurement"


def test_a_warm_call_does_not_look_the_ranking_up_again(monkeypatch):
    q, k, v = _qkv()
    da.attention(q, k, v, is_causal=True)
    monkeypatch.setattr(rankings, "lookup", lambda *a: pytest.fail("looked up on a warm call"))
    for _ in range(3):
        da.attention(q, k, v, is_causal=True)


# --- tune --backends -------------------------------------------------------------------------------------------------


def test_tune_backends_measures_the_command_line_problem_and_prints_a_table(monkeypatch, capsys):
    from dispatchattn.cli import main

    monkeypatch.setattr(measured, "default_timer", FakeTimer({"sdpa": 2.0, "reference": 4.0, "torch_flex": 1.0}))
    status = main(["tune", "--backends", "--seq", "64", "--heads", "2", "--head-dim", "16", "--dtype", "fp32",
                   "--mask", "window:8", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "command line" in out and "torch_flex" in out and "2.00" in out  # the rule's sdpa is 2x the fastest
    spec = AttentionSpecFor(seq=64)
    assert rankings.lookup(spec, CPU).order() == ("torch_flex", "sdpa", "reference")


def AttentionSpecFor(seq):
    q = torch.randn(1, 2, seq, 16)
    return build_spec(q, q, q, mask_mod=da.masks.sliding_window(8) & da.masks.causal())


def test_tune_backends_default_grid_on_cpu_is_small():
    from dispatchattn.tools.tune_backends import grid

    problems = list(grid(torch.device("cpu")))
    assert len(problems) == 9 and all(spec.dtype == torch.float32 for _, spec in problems)
    assert len({bucket(spec) for _, spec in problems}) == 9
