"""Turn a ``score_mod`` / ``mask_mod`` written in plain PyTorch into readable Triton functions.

The mods are traced with ``make_fx`` over 1-D int32 index tensors (and a 1-D float32 score), so
indexing a captured tensor (a bias table, document ids, per-head slopes) becomes ``aten.index``.
Each traced op is emitted as one named Triton statement with a comment naming the aten op; the
derivative of the score_mod (w.r.t. the score and to captured tensors that require grad) is emitted
from the same trace by the reverse-mode rules in ``_GRAD_RULES``.

The generated module defines ``score_mod``, ``score_mod_bwd`` and ``mask_mod`` with fixed signatures
that the kernels in ``kernels.py`` receive as ``tl.constexpr`` arguments:

- ``score_mod(score, b, h, q_idx, kv_idx, bufs) -> score``
- ``score_mod_bwd(score, b, h, q_idx, kv_idx, grad, valid, bufs, gbufs, ACCUMULATE) -> d_score``
- ``mask_mod(b, h, q_idx, kv_idx, bufs) -> bool``

``bufs`` is the tuple of the captured tensors (``Generated.buffers``, any number of them) and ``gbufs`` that of
the fp32 gradient buffers of ``Generated.grad_slots``; the kernels pass both through as tuple arguments.

Modules are written as real files under ``cache_root()/kernels/`` (``@triton.jit`` reads source with
``inspect``) and cached in memory and on disk by a hash of the traced graphs, so a second process only
traces and imports.

>>> gen = generate(None, None)   # the plain kernel (no mods)
>>> gen.has_score_mod, gen.has_mask_mod
(False, False)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ...paths import cache_root
from . import emit
from .emit import CODEGEN_VERSION, Traced, Unsupported, buffer_slot, emit_module

__all__ = ["Generated", "generate", "generated_by_key", "unsupported_reason", "CODEGEN_VERSION"]

_TRACE_LEN = 4
# The generator's own source (tracing and emission) is part of the key, so editing it never reuses a stale file.
_GENERATOR_HASH = hashlib.sha256(b"".join(Path(f).read_bytes() for f in (__file__, emit.__file__))).hexdigest()[:16]


@dataclass
class Generated:
    """Generated Triton functions for one (score_mod, mask_mod) pair and the tensors they read.

    ``key`` names the kernel (hash of the traced graphs); ``buffers`` are the kernels' ``BUFS`` tuple, one
    entry per captured tensor; ``grad_slots`` are the slots whose tensors get gradients (atomically reduced in
    fp32, in the ``GBUFS`` tuple).
    """

    key: str
    module: ModuleType
    path: Path | None
    buffers: list[torch.Tensor] = field(default_factory=list)
    grad_slots: tuple[int, ...] = ()
    has_score_mod: bool = False
    has_mask_mod: bool = False

    @property
    def short_key(self) -> str:
        return self.key[:12]


def _trace_inputs(kind: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    index = [torch.zeros(_TRACE_LEN, dtype=torch.int32, device=device) for _ in range(4)]
    if kind == "score_mod":
        return (torch.zeros(_TRACE_LEN, dtype=torch.float32, device=device), *index)
    return tuple(index)


def _trace_device(device: torch.device | str | None) -> torch.device:
    """The inputs' device when tensors can be made on it here, else the CPU (e.g. explaining for a GPU)."""
    try:
        return torch.zeros(1, device=device).device if device is not None else torch.device("cpu")
    except (RuntimeError, AssertionError):
        return torch.device("cpu")


