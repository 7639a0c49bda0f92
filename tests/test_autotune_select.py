"""select_config's sources and memo, the tuning search with an injected timer, and the tune CLI."""

from __future__ import annotations

import datetime
import json
import math

import filelock
import pytest
import torch

import dispatchattn as da
from dispatchattn.capabilities import DeviceCaps, pretend
from dispatchattn.spec import AttentionSpec
from dispatchattn.tuning import (
    INTERPRETER_SOURCE,
    TileConfig,
    candidates_for,
    clear_memo,
    config_space,
    heuristic_config,
    make_key,
    select_config,
    shipped,
    store,
    tune,
    user_cache_path,
)
from dispatchattn.tuning import cli as tune_cli
from dispatchattn.tuning import lookup as select_module
from dispatchattn.tuning import (
    measure as tuning,
)

H100 = DeviceCaps.synthetic("sm_90")
MI300 = DeviceCaps.synthetic("gfx942")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DISPATCHATTN_AUTOTUNE", raising=False)
    clear_memo()
    store.clear_memory()
    yield tmp_path / "cache"
    clear_memo()
    store.clear_memory()


def spec(**overrides) -> AttentionSpec:
    fields = dict(batch=1, heads_q=16, heads_kv=16, seq_q=4096, seq_kv=4096, head_dim=128, head_dim_v=128,
                  dtype=torch.float16, device_type="cuda")
    return AttentionSpec(**{**fields, **overrides})


class OutOfResources(RuntimeError):
    """Stands in for triton.runtime.errors.OutOfResources."""


def fake_bench(config: TileConfig) -> float:
    """Deterministic 'time': bigger tiles and more stages are faster, 4 stages 'run out of memory'."""
    if config.num_stages == 4:
        raise OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    return 1e-3 * 4096 / (config.block_m * config.block_n) / config.num_stages + 1e-6 * config.num_warps


# --- select_config sources -----------------------------------------------------------------------------


def test_cpu_gets_interpreter_tiles_no_larger_than_the_problem():
    cpu = DeviceCaps.synthetic("cpu")
    for kernel in ("fwd", "bwd"):
        config, source = select_config(kernel, spec(device_type="cpu", seq_q=77, seq_kv=20), cpu)
        assert source == INTERPRETER_SOURCE
        assert (config.block_m, config.block_n) == (64, 32)
    assert select_config("fwd", spec(device_type="cpu", seq_q=5, seq_kv=5), cpu)[0].block_m == 16


def test_caps_decide_so_pretend_explains_the_gpu_config():
    config, source = select_config("fwd", spec(device_type="cpu"), H100)  # CPU tensors under pretend(H100)
    assert source.startswith("shipped default (not measured) for sm_90")


def test_gpu_without_tuned_entry_uses_shipped_default_and_says_not_measured():
    for caps in (H100, MI300):
        for kernel in ("fwd", "bwd"):
            config, source = select_config(kernel, spec(), caps)
            assert source.startswith(f"shipped default (not measured) for {caps.arch}")
            assert config == shipped.lookup(kernel, caps.arch, "float16", 128, 128)[0]


def test_arch_without_shipped_defaults_uses_heuristic_with_reason():
    config, source = select_config("fwd", spec(), DeviceCaps.synthetic("sm_75"))
    assert source.startswith("heuristic (no tuned entry for fwd float16 d128/128 gqa1 dense q4096 kv4096;")
    assert config == heuristic_config("fwd", "sm_75", torch.float16, 128)


def test_odd_head_dim_uses_padded_shipped_entry():
    config, source = select_config("fwd", spec(head_dim=96, head_dim_v=96), H100)
    assert source.startswith("shipped default") and config == heuristic_config("fwd", "sm_90", torch.float16, 128)


def test_warm_call_is_memoised_and_never_touches_disk(monkeypatch):
    problem = spec()
    first = select_config("fwd", problem, H100)
    monkeypatch.setattr(store, "load", lambda *a, **k: pytest.fail("the memo should answer"))
    assert select_config("fwd", problem, H100) == first


def test_cache_failure_never_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "load", broken)
    config, source = select_config("bwd", spec(), H100)
    assert config == heuristic_config("bwd", "sm_90", torch.float16, 128)
    assert source.startswith("heuristic (") and "RuntimeError: disk on fire" in source


