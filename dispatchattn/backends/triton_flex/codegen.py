"""Turn a ``score_mod`` / ``mask_mod`` written in plain PyTorch into readable Triton functions.

The mods are traced with ``make_fx`` over 1-D int32 index tensors (and a 1-D float32 score), so
indexing a captured tensor (a bias table, document ids, per-head slopes) becomes ``aten.index``.
Each traced op is emitted as one named Triton statement with a comment naming the aten op; the
derivative of the score_mod (w.r.t. the score and to captured tensors that require grad) is emitted
from the same trace by the reverse-mode rules in ``_GRAD_RULES``.

The generated module defines ``score_mod``, ``score_mod_bwd`` and ``mask_mod`` with fixed signatures
that the kernels in ``kernels.py`` receive as ``tl.constexpr`` arguments:

- ``score_mod(score, b, h, q_idx, kv_idx, buf0, buf1, buf2, buf3) -> score``
- ``score_mod_bwd(score, b, h, q_idx, kv_idx, grad, valid, buf0..3, gbuf0..3, ACCUMULATE) -> d_score``
- ``mask_mod(b, h, q_idx, kv_idx, buf0, buf1, buf2, buf3) -> bool``

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

__all__ = ["Generated", "generate", "generated_by_key", "unsupported_reason", "MAX_BUFFERS", "CODEGEN_VERSION"]

#: Bump when the emitted code changes meaning: it is part of every cache key.
CODEGEN_VERSION = 1
_TRACE_LEN = 4
# The generator's own source is part of the key, so editing it never reuses a stale file.
_GENERATOR_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@dataclass
class Traced:
    """One mod traced to an FX graph, and the captured tensors it reads."""

    kind: str  # "score_mod" or "mask_mod"
    graph_module: torch.fx.GraphModule
    buffers: list[torch.Tensor]  # in order of first use, deduplicated by identity


@dataclass
class Generated:
    """Generated Triton functions for one (score_mod, mask_mod) pair and the tensors they read.

    ``key`` names the kernel (hash of the traced graphs); ``buffers`` fill the kernels' BUF0..BUF3
    slots; ``grad_slots`` are the slots whose tensors get gradients (atomically reduced in fp32).
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
            if "DeviceMismatch" in type(error).__name__:
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
            parts.append(repr([_slot(buffers, getattr(traced.graph_module, n.target))
                               for n in traced.graph_module.graph.nodes if n.op == "get_attr"]))
    parts.extend(_buffer_signature(t) for t in buffers)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _slot(buffers: list[torch.Tensor], tensor: torch.Tensor) -> int:
    return next(i for i, seen in enumerate(buffers) if seen is tensor)


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
    if len(buffers) > MAX_BUFFERS:
        raise Unsupported(
            f"the mods capture {len(buffers)} tensors; the Triton flex kernel passes at most {MAX_BUFFERS}"
        )
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


# ---------------------------------------------------------------------------------------------------
# Emission: one Triton statement per traced op, then the reverse-mode derivative of the score_mod.
# ---------------------------------------------------------------------------------------------------

#: Captured tensors the kernels can pass (BUF0..BUF3 and, for gradients, GBUF0..GBUF3).
MAX_BUFFERS = 4


class Unsupported(NotImplementedError):
    """A mod the generator cannot compile; the message is the sentence given as the refusal reason."""


_TL_DTYPES = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64", torch.int32: "tl.int32", torch.int64: "tl.int64", torch.int16: "tl.int16",
    torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}
