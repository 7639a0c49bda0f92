"""Backend rankings: how long each backend took on a problem bucket on this device, read before selecting.

A ranking belongs to a *bucket* (``bucket(spec)``): dtype, head dims, GQA ratio, the mask and score kinds (the
structured kinds by name, a user function by its fingerprint), query and key lengths rounded up to powers of two,
decoding (``Sq <= 16``) or not, forward only or forward + backward.  Its times are per backend, each run with its
best known config, measured by ``dispatchattn.measured`` on the device.

Where they live:

- the user's: ``<cache>/autotune/<device>/rankings.json``, section ``backend_rankings``, with the tile configs'
  store discipline (atomic writes under a lock; the header holds the device and every library version, so an
  upgrade makes the whole file foreign and the next write replaces it; a corrupt, stale or unwritable file reads
  as empty and costs a measurement, never a call);
- shipped: ``rankings/<arch>.json`` in the package, measured on one device of that architecture (named in the
  file with its versions and date) and used on every device of the architecture until the user measures their own.

This module reads and writes rankings only; it never runs a backend.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..capabilities import DeviceCaps
from ..masks import Combined, MaskMod
from ..paths import cache_root
from ..scores import ScoreMod
from ..spec import AttentionSpec
from . import store
from .key import seq_bucket

SECTION = "backend_rankings"
FILE_NAME = "rankings.json"
SHIPPED_DIR = Path(__file__).resolve().parent / "rankings"
#: Query rows up to which a call is decoding (the split-KV kernels' range; the selector uses the same).
DECODE_MAX_SEQ_Q = 16
USER = "user cache"
SHIPPED = "shipped"


def _fingerprint(fn: Callable) -> str:
    """A user function as what its generated kernel depends on: its code (constants, names, nested code), and what
    it captures (numbers by value, tensors by shape and dtype)."""
    parts: list[str] = []

    def code_parts(code) -> None:
        parts.extend([code.co_code.hex(), repr(code.co_names), repr(code.co_varnames[: code.co_argcount])])
        for const in code.co_consts:
            if hasattr(const, "co_code"):
                code_parts(const)
            else:
                parts.append(repr(const))

    code = getattr(fn, "__code__", None)
    if code is None:
        return f"{type(fn).__qualname__}"
    code_parts(code)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, torch.Tensor):
            parts.append(f"tensor{tuple(value.shape)}{value.dtype}")
        elif isinstance(value, (int, float, bool, str)):
            parts.append(repr(value))
        elif callable(value):
            parts.append(_fingerprint(value))
        else:
            parts.append(type(value).__qualname__)
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]
    return f"{getattr(fn, '__name__', 'fn')}#{digest}"


def mod_kind(mod) -> str:
    """A mask or score mod in a bucket: a structured one by its kind (``causal``, ``sliding_window & document``...);
    a user function by its fingerprint."""
    if isinstance(mod, Combined):
        parts = sorted(mod_kind(part) for part in mod.parts())
        return f" {'&' if mod.op == 'and' else '|'} ".join(parts)
    if isinstance(mod, (MaskMod, ScoreMod)):
        return mod.kind
    if hasattr(mod, "__wrapped__"):  # a wrapper (e.g. a mod seen at packed sequences' local positions)
        return f"{type(mod).__name__}({mod_kind(mod.__wrapped__)})"
    return "fn:" + _fingerprint(mod)


def bucket(spec: AttentionSpec) -> str:
    """The problem bucket a ranking is measured for, e.g.
    ``bfloat16 d128/128 gqa1 mask=causal score=- q8192 k8192 prefill fwd+bwd``."""
    masks = [mod_kind(spec.mask)] if spec.mask is not None else []
    if spec.is_causal:
        masks.append("causal")
    if spec.attn_mask is not None:
        masks.append(f"dense_{spec.attn_mask[0]}")
    mode = "fwd+bwd" if spec.requires_grad or spec.mods_need_grad else "fwd"
    phase = "decode" if spec.seq_q <= DECODE_MAX_SEQ_Q else "prefill"
    parts = [
        str(spec.dtype).removeprefix("torch."), f"d{spec.head_dim}/{spec.head_dim_v}",
        f"gqa{spec.heads_q // max(spec.heads_kv, 1)}", "mask=" + (" & ".join(sorted(masks)) or "-"),
        "score=" + (mod_kind(spec.score) if spec.score is not None else "-"),
        f"q{seq_bucket(spec.seq_q)}", f"k{seq_bucket(spec.seq_kv)}", phase, mode,
    ]
    if spec.dropout_p:
        parts.append("dropout")
    return " ".join(parts)


@dataclass(frozen=True)
class Ranking:
    """The measured times of one bucket on one device, fastest first, and where they come from."""

    bucket: str
    times_ms: tuple[tuple[str, float], ...]  # (backend, median milliseconds), fastest first
    failed: tuple[tuple[str, str], ...] = ()  # (backend, why it could not be measured)
    source: str = USER  # USER or SHIPPED
    where: str = ""  # the file
    when: str = ""  # ISO date-time of the measurement
    device: str = ""  # the device it was measured on
    first_call_s: tuple[tuple[str, float], ...] = ()  # each backend's first call (compiles), excluded from times

    def time_ms(self, name: str) -> float | None:
        return dict(self.times_ms).get(name)

    def order(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.times_ms)

    def describe(self) -> str:
        """Where the evidence comes from, as a phrase."""
        return f"{self.source} ranking measured on {self.device} {self.when} ({self.where}), bucket {self.bucket}"

    def to_dict(self) -> dict:
        return {"bucket": self.bucket, "times_ms": dict(self.times_ms), "failed": dict(self.failed),
                "source": self.source, "where": self.where, "when": self.when, "device": self.device,
                "first_call_s": dict(self.first_call_s)}

    @classmethod
    def from_entry(cls, key: str, entry: dict, source: str, where: str, device: str) -> Ranking | None:
        """A stored entry as a Ranking, or None when it is malformed (a damaged entry costs a re-measure)."""
        try:
            times = sorted(((str(n), float(t)) for n, t in entry["times_ms"].items()), key=lambda item: item[1])
            failed = tuple(sorted((str(n), str(why)) for n, why in (entry.get("failed") or {}).items()))
            first = tuple(sorted((str(n), float(t)) for n, t in (entry.get("first_call_s") or {}).items()))
            return cls(key, tuple(times), failed, source, where, str(entry.get("when", "?")),
                       str(entry.get("device", device)), first)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def user_path(caps: DeviceCaps) -> Path:
    """``<cache>/autotune/<arch>-<device>/rankings.json`` (``DISPATCHATTN_CACHE_DIR`` read now)."""
    return store.device_file(cache_root(), caps.arch or caps.vendor, caps.device_name, FILE_NAME)


_loaded: dict[str, dict[str, dict]] = {}  # user file -> its entries as last read
_guard = threading.Lock()
_listeners: list[Callable[[], None]] = []


def on_record(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a ranking is recorded (memos that must decide again register here)."""
    if listener not in _listeners:
        _listeners.append(listener)


