"""The tile-config cache file under concurrent writers and readers (8 spawned processes).

``dispatchattn.tuning.store`` depends only on the standard library and ``filelock``; the workers
load it from its file so they start without importing torch (this module imports no torch either).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import sys
import threading
from pathlib import Path

STORE_FILE = Path(__file__).resolve().parents[1] / "dispatchattn" / "tuning" / "store.py"
WRITERS = 8
KEYS_PER_WRITER = 6
SHARED_KEYS = 4
HEADER = {
    "device": {"vendor": "cuda", "arch": "sm_90", "name": "test"},
    "versions": {"triton": "t", "dispatchattn": "d"},
}


def _load_store():
    name = "_dispatchattn_autotune_store_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, STORE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _entry(writer: int, index: int) -> dict:
    return {"config": {"block_m": 64, "block_n": 16 * (index + 1)}, "writer": writer, "index": index}


def _writer(path: str, writer: int, start) -> None:
    """Write this writer's own keys and the keys every writer shares, interleaved."""
    store = _load_store()
    start.wait(timeout=60)
    for index in range(KEYS_PER_WRITER):
        status = store.put(Path(path), f"w{writer}-k{index}", _entry(writer, index), HEADER)
        assert status.startswith("stored in"), status
        if index < SHARED_KEYS:
            store.put(Path(path), f"shared-k{index}", _entry(writer, index), HEADER)


def _read_while(path: Path, running: threading.Event, report: dict) -> None:
    """Parse the file as fast as possible until ``running`` clears; count what could not be parsed."""
    while running.is_set():
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        report["reads"] += 1
        try:
            document = json.loads(raw)
            assert isinstance(document["tile_configs"], dict)
        except (ValueError, KeyError, AssertionError) as error:
            report["bad"].append(f"{type(error).__name__}: {error}")


def test_eight_processes_writing_same_and_different_keys_leave_every_entry(tmp_path):
    path = tmp_path / "autotune" / "sm_90-test" / "triton-t_dispatchattn-d.json"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_writer, args=(str(path), w, start)) for w in range(WRITERS)]
    for worker in workers:
        worker.start()
    running, report = threading.Event(), {"reads": 0, "bad": []}
    running.set()
    reader = threading.Thread(target=_read_while, args=(path, running, report))
    reader.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
    running.clear()
    reader.join()

    assert [w.exitcode for w in workers] == [0] * WRITERS
    assert report["bad"] == [], "a reader saw a partial or invalid file"
    assert report["reads"] > 0
    store = _load_store()
    loaded = store.load(path, HEADER)
    assert loaded.healthy, loaded.status
    expected = {f"w{w}-k{i}" for w in range(WRITERS) for i in range(KEYS_PER_WRITER)}
    expected |= {f"shared-k{i}" for i in range(SHARED_KEYS)}
    assert set(loaded.entries) == expected
    for writer in range(WRITERS):
        assert loaded.entries[f"w{writer}-k2"] == _entry(writer, 2)
    assert not list(path.parent.glob("*.tmp")), "temp files were left behind"
