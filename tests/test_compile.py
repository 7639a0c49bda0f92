"""``torch.compile(fullgraph=True)`` around ``da.attention``: no graph break, no recompile on a repeated shape,
results equal eager, forward and backward, static and ``dynamic=True``, on every backend that runs on CPU.

Graph breaks are counted with dynamo's counters; ``fullgraph=True`` would raise on one anyway.  Eager results
are the oracle: the compiled graph runs the same backend on the same inputs, so the tolerance is fp32 rounding
of a different kernel schedule (measured <= 2e-7 here; 1e-5 allowed).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import dispatchattn as da

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _inputs(shape=(2, 4, 40, 16), kv_heads=None, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, s, d = shape
    q = torch.randn(b, h, s, d, generator=gen)
    k = torch.randn(b, kv_heads or h, s, d, generator=gen)
    v = torch.randn(b, kv_heads or h, s, d, generator=gen)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _check(fn, inputs, grad: bool, dynamic: bool = False):
    """Compile ``fn``, compare with eager (forward, and grads when ``grad``), then call again: no recompile."""
    eager_inputs = [t.detach().clone().requires_grad_(grad) for t in inputs]
    expected = fn(*eager_inputs)
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    out = compiled(*inputs)
    torch.testing.assert_close(out, expected, **TOL)
    if grad:
        gen = torch.Generator().manual_seed(1)
        dout = torch.randn(out.shape, generator=gen)
        out.backward(dout)
        expected.backward(dout)
        for got, want in zip(inputs, eager_inputs):
            torch.testing.assert_close(got.grad, want.grad, **TOL)
    assert _graph_breaks() == 0, dict(counters["graph_break"])
    with torch.compiler.set_stance("fail_on_recompile"):
        again = compiled(*[t.detach().clone().requires_grad_(grad) for t in inputs])
    torch.testing.assert_close(again, expected, **TOL)


STRUCTURED = {
    "none": {},
    "is_causal": {"is_causal": True},
    "causal": {"mask_mod": da.masks.causal()},
    "window_and_causal": {"mask_mod": da.masks.sliding_window(7) & da.masks.causal()},
    "bottom_right": {"mask_mod": da.masks.causal(bottom_right=True)},
    "alibi": {"score_mod": da.scores.alibi(torch.linspace(0.1, 0.8, 4))},
}


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("case", sorted(STRUCTURED))
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_structured_mods_compile_without_breaks(backend, case, grad):
    kwargs = STRUCTURED[case]

    def fn(q, k, v):
        return da.attention(q, k, v, backend=backend, **kwargs)

    _check(fn, _inputs(grad=grad), grad)


def test_softcap_and_gqa_on_reference():
    def fn(q, k, v):
        return da.attention(q, k, v, enable_gqa=True, score_mod=da.scores.softcap(5.0), is_causal=True,
                            backend="reference")

    _check(fn, _inputs(kv_heads=2, grad=True), grad=True)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_lambda_mods_compile(backend):
    bias = torch.randn(40, 40, generator=torch.Generator().manual_seed(3))

    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=lambda b, h, qi, ki: (qi - ki).abs() <= 9,
                            score_mod=(lambda s, b, h, qi, ki: s + bias[qi, ki]) if backend == "reference" else None,
                            backend=backend)

    _check(fn, _inputs(grad=True), grad=True)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_dynamic_shapes(backend):
    def fn(q, k, v):
        return da.attention(q, k, v, is_causal=True, scale=0.3, backend=backend)

    _check(fn, _inputs(grad=True), grad=True, dynamic=True)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for seq in (33, 57):  # new lengths: a new graph each (sizes are specialised), never a break
        q, k, v = _inputs((1, 4, seq, 16), seed=seq)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), **TOL)
    assert _graph_breaks() == 0


def test_automatic_choice_and_alternating_shapes_do_not_recompile():
    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=da.masks.causal())

    compiled = torch.compile(fn, fullgraph=True)
    short, long = _inputs((1, 2, 24, 16)), _inputs((1, 2, 48, 16), seed=1)
    compiled(*short), compiled(*long)
    with torch.compiler.set_stance("fail_on_recompile"):
        for inputs in (short, long, short, long):
            torch.testing.assert_close(compiled(*inputs), fn(*inputs), **TOL)
    assert _graph_breaks() == 0


def test_use_backends_inside_compiled_region_is_honoured():
    def fn(q, k, v):
        with da.use_backends("reference"):
            return da.attention(q, k, v, is_causal=True)

    q, k, v = _inputs()
    _check(fn, [q, k, v], grad=False)
    decided = da.compiled.DECIDED
    last = getattr(decided, f"d{decided.count - 1}")[1]
    assert last.backend == "reference" and last.decided_by == "user"


def test_forced_backend_that_cannot_run_raises_while_compiling():
    def fn(q, k, v):
        return da.attention(q, k, v, score_mod=da.scores.softcap(5.0), backend="sdpa")

    with pytest.raises(Exception, match="softcap"):
        torch.compile(fn, fullgraph=True)(*_inputs())


@pytest.mark.parametrize("level", ["1", "2"])
def test_explain_inside_compiled_region(monkeypatch, caplog, level):
    monkeypatch.setenv("DISPATCHATTN_EXPLAIN", level)

    def fn(q, k, v):
        return da.attention(q, k, v, is_causal=True, backend="reference") + 0.0

    inputs = _inputs((1, 2, 20 + int(level), 16))  # a shape of its own: level 1 logs each decision once
    runs = int(da.compiled.EXPLAIN_RUNS)
    with caplog.at_level(logging.INFO, logger="dispatchattn"):
        compiled = torch.compile(fn, fullgraph=True)
        compiled(*inputs)
        compiled(*inputs)
    assert int(da.compiled.EXPLAIN_RUNS) - runs == (2 if level == "2" else 0)  # the op ran in each graph run
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dispatchattn: reference")]
    assert _graph_breaks() == 0
    # Level 1: reported when the graph is traced, not again when it runs; level 2: on every run (by an op).
    assert len(lines) == int(level), lines
    assert all("Selected backend: reference" in line for line in lines)


def test_torch_flex_compiles_forward():
    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=da.masks.sliding_window(16) & da.masks.causal(),
                            score_mod=da.scores.softcap(4.0), backend="torch_flex")

    with torch.no_grad():
        _check(fn, _inputs((1, 2, 64, 16)), grad=False)


def test_torch_flex_lambda_mask_compiles():
    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=lambda b, h, qi, ki: (qi // 16) >= (ki // 16), backend="torch_flex")

    with torch.no_grad():
        _check(fn, _inputs((1, 2, 64, 16)), grad=False)


def test_triton_flex_compiles_through_its_custom_ops():
    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=da.masks.sliding_window(7) & da.masks.causal(),
                            score_mod=da.scores.softcap(5.0), enable_gqa=True, backend="triton_flex")

    _check(fn, _inputs((1, 4, 40, 16), kv_heads=2, grad=True), grad=True)


def _decoding_inputs(seed=0):
    """One new query row per sequence against a 77-key cache, GQA 4:2 (the decoding kernel's case)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = (torch.randn(2, 2, 77, 16, generator=gen) for _ in range(2))
    return q, k, v


def _float64_attention(q, k, v, keep):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_triton_flex_decoding_compiles_through_its_custom_op():
    q, k, v = _decoding_inputs()
    prefix = da.masks.prefix_lm(30)

    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=prefix, enable_gqa=True, backend="triton_flex")

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    with torch.no_grad():
        out = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v)
        expected = fn(q, k, v)
    assert _graph_breaks() == 0
    ops_called = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert "dispatchattn.triton_flex_decode.default" in ops_called, ops_called
    keep = prefix.bind(1, 77)(None, None, torch.zeros(1, 1, dtype=torch.long), torch.arange(77)[None, :])
    assert 0 < int(keep.sum()) < 77  # a real mask, evaluated by its own definition
    keep = keep.expand(2, 4, 1, 77)
    # measured over 5 seeds: 2.8e-7
    torch.testing.assert_close(out.double(), _float64_attention(q, k, v, keep), atol=5e-7, rtol=0)
    torch.testing.assert_close(out, expected, **TOL)