_UNARY = {
    "neg": "-{0}", "abs": "tl.abs({0})", "exp": "tl.exp({0})", "log": "tl.log({0})", "exp2": "tl.exp2({0})",
    "log2": "tl.log2({0})", "sigmoid": "tl.sigmoid({0})", "tanh": "_tanh({0})", "sqrt": "tl.sqrt({0})",
    "rsqrt": "tl.rsqrt({0})", "floor": "tl.floor({0})", "ceil": "tl.ceil({0})", "sin": "tl.sin({0})",
    "cos": "tl.cos({0})", "logical_not": "({0} == 0)", "bitwise_not": "~{0}", "reciprocal": "1.0 / {0}",
    "sign": "tl.where({0} > 0, 1, tl.where({0} < 0, -1, 0))", "relu": "tl.maximum({0}, 0)",
    "log1p": "tl.log(1.0 + {0})", "expm1": "tl.exp({0}) - 1.0",
}
_BINARY = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "eq": "{0} == {1}", "ne": "{0} != {1}",
    "lt": "{0} < {1}", "le": "{0} <= {1}", "gt": "{0} > {1}", "ge": "{0} >= {1}",
    "bitwise_and": "{0} & {1}", "bitwise_or": "{0} | {1}", "bitwise_xor": "{0} ^ {1}",
    "logical_and": "({0} != 0) & ({1} != 0)", "logical_or": "({0} != 0) | ({1} != 0)",
    "maximum": "tl.maximum({0}, {1})", "minimum": "tl.minimum({0}, {1})",
    "floor_divide": "_floor_div({0}, {1})", "remainder": "_remainder({0}, {1})", "fmod": "{0} % {1}",
}
_PASS_THROUGH = {"lift_fresh_copy", "alias", "detach", "clone", "contiguous", "_to_copy", "scalar_tensor",
                 "where", "clamp", "clamp_min", "clamp_max", "div", "rsub", "pow", "index", "select"}
_INDEX_PARAMS = ("b", "h", "q_idx", "kv_idx")

def _pick(mine: str, op: str, other: str, g: str) -> str:
    """Gradient share of max/min: all of it when strictly chosen, half on ties (torch's rule)."""
    return f"tl.where({mine} {op} {other}, {g}, tl.where({mine} == {other}, 0.5 * {g}, 0.0))"


# d(out)/d(input) for the differentiable ops, as functions of (g, args, out) -> {arg position: expr}.
_GRAD_RULES: dict[str, Callable] = {
    "add": lambda g, a, o, k: {0: g, 1: f"{g} * {k.get('alpha', 1)}"},
    "sub": lambda g, a, o, k: {0: g, 1: f"-{g} * {k.get('alpha', 1)}"},
    "rsub": lambda g, a, o, k: {0: f"-{g} * {k.get('alpha', 1)}", 1: g},
    "mul": lambda g, a, o, k: {0: f"{g} * {a[1]}", 1: f"{g} * {a[0]}"},
    "div": lambda g, a, o, k: {0: f"{g} / {a[1]}", 1: f"-{g} * {o} / {a[1]}"},
    "neg": lambda g, a, o, k: {0: f"-{g}"},
    "exp": lambda g, a, o, k: {0: f"{g} * {o}"},
    "exp2": lambda g, a, o, k: {0: f"{g} * {o} * 0.6931471805599453"},
    "log": lambda g, a, o, k: {0: f"{g} / {a[0]}"},
    "log2": lambda g, a, o, k: {0: f"{g} / ({a[0]} * 0.6931471805599453)"},
    "tanh": lambda g, a, o, k: {0: f"{g} * (1.0 - {o} * {o})"},
    "sigmoid": lambda g, a, o, k: {0: f"{g} * {o} * (1.0 - {o})"},
    "sqrt": lambda g, a, o, k: {0: f"{g} * 0.5 / {o}"},
    "rsqrt": lambda g, a, o, k: {0: f"{g} * -0.5 * {o} * {o} * {o}"},
    "reciprocal": lambda g, a, o, k: {0: f"-{g} * {o} * {o}"},
    "abs": lambda g, a, o, k: {0: f"tl.where({a[0]} > 0, {g}, tl.where({a[0]} < 0, -{g}, 0.0))"},
    "relu": lambda g, a, o, k: {0: f"tl.where({a[0]} > 0, {g}, 0.0)"},
    "where": lambda g, a, o, k: {1: f"tl.where({a[0]}, {g}, 0.0)", 2: f"tl.where({a[0]}, 0.0, {g})"},
    "maximum": lambda g, a, o, k: {0: _pick(a[0], ">", a[1], g), 1: _pick(a[1], ">", a[0], g)},
    "minimum": lambda g, a, o, k: {0: _pick(a[0], "<", a[1], g), 1: _pick(a[1], "<", a[0], g)},
    "clamp": lambda g, a, o, k: {0: f"tl.where({o} == {a[0]}, {g}, 0.0)"},
    "clamp_min": lambda g, a, o, k: {0: f"tl.where({o} == {a[0]}, {g}, 0.0)"},
    "clamp_max": lambda g, a, o, k: {0: f"tl.where({o} == {a[0]}, {g}, 0.0)"},
    "_to_copy": lambda g, a, o, k: {0: g},
    "clone": lambda g, a, o, k: {0: g}, "alias": lambda g, a, o, k: {0: g},
    "pow": lambda g, a, o, k: {0: {2.0: f"2.0 * {g} * {a[0]}", 3.0: f"3.0 * {g} * {a[0]} * {a[0]}",
                                   0.5: f"{g} * 0.5 / {o}", -1.0: f"-{g} * {o} * {o}", 1.0: g}[float(a[1])]},
    "log1p": lambda g, a, o, k: {0: f"{g} / (1.0 + {a[0]})"},
    "expm1": lambda g, a, o, k: {0: f"{g} * ({o} + 1.0)"},
    "sin": lambda g, a, o, k: {0: f"{g} * tl.cos({a[0]})"},
    "cos": lambda g, a, o, k: {0: f"-{g} * tl.sin({a[0]})"},
    # piecewise constant: zero derivative almost everywhere (torch's convention)
    "floor": lambda g, a, o, k: {}, "ceil": lambda g, a, o, k: {}, "sign": lambda g, a, o, k: {},
}