def trace(mod: Callable, kind: str, device: torch.device | str | None = None) -> Traced:
    """Trace ``mod`` with ``make_fx`` over index tensors on ``device`` (fake tensors; captured real tensors
    stay real constants)."""
    with torch.no_grad():
        try:
            inputs = _trace_inputs(kind, _trace_device(device))
            gm = make_fx(mod, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
        except Exception as error:  # noqa: BLE001 - any tracing failure is a refusal reason
            # torch >= 2.13 raises a DeviceMismatch error; torch 2.11 a RuntimeError naming "two different devices"
            if "DeviceMismatch" in type(error).__name__ or "different devices" in str(error):
                raise Unsupported(f"{kind} reads a captured tensor on another device than the attention inputs "
                                  f"({error}); move it to the inputs' device") from error
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = f"{kind} could not be traced by make_fx ({type(error).__name__}: {first_line})"
            raise Unsupported(reason) from error
    buffers: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            tensor = getattr(gm, node.target)
            if not any(tensor is seen for seen in buffers):
                buffers.append(tensor)
    return Traced(kind, gm, buffers)


def _buffer_signature(t: torch.Tensor) -> str:
    return f"{t.dtype}{tuple(t.shape)}{tuple(t.stride())}{t.requires_grad and t.is_floating_point()}"


def _graph_key(score: Traced | None, mask: Traced | None, buffers: list[torch.Tensor]) -> str:
    parts = [f"codegen v{CODEGEN_VERSION}", _GENERATOR_HASH]
    for traced in (score, mask):
        parts.append(traced.graph_module.code if traced is not None else "none")
        if traced is not None:  # which slot each get_attr reads
            parts.append(repr([buffer_slot(buffers, getattr(traced.graph_module, n.target))
                               for n in traced.graph_module.graph.nodes if n.op == "get_attr"]))
    parts.extend(_buffer_signature(t) for t in buffers)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _kernel_dir() -> Path:
    """``cache_root()/kernels``, or a private temp dir when the cache root cannot be written."""
    for candidate in (cache_root() / "kernels", Path(tempfile.gettempdir()) / "dispatchattn-kernels"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    raise OSError("no writable directory for generated Triton kernels")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _import_file(path: Path, key: str) -> ModuleType:
    name = f"dispatchattn_generated_{key[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_modules: dict[str, tuple[ModuleType, Path]] = {}
#: Statistics for tests and explanations: how many modules were emitted / loaded from disk here.
stats = {"emitted": 0, "loaded_from_disk": 0}


def _load_or_emit(key: str, score: Traced | None, mask: Traced | None,
                  buffers: list[torch.Tensor], grad_slots: tuple[int, ...]) -> tuple[ModuleType, Path]:
    if key in _modules:
        return _modules[key]
    path = _kernel_dir() / f"flex_{key[:32]}.py"
    if path.exists():
        try:
            _modules[key] = (_import_file(path, key), path)
            stats["loaded_from_disk"] += 1
            return _modules[key]
        except Exception:  # noqa: BLE001 - a corrupt cache entry is re-generated
            pass
    source = emit_module(key, score, mask, buffers, grad_slots)
    _write_atomic(path, source)
    stats["emitted"] += 1
    _modules[key] = (_import_file(path, key), path)
    return _modules[key]


def _check_buffers(buffers: list[torch.Tensor]) -> None:
    for t in buffers:
        if t.is_complex():
            raise Unsupported(f"a captured tensor has complex dtype {t.dtype}, which the kernel cannot load")


def _trace_pair(score_mod: Callable | None, mask_mod: Callable | None, device=None) -> tuple:
    score = trace(score_mod, "score_mod", device) if score_mod is not None else None
    mask = trace(mask_mod, "mask_mod", device) if mask_mod is not None else None
    buffers: list[torch.Tensor] = []
    for traced in (score, mask):
        for t in traced.buffers if traced is not None else ():
            if not any(t is seen for seen in buffers):
                buffers.append(t)
    _check_buffers(buffers)
    return score, mask, buffers


def _reachable_tensors(obj, depth: int = 0) -> list[torch.Tensor]:
    """Tensors a mod can read: its attributes, closure cells, defaults and named globals (two levels deep)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 2:
        return []
    if callable(obj) and hasattr(obj, "__code__"):
        cells = [c.cell_contents for c in (obj.__closure__ or ()) if _cell_filled(c)]
        named = [obj.__globals__[n] for n in obj.__code__.co_names if n in obj.__globals__]
        children = cells + list(obj.__defaults__ or ()) + named
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ != "builtins":
        children = list(vars(obj).values())
    else:
        return []
    found = []
    for child in children:
        if isinstance(child, torch.Tensor) or callable(child) or hasattr(child, "__dict__"):
            found.extend(_reachable_tensors(child, depth + 1))
    return found


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
        return True
    except ValueError:
        return False


def _memo_key(mod: Callable | None) -> tuple | None:
    if mod is None:
        return None
    try:
        identity = (hash(mod), mod)
    except TypeError:
        identity = (id(mod), None)
    tensors = tuple((id(t), t.requires_grad, t.device, t.shape, t.stride()) for t in _reachable_tensors(mod))
    return (*identity, tensors)


_generated: OrderedDict[tuple, tuple[Generated, tuple]] = OrderedDict()
_MEMO_SIZE = 64


def generate(score_mod: Callable | None, mask_mod: Callable | None,
             device: torch.device | str | None = None) -> Generated:
    """Trace both mods (over index tensors on ``device``, the attention inputs' device; default CPU),
    emit (or load from the disk cache) their Triton module and return it.

    Memoised per (mods, device, identity of the tensors they reach: attributes, closure cells, defaults,
    named globals), so a warm call does not re-trace (~30 ms).  A plain function is re-traced when one of
    those tensors is replaced; pass a new function if it reads tensors only through other helpers.
    """
    key = (str(device), _memo_key(score_mod), _memo_key(mask_mod))
    hit = _generated.get(key)
    if hit is not None:
        _generated.move_to_end(key)
        return hit[0]
    generated = _generate(score_mod, mask_mod, device)
    _generated[key] = (generated, (score_mod, mask_mod))  # keeps id-keyed functions alive
    if len(_generated) > _MEMO_SIZE:
        _generated.popitem(last=False)
    return generated


_by_key: dict[str, Generated] = {}


def generated_by_key(key: str) -> Generated:
    """The generated kernel of ``key`` (from an earlier ``generate`` in this process): lets an op that
    receives only the key and the captured tensors (e.g. a ``torch.library.triton_op``) find its kernel."""
    try:
        return _by_key[key]
    except KeyError:
        message = f"no generated Triton flex kernel {key[:12]}... in this process; call generate() first"
        raise KeyError(message) from None


def _generate(score_mod: Callable | None, mask_mod: Callable | None, device) -> Generated:
    score, mask, buffers = _trace_pair(score_mod, mask_mod, device)
    score_buffers = score.buffers if score is not None else []
    grad_slots = tuple(
        i for i, t in enumerate(buffers)
        if t.requires_grad and t.is_floating_point() and any(t is s for s in score_buffers)
    )
    key = _graph_key(score, mask, buffers)
    module, path = _load_or_emit(key, score, mask, buffers, grad_slots)
    _by_key[key] = Generated(key, module, path, buffers, grad_slots, score is not None, mask is not None)
    return _by_key[key]


def unsupported_reason(score_mod: Callable | None, mask_mod: Callable | None,
                       example_device: torch.device | str | None = None) -> str | None:
    """None when both mods can be compiled, else a sentence naming what cannot (e.g. the aten op).

    ``example_device``: captured tensors must live on it (the kernel reads them by pointer).
    """
    try:
        score, mask, buffers = _trace_pair(score_mod, mask_mod, example_device)
        emit_module("check", score, mask, buffers, ())
    except Unsupported as reason:
        return str(reason)
    if example_device is not None:
        device = torch.device(example_device)
        for t in buffers:
            if t.device.type != device.type:
                return (f"a captured tensor of the mods lives on {t.device}, the attention inputs on "
                        f"{device}; the Triton flex kernel reads captured tensors by pointer on the inputs' device")
    return None