def test_triton_flex_decoding_op_passes_opcheck():
    from dispatchattn.backends.triton_flex import ops
    from dispatchattn.backends.triton_flex.autograd import heuristic_config
    from dispatchattn.capabilities import probe

    q, k, v = _decoding_inputs(seed=3)
    config = heuristic_config("decode", 16, torch.float32, "cpu")
    with torch.no_grad():
        spec = da.compiled.build_spec(q, k, v, mask_mod=da.masks.causal(bottom_right=True), enable_gqa=True)
        plan = ops.plan(spec, None, spec.mask, config, config, q.device, probe(q.device))
    assert isinstance(plan, ops.DecodePlan)
    args = (q, k, v, [], plan.group_lists, plan.kernel_key, 0.25, plan.config, 3)  # 3 splits of the 77 keys
    torch.library.opcheck(ops.triton_flex_decode, args)
    out, lse = ops.triton_flex_decode(*args)
    keep = torch.ones(2, 4, 1, 77, dtype=torch.bool)  # bottom-right causal with one query keeps every key
    reference = _float64_attention(q * (0.25 * 16**0.5), k, v, keep)
    torch.testing.assert_close(out.double(), reference, atol=5e-7, rtol=0)


def test_triton_flex_with_captured_tensors_is_refused_while_compiling():
    slopes = torch.linspace(0.1, 0.8, 4)

    def fn(q, k, v):
        return da.attention(q, k, v, score_mod=da.scores.alibi(slopes), backend="triton_flex")

    with pytest.raises(Exception, match="forced backend cannot run this call"):
        torch.compile(fn, fullgraph=True)(*_inputs())