def test_unhashable_mask_object_skips_the_memo_but_still_selects():
    class UnhashableMask:
        __hash__ = None

        def __call__(self, b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

    problem = spec(mask=UnhashableMask())
    for _ in range(2):
        config, source = select_config("fwd", problem, H100)
        assert source.startswith("shipped default")



def test_user_cache_config_that_cannot_launch_is_not_used_and_explain_says_why():
    """A user-cache entry (hand-edited, or tuned elsewhere) whose tile overflows the target's shared memory would
    fail at launch: the shipped default runs instead and the source sentence (what explain prints) names the
    entry's config, the file and the numbers.  The same tile is used on a target where it fits."""
    a10, problem = DeviceCaps.synthetic("sm_86"), spec()
    too_big = TileConfig(128, 128, num_warps=8, num_stages=3)
    for caps in (a10, H100):
        key = make_key("fwd", problem, caps)
        store.put(user_cache_path(key), key.entry, {"config": too_big.to_dict()}, key.header)
    config, source = select_config("fwd", problem, a10)
    assert config == shipped.lookup("fwd", "sm_86", "float16", 128, 128)[0] != too_big
    assert source.startswith("shipped default (not measured) for sm_86")
    assert (f"the user cache's {too_big.short()} ({user_cache_path(make_key('fwd', problem, a10))}) is not used: "
            "fwd BLOCK_M=128 BLOCK_N=128 D=128 stages=3 needs 133,120 B shared memory > 101,376 B on sm_86") in source
    assert select_module.user_entry("fwd", problem, a10) is None  # nor does it lift a refusal
    query = torch.randn(1, 16, 4096, 128, dtype=torch.float16)
    with pretend(a10):
        decision = da.explain(query, query, query, backend="triton_flex")
    assert decision.config == config and f"the user cache's {too_big.short()}" in str(decision)
    h100_file = user_cache_path(make_key("fwd", problem, H100))
    assert select_config("fwd", problem, H100) == (too_big, f"user cache ({h100_file})")


# --- tune with an injected timer -----------------------------------------------------------------------


def test_tune_finds_the_fastest_and_scores_failures_inf():
    problem = spec()
    candidates = config_space("fwd", H100, torch.float16, 128, 128)
    result = tune("fwd", problem, H100, candidates, fake_bench, progress=False, save=False)
    finite = {c: t for c, t in result.timings.items() if math.isfinite(t)}
    assert result.best == min(finite, key=finite.get)
    assert result.best_seconds == fake_bench(result.best)
    assert result.default == heuristic_config("fwd", "sm_90", torch.float16, 128)
    assert result.speedup == pytest.approx(fake_bench(result.default) / fake_bench(result.best))
    failed = [c for c in result.timings if c.num_stages == 4]
    assert failed and all(result.timings[c] == math.inf for c in failed)
    assert set(result.failures) == set(failed)
    assert "OutOfResources: out of resource: shared memory" in result.failures[failed[0]]
    table = result.table()
    assert "[default]" in table and f"speedup over default {result.speedup:.2f}x" in table
    assert result.store_status is None


def test_tune_shows_progress_and_stores(capsys):
    problem = spec(mask=da.masks.causal())
    candidates = [TileConfig(64, 64, 4, 2), TileConfig(128, 64, 8, 3)]
    result = tune("fwd", problem, H100, candidates, fake_bench, progress=True)
    assert "tuning fwd" in capsys.readouterr().err  # the tqdm bar
    path = user_cache_path(make_key("fwd", problem, H100))
    assert result.store_status == f"stored in {path}"
    clear_memo()
    assert select_config("fwd", problem, H100) == (result.best, f"user cache ({path})")


def test_tune_where_everything_fails_stores_nothing():
    def always_fails(config):
        raise OutOfResources("no")

    result = tune("bwd", spec(), H100, [TileConfig(64, 64)], always_fails, progress=False)
    assert not result.succeeded and math.isnan(result.speedup) and result.store_status is None
    assert select_config("bwd", spec(), H100)[1].startswith("shipped default")


def test_candidates_skip_tiles_larger_than_the_problem():
    short = spec(seq_q=40, seq_kv=40)
    candidates = candidates_for("fwd", short, H100)
    assert candidates and all(c.block_m <= 64 and c.block_n <= 64 for c in candidates)
    assert len(candidates_for("fwd", spec(), H100)) > len(candidates)


def test_autotune_on_miss_tunes_once_and_stores(monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_AUTOTUNE", "1")
    calls = []

    def fake_factory(kernel, problem, caps, device=None):
        calls.append(kernel)
        return fake_bench

    monkeypatch.setattr(tuning, "kernel_bench_fn", fake_factory)
    problem = spec(mask=da.masks.sliding_window(512) & da.masks.causal())
    config, source = select_config("fwd", problem, H100)
    path = user_cache_path(make_key("fwd", problem, H100))
    assert source == f"tuned now (stored in {path})" and calls == ["fwd"]
    assert select_config("fwd", problem, H100) == (config, source)  # memo: no second tuning
    clear_memo()
    assert select_config("fwd", problem, H100) == (config, f"user cache ({path})") and calls == ["fwd"]


def test_autotune_on_miss_waits_for_nobody_when_another_process_tunes(monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "kernel_bench_fn", lambda *a, **k: pytest.fail("must not tune"))
    problem = spec()
    key = make_key("fwd", problem, H100)
    held = select_module._tuning_lock(user_cache_path(key), key)
    with held:  # another process (another lock object on the same file) is tuning this key
        config, source = select_config("fwd", problem, H100)
    assert source.startswith("shipped default") and "another process is tuning this key" in source
    assert isinstance(held, filelock.BaseFileLock)


def test_autotune_on_miss_failure_is_explained(monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_AUTOTUNE", "1")

    def missing_kernel(*args, **kwargs):
        raise ImportError("triton_flex autograd is not built")

    monkeypatch.setattr(tuning, "kernel_bench_fn", missing_kernel)
    config, source = select_config("bwd", spec(), H100)
    assert source.startswith("shipped default") and "autotune failed: ImportError" in source


# --- CLI ------------------------------------------------------------------------------------------------


def test_tune_cli_without_gpu_says_so_and_fails(capsys):
    assert not torch.cuda.is_available()
    assert tune_cli.main(["tune", "--seq", "2048", "--head-dim", "64", "--mask", "causal"]) == 2
    assert "tune needs a CUDA or ROCm GPU" in capsys.readouterr().err


def test_tune_cli_show_and_clear(capsys):
    problem = spec()
    tune("fwd", problem, H100, [TileConfig(64, 64, 4, 2)], fake_bench, progress=False)
    assert tune_cli.main(["tune", "--show"]) == 0
    shown = capsys.readouterr().out
    assert make_key("fwd", problem, H100).entry in shown and "over default" in shown
    assert tune_cli.main(["tune", "--clear"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not user_cache_path(make_key("fwd", problem, H100)).exists()


@pytest.mark.parametrize("text", ["causal", "window:256", "document:512", "none"])
def test_cli_masks_parse(text):
    mask = tune_cli.parse_mask(text, 4096, torch.device("cpu"))
    assert (mask is None) == (text == "none")


@pytest.mark.parametrize("text", ["window", "window:x", "document:0", "blocky"])
def test_cli_bad_mask_is_a_clear_error(text):
    with pytest.raises(ValueError, match="--mask: expected none, causal, window:N or document:N"):
        tune_cli.parse_mask(text, 4096, torch.device("cpu"))


def test_export_measured_shipped_default(tmp_path):
    caps = DeviceCaps.synthetic("sm_90", device_name="NVIDIA H100 80GB HBM3")
    result = tune("fwd", spec(), caps, [TileConfig(128, 128, 8, 3)], fake_bench, progress=False, save=False)
    path = shipped.export_measured(result, tmp_path)
    assert path == tmp_path / "sm_90.json"
    config, source = shipped.lookup("fwd", "sm_90", "float16", 128, 128, directory=tmp_path)
    assert config == result.best
    assert source == f"shipped default (measured on NVIDIA H100 80GB HBM3, {datetime.date.today().isoformat()})"
    untouched = shipped.lookup("bwd", "sm_90", "float16", 128, 128, directory=tmp_path)
    assert untouched[1].startswith("shipped default (not measured)")
    entry = json.loads(path.read_text())["tile_configs"]["fwd float16 d128/128"]
    assert entry["tuned_for"] == result.key.entry and entry["speedup_over_heuristic"] > 1
    assert {"device", "date", "dispatchattn", "triton", "torch", "how"} <= set(entry["produced"])


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_real_bench_fn_drives_the_kernel(monkeypatch, kernel):
    """The timing function's plumbing, run through Triton's interpreter with do_bench stood in."""
    import triton.testing

    def run_once(fn, warmup=0, rep=0, grad_to_none=None):
        fn()
        assert grad_to_none is None or all(t.grad is not None for t in grad_to_none)
        return 2.0  # milliseconds

    monkeypatch.setattr(triton.testing, "do_bench", run_once)
    problem = spec(batch=1, heads_q=2, heads_kv=1, seq_q=40, seq_kv=40, head_dim=16, head_dim_v=16,
                   dtype=torch.float32, device_type="cpu", mask=da.masks.causal(), enable_gqa=True)
    bench = tuning.kernel_bench_fn(kernel, problem, DeviceCaps.synthetic("cpu"), torch.device("cpu"))
    assert bench(TileConfig(32, 32, 4, 1)) == pytest.approx(2e-3)
