"""Launch failures: a kernel, tile config or library call that this device cannot run, told apart and remembered.

A *launch failure* is an error that says "this kernel / config / library cannot run these shapes here" before any
work was done: Triton's ``OutOfResources`` (shared memory, registers), a Triton compile error (``CompilationError``,
ptxas / LLVM failures), or a vendor library refusing the call (flash-attn or xFormers "not supported", SDPA with no
kernel left).  ``launch_failure(error)`` returns its one-line message, or None for every other error: wrong inputs
(``ValueError``, ``TypeError``, ``IndexError``), a broken device (illegal address, device-side assert and other sticky
CUDA / HIP errors), out of memory.  Those propagate unchanged.

What failed is remembered so that nobody pays for it twice: in memory for the process, and on disk in
``<cache root>/autotune/<device>/launch-failures.json`` beside the tile configs, under a header of the device and
every library version (any upgrade makes the file foreign: it is replaced on the next write).  Entry keys name the
backend, kernel, config and problem (``key``).  The file follows the tile cache's discipline (``store``): atomic,
locked, and a corrupt or unwritable file never fails a call.

Recording a failure tells the listeners (``on_record``): the decision memos drop what they knew, so the next call
decides again with the failure in view and its explanation says so.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from pathlib import Path

FILE_NAME = "launch-failures.json"
SECTION = "launch_failures"

#: Error types that mean "this kernel or config cannot be built or launched here", by module and name (Triton is
#: optional and its error classes moved between releases, so they are matched by name).
_TRITON_LAUNCH_ERRORS = frozenset({"OutOfResources", "CompilationError", "PTXASError", "CompileTimeAssertionFailure",
                                   "UnsupportedLanguageConstruct"})
#: Messages of a compiler failing (ptxas, LLVM, MLIR passes), raised as plain RuntimeErrors by some Triton releases.
_COMPILER_WORDS = ("ptxas", "llvm error", "passmanager::run failed", "ptx codegen error", "failed to compile",
                   "triton compilation failed")
#: Messages of a library refusing a call it cannot run (checked before any work is done).
_REFUSAL_WORDS = ("not supported", "unsupported", "only supports", "no operator found", "no available kernel",
                  "not implemented for", "does not support", "doesn't support", "no kernel image is available",
                  "cudnn frontend", "cudnn_status_not_supported", "is only available")
#: Messages of a broken device or process state: never swallowed, even when a refusal word also appears.
_STICKY_WORDS = ("illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
                 "misaligned address", "out of memory", "an illegal instruction", "hiperrorillegal", "ecc error",
                 "cuda_error_launch_failed", "hardware exception", "uncorrectable")


class LaunchFailed(RuntimeError):
    """Every config of a kernel was tried and none could launch on this device (``attempts``: (config, why))."""

    def __init__(self, kernel: str, attempts: list[tuple[str, str]]):
        self.kernel, self.attempts = kernel, attempts
        by_failure: dict[str, list[str]] = {}
        for config, why in attempts:
            by_failure.setdefault(why, []).append(config)
        tried = "; ".join(f"{', '.join(configs)}: {why}" for why, configs in by_failure.items())
        super().__init__(f"triton_flex {kernel} kernel could not launch with any tile config tried ({tried}); "
                         "recorded, so the next decision for this problem runs another backend")


def launch_failure(error: BaseException) -> str | None:
    """The one-line message of ``error`` when it is a launch failure, else None (the error must propagate)."""
    if not isinstance(error, Exception):
        return None
    if isinstance(error, LaunchFailed):
        return str(error)
    name, module = type(error).__name__, type(error).__module__ or ""
    text = str(error).strip()
    lowered = text.lower()
    if any(word in lowered for word in _STICKY_WORDS):
        return None
    if module.startswith("triton") and name in _TRITON_LAUNCH_ERRORS:
        return f"{name}: {without_advice(first_line(text)) or name}"
    if isinstance(error, (ValueError, TypeError, IndexError, KeyError, AssertionError)):
        return None  # the inputs (or our own code) are wrong: say so, never run something else
    if isinstance(error, (RuntimeError, NotImplementedError)) and any(
            word in lowered for word in _COMPILER_WORDS + _REFUSAL_WORDS):
        return f"{name}: {first_line(text)}"
    return None


def without_advice(message: str) -> str:
    """``message`` without the advice Triton appends to ``OutOfResources`` (the ladder follows it already)."""
    return message.replace(" Reducing block sizes or `num_stages` may help.", "")


def first_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters."""
    for line in str(text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


# ---- records ---------------------------------------------------------------------------------------------------

_memory: dict[tuple[str, str], dict] = {}  # (file, key) -> entry, recorded or read by this process
_loaded: dict[str, dict[str, dict]] = {}  # file -> its entries as last read
_guard = threading.Lock()
_listeners: list[Callable[[], None]] = []


class _Generation:
    """How many failures this process has recorded outside tracing.  Compiled graphs read ``GENERATION.count``
    (dynamo guards its value), so a graph traced before a failure is traced again, without the backend that failed.
    A failure found while tracing (``ladder.probe``) is already accounted for by the graph being traced: counting it
    would fail that graph's own guard."""

    def __init__(self):
        self.count = 0


GENERATION = _Generation()


def on_record(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a failure is recorded (memos that must decide again register here)."""
    if listener not in _listeners:
        _listeners.append(listener)


def key(backend: str, kernel: str, problem: str, config: str | None = None) -> str:
    """A record's key: ``"triton_flex fwd BLOCK_M=128 ... | bfloat16 d64/64 mods=3fa2c1"``."""
    return f"{backend} {kernel} {config or '-'} | {problem}"


def path_for(caps) -> Path:
    """The failures file of ``caps``'s device: beside its tile-config files (``DISPATCHATTN_CACHE_DIR`` read now)."""
    from .paths import cache_root
    from .tuning.store import device_file

    return device_file(cache_root(), caps.arch or caps.vendor, caps.device_name, FILE_NAME)


def lookup(caps, record_key: str) -> dict | None:
    """The recorded failure under ``record_key`` for ``caps``'s device and versions, or None.  Never raises."""
    try:
        path = path_for(caps)
    except Exception:  # noqa: BLE001 - no cache root: only this process's memory
        path = None
    where = str(path)
    with _guard:
        hit = _memory.get((where, record_key))
        if hit is not None:
            return hit
        loaded = _loaded.get(where)
    if loaded is None and path is not None:
        from .tuning import store

        try:
            loaded = dict(store.load(path, store.device_header(caps), SECTION).entries)
        except Exception:  # noqa: BLE001 - a record we cannot read costs a retry, never the call
            loaded = {}
        with _guard:
            _loaded[where] = loaded
    entry = (loaded or {}).get(record_key)
    return {**entry, "file": where} if isinstance(entry, dict) and "message" in entry else None


def record(caps, record_key: str, message: str) -> dict:
    """Remember a failure (process and disk) and tell the listeners; returns the entry (with its ``status``)."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    entry = {"message": message, "when": now}
    try:
        path = path_for(caps)
        from .tuning import store

        status = store.put(path, record_key, entry, store.device_header(caps), SECTION)
    except Exception as error:  # noqa: BLE001 - an unwritable record costs a retry in the next process only
        path, status = None, f"not written ({type(error).__name__}: {first_line(str(error))})"
    where = str(path)
    with _guard:
        _memory[(where, record_key)] = {**entry, "file": where, "status": status}
        _loaded.pop(where, None)
        if not _compiling():
            GENERATION.count += 1
    for listener in list(_listeners):
        listener()
    return _memory[(where, record_key)]


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def describe(entry: dict) -> str:
    """A recorded failure as a phrase for explanations."""
    message = without_advice(entry["message"])
    return f"{message} (recorded {entry.get('when', '?')} in {entry.get('file', '?')})"


def clear_memory() -> None:
    """Forget every failure this process recorded or read, and the decisions made with them (tests; the files
    stay)."""
    with _guard:
        _memory.clear()
        _loaded.clear()
    for listener in list(_listeners):
        listener()


def backend_key(backend: str, kernel: str, spec) -> str:
    """The record of a whole backend failing ``spec``'s calls: ``kernel`` "fwd" (the call) or "bwd" (its
    backward); the problem is the spec's one-line summary (shapes, dtype, layout, mask and score)."""
    return key(backend, kernel, spec.summary())


def excluded_backends(spec, caps, names) -> tuple[tuple[str, str], ...]:
    """(name, sentence) for each of ``names`` recorded as unable to launch ``spec`` on ``caps``'s device: its
    forward, or its backward when the inputs require grad.  Looked up before selecting (``selector.select``'s
    ``exclude``).  Never raises."""
    found = []
    kernels = ("fwd", "bwd") if spec.requires_grad or getattr(spec, "mods_need_grad", False) else ("fwd",)
    for name in names:
        for kernel in kernels:
            entry = lookup(caps, backend_key(name, kernel, spec))
            if entry is not None:
                what = "its backward" if kernel == "bwd" else "it"
                found.append((name, f"{what} could not launch on this device: {describe(entry)}"))
                break
    return tuple(found)