def test_explain_op_passes_opcheck():
    torch.library.opcheck(da.compiled.explain_run, (torch.zeros((), dtype=torch.int64), "dispatchattn: a decision"))


def test_triton_flex_ops_pass_opcheck():
    from dispatchattn.backends.triton_flex import codegen, ops
    from dispatchattn.backends.triton_flex.autograd import heuristic_config
    from dispatchattn.capabilities import probe

    q, k, v = _inputs((1, 2, 40, 16), grad=True)
    config = heuristic_config("fwd", 16, torch.float32, "cpu")
    spec = da.compiled.build_spec(q, k, v, mask_mod=da.masks.causal())
    plan = ops.plan(spec, None, spec.mask, config, config, q.device, probe(q.device))
    assert codegen.generated_by_key(plan.kernel_key).buffers == []
    fwd_args = (q, k, v, [], plan.kv_lists, plan.bwd_lists, plan.kernel_key, 0.25, plan.config, plan.bwd_config)
    torch.library.opcheck(ops.triton_flex_fwd, fwd_args)
    out, lse = ops.triton_flex_fwd(*fwd_args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    bwd_args = (q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dout, None, [], plan.bwd_lists,
                plan.kernel_key, 0.25, plan.bwd_config)
    torch.library.opcheck(ops.triton_flex_bwd, bwd_args)


def test_compiled_call_is_guarded_on_attention_itself_not_its_code_or_defaults():
    """Dynamo inlines ``compiled.traced_attention`` in place of ``attention`` (``substitute_in_graph``): the graph
    is guarded on ``attention``'s identity, not on its code nor the defaults of the arguments a call leaves out
    (each guard is checked on every call: ~0.35 us each with the caches cold after a kernel)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    def fn(q, k, v):
        return da.attention(q, k, v, is_causal=True)

    inputs = _inputs()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*inputs), fn(*inputs), **TOL)
    [entry] = _debug_get_cache_entry_list(fn.__code__)
    guards = "\n".join(entry.guard_manager.code_parts)
    assert "G['da'].attention," in guards  # the function object itself
    assert "__defaults__" not in guards and "__kwdefaults__" not in guards and "attention.__code__" not in guards
    assert "dispatchattn_dot_api" not in guards  # nor the names attention's compiling branch reads


@pytest.mark.parametrize("reader", ["backing dict", "by name"])
def test_environment_allow_list_is_read_and_guarded(monkeypatch, reader):
    """Both ways traced code reads the environment: os.environ's backing dict with bytes keys (POSIX) and
    ``os.environ.get`` by name (where the backing dict is keyed otherwise, e.g. Windows)."""
    if reader == "by name":
        monkeypatch.setattr(da.compiled, "TRACED_ENVIRON", da.envs._EnvironByBytes())

    def fn(q, k, v):
        return da.attention(q, k, v, is_causal=True)

    def last_backend():
        decided = da.compiled.DECIDED
        return getattr(decided, f"d{decided.count - 1}")[1].backend

    compiled = torch.compile(fn, fullgraph=True)
    inputs = _inputs()
    monkeypatch.setenv("DISPATCHATTN_BACKEND", "reference")
    torch.testing.assert_close(compiled(*inputs), fn(*inputs), **TOL)
    assert last_backend() == "reference"
    monkeypatch.setenv("DISPATCHATTN_BACKEND", "sdpa")  # dynamo guards os.environ: a new graph, a new decision
    torch.testing.assert_close(compiled(*inputs), fn(*inputs), **TOL)
    assert last_backend() == "sdpa"
    assert _graph_breaks() == 0


def test_triton_flex_falls_back_when_its_ops_cannot_run_the_call():
    mask = torch.rand(40, 40, generator=torch.Generator().manual_seed(4)) > 0.3  # a dense mask: a captured tensor

    def fn(q, k, v):
        with da.use_backends("triton_flex", "reference"):
            return da.attention(q, k, v, attn_mask=mask)

    _check(fn, _inputs(), grad=False)
    decided = da.compiled.DECIDED
    decision = getattr(decided, f"d{decided.count - 1}")[1]
    assert decision.backend == "reference"
    assert "custom ops" in decision.reasons["triton_flex"][0]


def _strided_keep(b, h, q_idx, kv_idx):  # a user's mask_mod without a closure: every third key dropped
    return (kv_idx % 3) != 1


def _distance_penalty(score, b, h, q_idx, kv_idx):  # a user's score_mod without a closure
    return score - 0.05 * (q_idx - kv_idx).abs()


def test_triton_flex_runs_closure_free_user_functions_through_its_ops():
    """A function without a closure is a constant at trace time: the ops' kernel is generated from it."""

    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=_strided_keep, score_mod=_distance_penalty, backend="triton_flex")

    q, k, v = _inputs(grad=True)
    _check(fn, [q, k, v], grad=True)  # forward and backward equal eager, no break, no recompile
    decided = da.compiled.DECIDED
    assert getattr(decided, f"d{decided.count - 1}")[1].backend == "triton_flex"
    with torch.no_grad():
        out = torch.compile(fn, fullgraph=True)(q, k, v)
    idx = torch.arange(40)
    keep = _strided_keep(None, None, idx[:, None], idx[None, :]).expand(2, 4, 40, 40)
    bias = -0.05 * (idx[:, None] - idx[None, :]).abs().double()
    scores = q.detach().double() @ k.detach().double().transpose(-1, -2) / 4 + bias
    reference = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v.detach().double()
    torch.testing.assert_close(out.double(), reference, atol=8e-7, rtol=0)  # measured <= 6.1e-7 over 5 seeds


