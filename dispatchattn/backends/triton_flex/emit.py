"""Emission for ``codegen``: one named Triton statement per traced aten op (a comment names the op), then the
reverse-mode derivative of the score_mod from the same graph (``_GRAD_RULES``).

``emit_module`` returns the whole source of a generated module: ``score_mod``, ``score_mod_bwd`` and
``mask_mod`` with the fixed signatures the kernels in ``kernels.py`` expect (see ``codegen``'s docstring).
The captured tensors arrive as one tuple, ``bufs`` (``bufs[i]`` is captured tensor ``i``), and the fp32
gradient buffers as another, ``gbufs`` (``gbufs[j]`` for the ``j``-th slot of ``grad_slots``).
An op outside the supported set raises ``Unsupported`` with the sentence used as the refusal reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Traced:
    """One mod traced to an FX graph, and the captured tensors it reads."""

    kind: str  # "score_mod" or "mask_mod"
    graph_module: torch.fx.GraphModule
    buffers: list[torch.Tensor]  # in order of first use, deduplicated by identity


#: Bump when the emitted code changes meaning: it is part of every cache key.
#: 2: captured tensors as the tuples ``bufs`` / ``gbufs`` (any number) instead of ``buf0..buf3`` / ``gbuf0..gbuf3``.
CODEGEN_VERSION = 2


def buffer_slot(buffers: list[torch.Tensor], tensor: torch.Tensor) -> int:
    """Index of a captured tensor among the kernel's buffers (by identity)."""
    return next(i for i, seen in enumerate(buffers) if seen is tensor)


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
                slot = buffer_slot(self.buffers, t)
                grad_strides = tuple(torch.empty(t.shape, device="meta").stride())
                view = _BufferView(slot, t.dtype, tuple(t.shape), tuple(t.stride()), grad_strides)
                self.values[node] = _Value(f"bufs[{slot}]", t.dtype, frozenset(), view)
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
        lines = [f"# aten.index(bufs[{view.slot}], [{', '.join(v.expr for v in index_values)}]): "
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
        load = f"_load(bufs[{view.slot}], {name}_offset, {ok})"
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
        self.lines.append(f"    _atomic_add(gbufs[{self.grad_slots.index(load.slot)}], {load.grad_offset}, {reduced}, "
                          f"{load.ok})")




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
        grad = f" (gradient accumulated in gbufs[{grad_slots.index(slot)}])" if slot in grad_slots else ""
        header.append(f"# bufs[{slot}]: captured {str(t.dtype).removeprefix('torch.')} tensor "
                      f"{list(t.shape)}, strides {list(t.stride())}{grad}")
    parts = ["\n".join(header) + "\n" + _PRELUDE]
    index_params = ", ".join(_INDEX_PARAMS)
    if score is not None:
        forward = _Emitter(score, buffers, grad_slots)
        forward.forward()
        signature = f"score_mod(score, {index_params}, bufs)"
        parts.append(_function(signature, forward.lines, forward.output.expr))
        reverse = _Emitter(score, buffers, grad_slots)
        reverse.forward()
        d_score = reverse.backward()
        parts.append(_function(f"score_mod_bwd(score, {index_params}, grad, valid, bufs, gbufs, "
                               "ACCUMULATE: tl.constexpr)", reverse.lines, f"{d_score} + grad * 0.0"))
    else:
        parts.append(_function(f"score_mod(score, {index_params}, bufs)", ["# identity"], "score"))
        parts.append(_function(f"score_mod_bwd(score, {index_params}, grad, valid, bufs, gbufs, "
                               "ACCUMULATE: tl.constexpr)", ["# identity"], "grad"))
    if mask is not None:
        emitter = _Emitter(mask, buffers, grad_slots)
        emitter.forward()
        parts.append(_function(f"mask_mod({index_params}, bufs)", emitter.lines, emitter.output.expr))
    else:
        parts.append(_function(f"mask_mod({index_params}, bufs)", ["# every key attended"],
                               "(q_idx >= 0) & (kv_idx >= 0)"))
    return "".join(parts) + "\n"
