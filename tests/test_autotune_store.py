"""Every way the on-disk tile-config cache can break costs a default config and a sentence, never a call."""

from __future__ import annotations

import json
import stat

import pytest
import torch

import dispatchattn
from dispatchattn.capabilities import DeviceCaps
from dispatchattn.spec import AttentionSpec
from dispatchattn.tuning import TileConfig, clear_memo, make_key, select_config, store, tune, user_cache_path

H100 = DeviceCaps.synthetic("sm_90", device_name="NVIDIA H100 80GB HBM3")
TUNED = TileConfig(64, 32, num_warps=4, num_stages=2)


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
    fields = dict(batch=2, heads_q=8, heads_kv=8, seq_q=1000, seq_kv=1000, head_dim=128, head_dim_v=128,
                  dtype=torch.bfloat16, device_type="cuda")
    return AttentionSpec(**{**fields, **overrides})


def store_tuned(problem: AttentionSpec, caps: DeviceCaps = H100) -> str:
    """Tune with a fake timer that makes TUNED the fastest; returns the store status."""
    result = tune("fwd", problem, caps, [TUNED], lambda c: 1e-3 if c == TUNED else 2e-3, progress=False)
    return result.store_status


def fresh_select(problem: AttentionSpec, caps: DeviceCaps = H100):
    clear_memo()
    return select_config("fwd", problem, caps)


def test_round_trip_and_readable_json(cache_dir):
    problem = spec()
    status = store_tuned(problem)
    path = user_cache_path(make_key("fwd", problem, H100))
    assert status == f"stored in {path}"
    assert path.is_relative_to(cache_dir / "autotune")
    document = json.loads(path.read_text())
    assert document["schema"] == store.SCHEMA and document["schema_version"] == store.SCHEMA_VERSION
    assert document["backend_rankings"] == {}  # reserved for measured backend rankings
    assert document["versions"] == {"triton": str(H100.libraries.triton), "dispatchattn": dispatchattn.__version__}
    (entry,) = document["tile_configs"].values()
    assert entry["config"] == TUNED.to_dict() and entry["seconds"] == 1e-3 and entry["default_seconds"] == 2e-3
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert fresh_select(problem) == (TUNED, f"user cache ({path})")


def test_same_bucket_shares_the_entry_and_other_buckets_do_not():
    store_tuned(spec(seq_q=1000, seq_kv=1000))
    assert fresh_select(spec(seq_q=1024, seq_kv=1024, batch=7))[0] == TUNED  # same pow2 bucket
    for other in (spec(seq_q=2048, seq_kv=2048), spec(head_dim=64, head_dim_v=64), spec(dtype=torch.float16),
                  spec(heads_kv=2, enable_gqa=True), spec(mask=dispatchattn.masks.causal())):
        config, source = fresh_select(other)
        assert source.startswith("shipped default (not measured)"), source


BROKEN_CONTENTS = {
    "corrupt": b"{ this is not json",
    "truncated": None,  # the first half of a valid file, filled in below
    "wrong-schema": json.dumps({"schema": "someone.else", "schema_version": 1, "tile_configs": {}}).encode(),
    "future-schema": json.dumps({"schema": store.SCHEMA, "schema_version": 99, "tile_configs": {}}).encode(),
    "not-an-object": b"[1, 2, 3]",
    "binary": bytes(range(256)) * 4,
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(BROKEN_CONTENTS))
def test_broken_file_is_ignored_explained_and_replaced(kind):
    problem = spec()
    path = user_cache_path(make_key("fwd", problem, H100))
    store_tuned(problem)
    valid = path.read_bytes()
    path.write_bytes(BROKEN_CONTENTS[kind] if BROKEN_CONTENTS[kind] is not None else valid[: len(valid) // 2])

    config, source = fresh_select(problem)
    assert source.startswith("shipped default (not measured)")
    assert f"cache file {path}" in source and "replaced on the next write" in source

    assert store_tuned(problem) == f"stored in {path}"
    assert fresh_select(problem) == (TUNED, f"user cache ({path})")


def test_unreadable_file_never_fails_a_call():
    problem = spec()
    path = user_cache_path(make_key("fwd", problem, H100))
    path.mkdir(parents=True)  # a directory where the file should be: reading raises IsADirectoryError
    config, source = fresh_select(problem)
    assert "is unreadable (IsADirectoryError" in source
    status = store_tuned(problem)
    assert "results kept in memory" in status
    assert fresh_select(problem)[0] == TUNED


def test_unwritable_directory_degrades_to_memory(tmp_path, monkeypatch):
    regular_file = tmp_path / "a-file"
    regular_file.write_text("not a directory")
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(regular_file / "cache"))
    problem = spec()
    config, source = fresh_select(problem)
    assert source.startswith("shipped default (not measured)") and "NotADirectoryError" in source
    status = store_tuned(problem)
    assert "is unwritable (NotADirectoryError" in status and "results kept in memory for this process" in status
    config, source = fresh_select(problem)
    assert config == TUNED and source.startswith("user cache (") and "kept in memory" in source
    assert regular_file.read_text() == "not a directory"


def test_dispatchattn_version_change_invalidates(monkeypatch):
    problem = spec()
    store_tuned(problem)
    assert fresh_select(problem)[0] == TUNED
    monkeypatch.setattr(dispatchattn.version, "__version__", "99.0.0")
    config, source = fresh_select(problem)
    assert config != TUNED and source.startswith("shipped default")
    assert "dispatchattn-99.0.0" in user_cache_path(make_key("fwd", problem, H100)).name


def test_triton_version_change_invalidates():
    problem = spec()
    store_tuned(problem)
    from packaging.version import Version

    upgraded = DeviceCaps.synthetic(
        "sm_90", device_name=H100.device_name, libraries=type(H100.libraries)(triton=Version("99.1"))
    )
    config, source = fresh_select(problem, upgraded)
    assert config != TUNED and source.startswith("shipped default")


def test_file_whose_header_disagrees_is_foreign():
    problem = spec()
    store_tuned(problem)
    path = user_cache_path(make_key("fwd", problem, H100))
    document = json.loads(path.read_text())
    document["versions"]["triton"] = "0.0.1"  # e.g. copied from another environment
    path.write_text(json.dumps(document))
    config, source = fresh_select(problem)
    assert config != TUNED and "is not a cache of this version (versions" in source


def test_damaged_entry_is_a_miss_and_other_entries_survive():
    a, b = spec(), spec(seq_q=4096, seq_kv=4096)
    store_tuned(a)
    store_tuned(b)
    path = user_cache_path(make_key("fwd", a, H100))
    document = json.loads(path.read_text())
    document["tile_configs"][make_key("fwd", a, H100).entry]["config"] = {"block_m": "x", "bogus": 1}
    path.write_text(json.dumps(document))
    assert fresh_select(a)[1].startswith("shipped default")
    assert fresh_select(b)[0] == TUNED


def test_writes_leave_no_temp_files_and_remove_clears():
    problem = spec()
    for _ in range(3):
        store_tuned(problem)
    path = user_cache_path(make_key("fwd", problem, H100))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    assert store.remove(path) == f"removed {path}"
    assert not path.exists()
    assert fresh_select(problem)[1].startswith("shipped default")


def test_load_status_sentences(tmp_path):
    path = tmp_path / "x.json"
    assert store.load(path).status == f"no cache file yet at {path}" and store.load(path).healthy
    store.put(path, "k", {"config": {}})
    loaded = store.load(path)
    assert loaded.healthy and loaded.status == f"read 1 entries from {path}"
    assert store.load(path, {"versions": {"triton": "1"}}).healthy is False