def test_triton_flex_with_a_closure_mod_falls_back_while_compiling():
    """A closure is opaque at trace time, where the ops' kernel is generated: planning it from a stand-in would
    compute another mask, so the call goes to the next allowed backend (or a forced choice is refused)."""
    period = 3

    def strided(b, h, q_idx, kv_idx):  # every third key dropped, through a closure cell
        return (kv_idx % period) != 1

    def fallback(q, k, v):
        with da.use_backends("triton_flex", "reference"):
            return da.attention(q, k, v, mask_mod=strided)

    q, k, v = _inputs()
    out = torch.compile(fallback, fullgraph=True)(q, k, v)
    keep = strided(None, None, torch.zeros(40, 1, dtype=torch.long), torch.arange(40)[None, :]).expand(2, 4, 40, 40)
    # measured over 5 seeds: 4.1e-7 (fp32 reference backend)
    torch.testing.assert_close(out.double(), _float64_attention(q, k, v, keep), atol=8e-7, rtol=0)
    decided = da.compiled.DECIDED
    decision = getattr(decided, f"d{decided.count - 1}")[1]
    assert decision.backend == "reference" and "closure" in decision.reasons["triton_flex"][0]

    def forced(q, k, v):
        return da.attention(q, k, v, mask_mod=strided, backend="triton_flex")

    with pytest.raises(Exception, match="is opaque at trace time"):
        torch.compile(forced, fullgraph=True)(q, k, v)


def test_a_different_user_function_retraces_rather_than_reusing_the_kernel():
    """A closure-free function is a guarded constant: passing another one runs its own kernel, never the
    previous function's (a stale kernel would be a silent wrong answer)."""

    def keep_even(b, h, q_idx, kv_idx):
        return (kv_idx % 2) == 0

    def keep_odd(b, h, q_idx, kv_idx):
        return (kv_idx % 2) == 1

    def fn(q, k, v, mod):
        return da.attention(q, k, v, mask_mod=mod, backend="triton_flex")

    compiled = torch.compile(fn, fullgraph=True)
    q, k, v = _inputs((1, 2, 16, 16))
    idx = torch.arange(16)
    for mod in (keep_even, keep_odd, keep_even):
        with torch.no_grad():
            out = compiled(q, k, v, mod)
        keep = mod(None, None, idx[:, None], idx[None, :]).expand(1, 2, 16, 16)
        # measured <= 2.8e-7 over 5 seeds
        torch.testing.assert_close(out.double(), _float64_attention(q, k, v, keep), atol=5e-7, rtol=0)