def _user_entries(caps: DeviceCaps) -> tuple[dict[str, dict], str]:
    try:
        path = user_path(caps)
    except Exception:  # noqa: BLE001 - no cache root: nothing measured on disk
        return {}, ""
    where = str(path)
    with _guard:
        loaded = _loaded.get(where)
    if loaded is None:
        try:
            loaded = dict(store.load(path, store.device_header(caps), SECTION).entries)
        except Exception:  # noqa: BLE001 - a file we cannot read costs a re-measure, never the call
            loaded = {}
        with _guard:
            _loaded[where] = loaded
    return loaded, where


@functools.lru_cache(maxsize=16)
def shipped_document(arch: str) -> dict:
    """The shipped rankings of ``arch`` (``rankings/<arch>.json``), or {} when none ship or the file is damaged."""
    path = SHIPPED_DIR / f"{arch}.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if store.why_document_invalid(document, None, SECTION) is not None:
        return {}
    return document


def lookup(spec: AttentionSpec, caps: DeviceCaps) -> Ranking | None:
    """The ranking of ``spec``'s bucket on ``caps``'s device: the user's measurement, else a shipped one for the
    architecture, else None.  Never raises."""
    key = bucket(spec)
    entries, where = _user_entries(caps)
    if key in entries:
        found = Ranking.from_entry(key, entries[key], USER, where, caps.device_name)
        if found is not None:
            return found
    if not caps.arch:
        return None
    document = shipped_document(caps.arch)
    entry = document.get(SECTION, {}).get(key)
    if entry is None:
        return None
    device = document.get("device", {}).get("name", caps.arch)
    return Ranking.from_entry(key, entry, SHIPPED, str(SHIPPED_DIR / f"{caps.arch}.json"), device)


def record(spec: AttentionSpec, caps: DeviceCaps, times_ms: dict[str, float], failed: dict[str, str],
           first_call_s: dict[str, float]) -> tuple[Ranking, str]:
    """Store a measured ranking for ``spec``'s bucket on ``caps``'s device; (the ranking, the store's status).
    Never raises: an unwritable file keeps it in memory for this process."""
    key = bucket(spec)
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    entry = {"times_ms": {n: round(t, 6) for n, t in times_ms.items()}, "failed": failed,
             "first_call_s": {n: round(t, 3) for n, t in first_call_s.items()}, "when": when,
             "device": caps.device_name, "shape": spec.summary()}
    try:
        path = user_path(caps)
        status = store.put(path, key, entry, store.device_header(caps), SECTION)
        where = str(path)
    except Exception as error:  # noqa: BLE001 - a ranking we cannot keep costs a re-measure next process
        where, status = "", f"not written ({type(error).__name__}: {error})"
    with _guard:
        _loaded.pop(where, None)  # read again (with this process's unwritten entries) on the next lookup
    for listener in list(_listeners):
        listener()
    ranking = Ranking.from_entry(key, entry, USER, where, caps.device_name)
    assert ranking is not None  # built from well-formed values just above
    return ranking, status


def clear_memory() -> None:
    """Forget every ranking read from disk (tests; the files stay)."""
    with _guard:
        _loaded.clear()
    shipped_document.cache_clear()
    for listener in list(_listeners):
        listener()