_PRELUDE = '''import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _floor_div(a, b):
    # Python / torch floor division, whatever the rounding of the hardware's integer division.
    quotient = a // b
    rest = a - quotient * b
    return tl.where((rest != 0) & ((rest < 0) != (b < 0)), quotient - 1, quotient)


@triton.jit
def _remainder(a, b):
    return a - _floor_div(a, b) * b


@triton.jit
def _load(base, offset, ok):
    # Bounds-safe load of a captured tensor; the mask is broadcast to the offsets' shape.
    return tl.load(base + offset, mask=(ok & (offset == offset)) != 0, other=0)


@triton.jit
def _atomic_add(base, offset, value, ok):
    tl.atomic_add(base + offset, value, mask=(ok & (offset == offset)) != 0, sem="relaxed")
'''


@dataclass
class _BufferView:
    """A captured tensor (slot ``slot``) with some leading dims fixed by ``select``."""

    slot: int
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    grad_strides: tuple[int, ...]  # contiguous strides of the fp32 gradient buffer
    offset: str = "0"
    grad_offset: str = "0"


@dataclass
class _Value:
    expr: str
    dtype: torch.dtype | None
    deps: frozenset = frozenset()
    view: _BufferView | None = None


@dataclass
class _Load:
    name: str
    slot: int
    grad_offset: str
    ok: str
    deps: frozenset


def _literal(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if value != value:
            return 'float("nan")'
        if value in (float("inf"), float("-inf")):
            return 'float("inf")' if value > 0 else 'float("-inf")'
    if isinstance(value, (int, float)):
        return repr(value)
    raise Unsupported(f"constant {value!r} of type {type(value).__name__} cannot be emitted")


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    return getattr(packet, "__name__", str(target)).split(".")[-1]


class _Emitter:
    """Emit the body of one traced mod: forward statements, and optionally the derivative."""

    def __init__(self, traced: Traced, buffers: list[torch.Tensor], grad_slots: tuple[int, ...]):
        self.traced, self.buffers, self.grad_slots = traced, buffers, grad_slots
        self.lines: list[str] = []
        self.values: dict[torch.fx.Node, _Value] = {}
        self.loads: dict[torch.fx.Node, _Load] = {}
        self.scalar_loads: dict[torch.fx.Node, _Value] = {}
        self.output: _Value | None = None

    def arg(self, a) -> _Value:
        if isinstance(a, torch.fx.Node):
            value = self.values[a]
            if value.view is not None:
                if a not in self.scalar_loads:
                    self.scalar_loads[a] = self._scalar_buffer(a, value.view)
                return self.scalar_loads[a]
            return value
        return _Value(_literal(a), None)

    def forward(self) -> None:
        params = ["score", *_INDEX_PARAMS] if self.traced.kind == "score_mod" else list(_INDEX_PARAMS)
        deps_of = {"score": "score", "b": "b", "h": "h", "q_idx": "q", "kv_idx": "kv"}
        placeholders = iter(params)
        for node in self.traced.graph_module.graph.nodes:
            if node.op == "placeholder":
                name = next(placeholders)
                dtype = torch.float32 if name == "score" else torch.int32
                self.values[node] = _Value(name, dtype, frozenset({deps_of[name]}))
            elif node.op == "get_attr":
                t = getattr(self.traced.graph_module, node.target)
                slot = _slot(self.buffers, t)
                grad_strides = tuple(torch.empty(t.shape, device="meta").stride())
                view = _BufferView(slot, t.dtype, tuple(t.shape), tuple(t.stride()), grad_strides)
                self.values[node] = _Value(f"buf{slot}", t.dtype, frozenset(), view)
            elif node.op == "call_function":
                self.values[node] = self._call(node)
            elif node.op == "output":
                result = node.args[0]
                result = result[0] if isinstance(result, (tuple, list)) else result
                self.output = self.arg(result)

    def _emit(self, node: torch.fx.Node, expr: str, deps, comment: str) -> _Value:
        name = f"v_{node.name}"
        self.lines.append(f"# {comment}")
        self.lines.append(f"{name} = {expr}")
        dtype = getattr(node.meta.get("val"), "dtype", None)
        return _Value(name, dtype, frozenset(deps))

    def _call(self, node: torch.fx.Node) -> _Value:
        op = _op_name(node)
        if op not in _UNARY and op not in _BINARY and op not in _PASS_THROUGH and op not in ("zeros_like",
                                                                                            "ones_like"):
            raise Unsupported(
                f"{self.traced.kind} uses aten.{op}, which the Triton flex code generator does not support"
            )
        if op == "index":
            return self._index(node)
        if op == "select":
            return self._select(node)
        if op in ("lift_fresh_copy", "alias", "detach", "clone", "contiguous") and self.values.get(
                node.args[0]) is not None and self.values[node.args[0]].view is not None:
            return self.values[node.args[0]]
        args = [self.arg(a) for a in node.args]
        deps = frozenset().union(*(a.deps for a in args)) if args else frozenset()
        comment = f"aten.{op}({', '.join(a.expr for a in args)})"
        return self._emit(node, self._expression(node, op, args), deps, comment)

    def _expression(self, node, op: str, args: list[_Value]) -> str:
        x = [a.expr for a in args]
        kwargs = node.kwargs
        if op in _UNARY:
            return _UNARY[op].format(*x)
        if op in ("add", "sub") and kwargs.get("alpha", 1) != 1:
            return _BINARY[op].format(x[0], f"{x[1]} * {kwargs['alpha']}")
        if op in _BINARY:
            return _BINARY[op].format(*x)
        if op in ("lift_fresh_copy", "alias", "detach", "clone", "contiguous"):
            return x[0]
        if op == "rsub":
            return f"{x[1]} - {x[0]} * {kwargs.get('alpha', 1)}"
        if op == "scalar_tensor":
            return x[0]
        if op in ("zeros_like", "ones_like"):
            return f"{x[0]} * 0" + (" + 1" if op == "ones_like" else "")
        if op == "where":
            return f"tl.where({x[0]}, {x[1]}, {x[2]})"
        if op in ("clamp", "clamp_min", "clamp_max"):
            return self._clamp(op, node, x)
        if op == "_to_copy":
            dtype = kwargs.get("dtype")
            return x[0] if dtype is None else f"({x[0]}).to({_TL_DTYPES[dtype]})"
        if op == "div":
            return self._div(node, args)
        if op == "pow":
            return self._pow(node, x)
        raise Unsupported(f"{self.traced.kind} uses aten.{op} in a form the code generator does not support")

    def _clamp(self, op: str, node, x: list[str]) -> str:
        low = x[1] if op in ("clamp", "clamp_min") and len(x) > 1 and x[1] != "None" else None
        high = x[2] if op == "clamp" and len(x) > 2 else (x[1] if op == "clamp_max" else None)
        low = node.kwargs.get("min", low) if op == "clamp" else low
        expr = x[0]
        if low is not None and low != "None":
            expr = f"tl.maximum({expr}, {low})"
        if high is not None and high != "None":
            expr = f"tl.minimum({expr}, {high})"
        return expr

    def _div(self, node, args: list[_Value]) -> str:
        a, b = args[0].expr, args[1].expr
        mode = node.kwargs.get("rounding_mode")
        integral = all(v.dtype is None or not v.dtype.is_floating_point for v in args) and not any(
            "." in v.expr or "float" in v.expr for v in args if v.dtype is None)
        if mode == "floor":
            return f"_floor_div({a}, {b})" if integral else f"tl.floor({a} / {b})"
        if mode == "trunc":
            return f"{a} // {b}" if integral else f"({a} / {b}).to(tl.int32).to(tl.float32)"
        return f"({a}).to(tl.float32) / {b}" if integral else f"{a} / {b}"

    def _pow(self, node, x: list[str]) -> str:
        exponent = node.args[1]
        forms = {2: "{0} * {0}", 3: "{0} * {0} * {0}", 0.5: "tl.sqrt({0})", -1: "1.0 / {0}", 1: "{0}"}
        if isinstance(exponent, torch.fx.Node) or exponent not in forms:
            raise Unsupported(f"{self.traced.kind} uses aten.pow with exponent {exponent!r}; only 2, 3, 0.5, "
                              "1 and -1 are supported by the Triton flex code generator")
        return forms[exponent].format(x[0])

    def _select(self, node: torch.fx.Node) -> _Value:
        base = self.values[node.args[0]]
        if base.view is None:
            raise Unsupported(f"{self.traced.kind} uses aten.select on a computed value; "
                              "only captured tensors can be indexed")
        view, dim, index = base.view, node.args[1], node.args[2]
        if isinstance(index, torch.fx.Node):
            raise Unsupported(f"{self.traced.kind} selects from a captured tensor with a tensor index")
        index = index + view.sizes[dim] if index < 0 else index
        sizes = view.sizes[:dim] + view.sizes[dim + 1:]
        new = _BufferView(view.slot, view.dtype, sizes, view.strides[:dim] + view.strides[dim + 1:],
                          view.grad_strides[:dim] + view.grad_strides[dim + 1:],
                          f"{view.offset} + {index * view.strides[dim]}",
                          f"{view.grad_offset} + {index * view.grad_strides[dim]}")
        return _Value(base.expr, base.dtype, frozenset(), new)

    def _scalar_buffer(self, node: torch.fx.Node, view: _BufferView) -> _Value:
        if any(size != 1 for size in view.sizes):
            raise Unsupported(f"{self.traced.kind} uses a captured tensor of shape {tuple(view.sizes)} "
                              "without indexing every dimension; index it with b / h / q_idx / kv_idx")
        return self._load(node, view, [])

    def _index(self, node: torch.fx.Node) -> _Value:
        view = self.values[node.args[0]].view
        indices = node.args[1]
        if view is None:
            raise Unsupported(f"{self.traced.kind} indexes a computed value; "
                              "only captured tensors can be indexed")
        if len(indices) != len(view.sizes) or any(i is None for i in indices):
            raise Unsupported(
                f"{self.traced.kind} indexes a captured tensor of shape {tuple(view.sizes)} with "
                f"{len(indices)} index tensors; every dimension must be indexed by one expression"
            )
        return self._load(node, view, [self.arg(i) for i in indices])

    def _load(self, node, view: _BufferView, index_values: list[_Value]) -> _Value:
        name = f"v_{node.name}"
        lines = [f"# aten.index(buf{view.slot}, [{', '.join(v.expr for v in index_values)}]): "
                 f"captured tensor {view.slot}, {str(view.dtype).removeprefix('torch.')} {list(view.sizes)}"]
        ok_terms, offset_terms, grad_terms = [], [view.offset] if view.offset != "0" else [], [view.grad_offset]
        for dim, value in enumerate(index_values):
            size, idx = view.sizes[dim], f"{name}_i{dim}"
            if value.dtype is not None and value.dtype.is_floating_point:
                raise Unsupported(f"{self.traced.kind} indexes a captured tensor with a floating-point index")
            lines.append(f"{idx} = tl.where({value.expr} < 0, {value.expr} + {size}, {value.expr})")
            ok_terms.append(f"({idx} >= 0) & ({idx} < {size})")
            offset_terms.append(f"{idx} * {view.strides[dim]}")
            grad_terms.append(f"{idx} * {view.grad_strides[dim]}")
        deps = frozenset().union(*(v.deps for v in index_values)) if index_values else frozenset()
        ok = f"{name}_ok"
        lines.append(f"{name}_offset = {' + '.join(offset_terms) or '0'}")
        lines.append(f"{ok} = {' & '.join(ok_terms) or f'{name}_offset >= 0'}")
        load = f"_load(buf{view.slot}, {name}_offset, {ok})"
        if view.dtype in (torch.float16, torch.bfloat16):
            load += ".to(tl.float32)"
        lines.append(f"{name} = {load}")
        self.lines.extend(lines)
        self.loads[node] = _Load(name, view.slot, " + ".join(t for t in grad_terms if t != "0") or "0", ok, deps)
        dtype = torch.float32 if view.dtype in (torch.float16, torch.bfloat16) else view.dtype
        return _Value(name, dtype, deps | {f"buf{view.slot}"})

    def _needs_grad(self, a) -> bool:
        if not isinstance(a, torch.fx.Node) or a not in self.values:
            return False
        value = self.arg(a) if self.values[a].view is not None else self.values[a]
        wanted = {"score", *(f"buf{s}" for s in self.grad_slots)}
        return value.dtype is not None and value.dtype.is_floating_point and bool(value.deps & wanted)

    def backward(self) -> str:
        """Emit the reverse pass after ``forward``; returns the expression of d(score)."""
        graph = self.traced.graph_module.graph
        out = next(n for n in graph.nodes if n.op == "output").args[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        grads: dict[torch.fx.Node, list[str]] = {out: ["grad"]} if self._needs_grad(out) else {}
        d_score = "grad * 0.0"
        self.lines.append("# ---- derivative (reverse mode over the same trace) ----")
        for node in reversed(list(graph.nodes)):
            terms = grads.pop(node, None)
            if not terms:
                continue
            total = " + ".join(f"({t})" for t in terms)
            if node.op == "placeholder":
                d_score = total
                continue
            d_name = f"d_{node.name}"
            self.lines.append(f"{d_name} = {total}")
            if node in self.loads:
                self._accumulate(self.loads[node], d_name)
                continue
            self._push(node, d_name, grads)
        return d_score

    def _push(self, node: torch.fx.Node, d_name: str, grads: dict) -> None:
        op = _op_name(node)
        wanting = [i for i, a in enumerate(node.args) if self._needs_grad(a)]
        if not wanting:
            return
        rule = _GRAD_RULES.get(op)
        if rule is None:
            raise Unsupported(f"score_mod uses aten.{op} on a differentiable value, and the Triton flex code "
                              "generator has no derivative for it")
        args = [self.arg(a).expr if isinstance(a, torch.fx.Node) else repr(a) for a in node.args]
        terms = rule(d_name, args, self.values[node].expr, node.kwargs)
        for position in wanting:
            if position in terms:
                grads.setdefault(node.args[position], []).append(terms[position])

    def _accumulate(self, load: _Load, d_name: str) -> None:
        if load.slot not in self.grad_slots:
            return
        full = f"tl.where(valid, {d_name}, 0.0)"
        deps = load.deps
        if "score" in deps or {"q", "kv"} <= deps:
            reduced = full
        elif "q" in deps:
            reduced = f"tl.sum({full}, 1, keep_dims=True)"
        elif "kv" in deps:
            reduced = f"tl.sum({full}, 0, keep_dims=True)"
        else:
            reduced = f"tl.sum(tl.sum({full}, 1), 0)"
        self.lines.append("if ACCUMULATE:")
        self.lines.append(f"    # gradient of captured tensor {load.slot}: reduced over the tile, "
                          "added atomically")
        self.lines.append(f"    _atomic_add(gbuf{load.slot}, {load.grad_offset}, {reduced}, {load.ok})")


_BUFS = ", ".join(f"buf{i}" for i in range(MAX_BUFFERS))
_GBUFS = ", ".join(f"gbuf{i}" for i in range(MAX_BUFFERS))


def _function(signature: str, body: list[str], result: str) -> str:
    lines = ["", "", "", "@triton.jit", f"def {signature}:"]
    lines.extend(f"    {line}" for line in body)
    lines.append(f"    return {result}")
    return "\n".join(lines)


def _describe(mod_trace: Traced | None) -> str:
    return "none" if mod_trace is None else f"{len(list(mod_trace.graph_module.graph.nodes))} traced nodes"


def emit_module(key: str, score: Traced | None, mask: Traced | None,
                buffers: list[torch.Tensor], grad_slots: tuple[int, ...]) -> str:
    """The full source of a generated module (see the module docstring for its three functions)."""
    header = [f"# Generated by dispatchattn's Triton flex code generator (v{CODEGEN_VERSION}); do not edit.",
              f"# kernel key {key}", f"# score_mod: {_describe(score)}; mask_mod: {_describe(mask)}"]
    for slot, t in enumerate(buffers):
        grad = f" (gradient accumulated in gbuf{slot})" if slot in grad_slots else ""
        header.append(f"# buf{slot}: captured {str(t.dtype).removeprefix('torch.')} tensor "
                      f"{list(t.shape)}, strides {list(t.stride())}{grad}")
    parts = ["\n".join(header) + "\n" + _PRELUDE]
    index_params = ", ".join(_INDEX_PARAMS)
    if score is not None:
        forward = _Emitter(score, buffers, grad_slots)
        forward.forward()
        signature = f"score_mod(score, {index_params}, {_BUFS})"
        parts.append(_function(signature, forward.lines, forward.output.expr))
        reverse = _Emitter(score, buffers, grad_slots)
        reverse.forward()
        d_score = reverse.backward()
        parts.append(_function(f"score_mod_bwd(score, {index_params}, grad, valid, {_BUFS}, {_GBUFS}, "
                               "ACCUMULATE: tl.constexpr)", reverse.lines, f"{d_score} + grad * 0.0"))
    else:
        parts.append(_function(f"score_mod(score, {index_params}, {_BUFS})", ["# identity"], "score"))
        parts.append(_function(f"score_mod_bwd(score, {index_params}, grad, valid, {_BUFS}, {_GBUFS}, "
                               "ACCUMULATE: tl.constexpr)", ["# identity"], "grad"))
    if mask is not None:
        emitter = _Emitter(mask, buffers, grad_slots)
        emitter.forward()
        parts.append(_function(f"mask_mod({index_params}, {_BUFS})", emitter.lines, emitter.output.expr))
    else:
        parts.append(_function(f"mask_mod({index_params}, {_BUFS})", ["# every key attended"],
                               "(q_idx >= 0) & (kv_idx >= 0)"))
    return "".join(parts) + "\n"
