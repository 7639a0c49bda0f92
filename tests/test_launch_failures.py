"""A kernel, config or library that cannot launch on the device never fails the call (issue: resilience).

Launch failures are injected with test doubles that raise the real exception types at launch: Triton's
``OutOfResources`` / ``CompilationError`` from the Triton flex kernel's launches, a vendor library's "not supported"
RuntimeError from SDPA.  Every numeric check is against the float64 oracle (tests/oracle.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from oracle import attention64, dense_mask
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import dispatchattn as da
from dispatchattn import failures
from dispatchattn.backends.triton_flex import kernels
from dispatchattn.backends.triton_flex.block_mask import build_block_mask, refine
from dispatchattn.backends.triton_flex.ladder import smaller_configs
from dispatchattn.tuning.config import TileConfig

B, H, S, D = 1, 2, 77, 32
# float32 through the interpreter or plain math against float64: measured max errors 2.8e-7 (out, lse) and 9.1e-7
# (grads) at this size.
ATOL = 2e-6


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Launches:
    """In place of ``kernels.Launch.run``: raises ``error()`` where ``fails(kernel, config)``; records every launch."""

    def __init__(self, monkeypatch, fails, error=lambda: OutOfResources(245760, 232448, "shared memory")):
        self.seen: list[tuple[str, TileConfig]] = []
        real = kernels.Launch.run

        def run(launch, config, vendor):
            self.seen.append((launch.kernel, config))
            if fails(launch.kernel, config):
                raise error()
            return real(launch, config, vendor)

        monkeypatch.setattr(kernels.Launch, "run", run)


def _inputs(seed: int, grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=gen).requires_grad_(grad) for _ in range(3)]


def _row_gap_mask(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx != 5)  # causal, and query row 5 sees no key at all


def _oracle(q, k, v, mask_mod, dout=None):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = attention64(qd, kd, vd, mask=dense_mask(mask_mod, B, H, S, S))
    grads = torch.autograd.grad(out, (qd, kd, vd), dout.double()) if dout is not None else None
    return out.detach(), lse.detach(), grads


def _check_forward_and_backward(q, k, v, out, mask_mod, seed):
    """``out`` and, after ``out.backward`` of a random ``dout``, the gradients of q, k, v match the float64 oracle."""
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(dout)
    want, _, grads = _oracle(q, k, v, mask_mod, dout)
    assert (out.double() - want).abs().max() < ATOL
    for got, expected in zip((q.grad, k.grad, v.grad), grads):
        assert (got.double() - expected).abs().max() < ATOL


def _failure_file(cache_dir) -> dict:
    (path,) = cache_dir.glob("autotune/*/launch-failures.json")
    return json.loads(path.read_text())["launch_failures"]


# ---- telling launch failures apart ------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [
    OutOfResources(245760, 232448, "shared memory"),
    CompilationError("def f(): pass", None, "error message"),
    RuntimeError("PTXAS error: Internal Triton PTX codegen error"),
    RuntimeError("FlashAttention only supports Ampere GPUs or newer."),
    NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ..."),
    RuntimeError("No available kernel. Aborting execution."),
], ids=["out_of_resources", "compilation", "ptxas", "flash_refusal", "xformers_refusal", "sdpa_refusal"])
def test_launch_failures_are_recognised_with_their_first_line(error):
    message = failures.launch_failure(error)
    assert message is not None and type(error).__name__ in message and "\n" not in message


@pytest.mark.parametrize("error", [
    ValueError("query: expected a 4-D tensor, got 3-D"),
    TypeError("expected Tensor"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered (not supported by this build)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("Expected all tensors to be on the same device"),
    KeyboardInterrupt(),
], ids=["value", "type", "illegal_address", "sticky_even_with_refusal_words", "oom", "device_mismatch", "interrupt"])
def test_input_and_device_errors_are_not_launch_failures(error):
    assert failures.launch_failure(error) is None


# ---- the Triton flex kernel: smaller configs first --------------------------------------------------------------

def test_ladder_order_is_fewer_stages_then_smaller_tiles():
    ladder = [(c.block_m, c.block_n, c.num_stages) for c in smaller_configs("fwd", TileConfig(64, 64, 4, 2))]
    assert ladder == [(64, 64, 2), (64, 64, 1), (64, 32, 2), (64, 32, 1), (64, 16, 2), (64, 16, 1),
                      (32, 16, 2), (32, 16, 1), (16, 16, 2), (16, 16, 1)]
    backward = [(c.block_m, c.block_n) for c in smaller_configs("bwd", TileConfig(64, 32, 4, 1))]
    assert backward == [(64, 32), (32, 32), (32, 16), (16, 16)]  # the larger side first


def test_refined_block_mask_keeps_every_computed_tile_and_no_false_full_tile():
    mask = da.masks.sliding_window(40) & da.masks.causal()
    shape = dict(batch=1, heads=1, seq_q=300, seq_kv=190)
    refined = refine(build_block_mask(mask, block_m=64, block_n=64, **shape), 32, 16)
    fresh = build_block_mask(mask, block_m=32, block_n=16, **shape)

    def tiles(num, indices):
        chosen = torch.arange(indices.shape[-1]) < num.unsqueeze(-1)
        return torch.zeros(indices.shape, dtype=torch.bool).scatter_(-1, indices.long(), chosen)

    computed = tiles(refined.kv_num_blocks, refined.kv_indices) | tiles(refined.full_kv_num_blocks,
                                                                         refined.full_kv_indices)
    fresh_computed = tiles(fresh.kv_num_blocks, fresh.kv_indices) | tiles(fresh.full_kv_num_blocks,
                                                                           fresh.full_kv_indices)
    assert computed.shape == fresh_computed.shape
    assert bool((fresh_computed <= computed).all())
    assert bool((tiles(refined.full_kv_num_blocks, refined.full_kv_indices)
                 <= tiles(fresh.full_kv_num_blocks, fresh.full_kv_indices)).all())
    assert torch.equal(tiles(refined.q_num_blocks, refined.q_indices),
                       tiles(refined.kv_num_blocks, refined.kv_indices).transpose(-1, -2))


def test_forward_out_of_resources_runs_a_smaller_config_and_is_remembered(monkeypatch, _cache_dir):
    launches = Launches(monkeypatch, lambda kernel, config: kernel == "fwd" and config.block_n > 16)
    q, k, v = _inputs(0)
    out, lse = da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex", return_lse=True)
    want, want_lse, _ = _oracle(q, k, v, _row_gap_mask)
    assert (out.double() - want).abs().max() < ATOL
    finite = torch.isfinite(want_lse)
    assert (lse.double()[finite] - want_lse[finite]).abs().max() < ATOL
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5])) and bool((lse[:, :, 5] == -torch.inf).all())
    ran = [config for kernel, config in launches.seen if kernel == "fwd"]
    assert [c.block_n for c in ran] == [64, 32, 16]  # two failures, then a config that launches
    recorded = _failure_file(_cache_dir)
    assert len(recorded) == 2 and all("OutOfResources" in e["message"] for e in recorded.values())

    # A new process (memory forgotten) reads the file and launches only the config that works.
    failures.clear_memory()
    da.api.clear_memo()
    launches.seen.clear()
    again = da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    assert [c.block_n for kernel, c in launches.seen if kernel == "fwd"] == [16]
    assert torch.equal(again, out)
    decision = da.explain(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    assert decision.config.block_n == 16
    assert "failed to launch here: OutOfResources" in decision.config_source
    assert "Required: 245760" in str(decision) and "launch-failures.json" in str(decision)


def test_backward_out_of_resources_runs_a_smaller_config(monkeypatch):
    Launches(monkeypatch, lambda kernel, config: kernel == "bwd_dkdv" and config.block_m > 16)
    q, k, v = _inputs(1, grad=True)
    out = da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    _check_forward_and_backward(q, k, v, out, _row_gap_mask, 11)


def test_compile_error_in_every_forward_config_runs_the_next_allowed_backend(monkeypatch):
    Launches(monkeypatch, lambda kernel, config: kernel == "fwd",
             error=lambda: CompilationError("def kernel(): ...", None, "unsupported op"))
    q, k, v = _inputs(2)
    with da.use_backends("triton_flex", "reference"):
        out = da.attention(q, k, v, mask_mod=_row_gap_mask)
        decision = da.explain(q, k, v, mask_mod=_row_gap_mask)
    want, _, _ = _oracle(q, k, v, _row_gap_mask)
    assert (out.double() - want).abs().max() < ATOL
    assert decision.backend == "reference"
    assert [r.code for r in decision.reasons["triton_flex"]] == ["launch_failed"]
    assert "CompilationError" in str(decision) and "reference runs instead" in str(decision)


def test_backward_that_cannot_launch_takes_the_gradients_of_the_next_backend(monkeypatch):
    Launches(monkeypatch, lambda kernel, config: kernel == "bwd_dq")
    q, k, v = _inputs(3, grad=True)
    with da.use_backends("triton_flex", "reference"):
        out = da.attention(q, k, v, mask_mod=_row_gap_mask)
        assert out.grad_fn is not None and da.explain(q, k, v, mask_mod=_row_gap_mask).backend == "triton_flex"
        _check_forward_and_backward(q, k, v, out, _row_gap_mask, 12)
        after = da.explain(q, k, v, mask_mod=_row_gap_mask)
    assert after.backend == "reference" and "its backward could not launch" in str(after)


def test_forced_backend_that_cannot_launch_raises_unsupported_naming_the_failure(monkeypatch):
    Launches(monkeypatch, lambda kernel, config: kernel == "fwd")
    q, k, v = _inputs(4)
    with pytest.raises(da.UnsupportedError, match="OutOfResources") as raised:
        da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    assert "BLOCK_M=16 BLOCK_N=16" in str(raised.value)  # what was tried, down to the smallest tile
    with pytest.raises(da.UnsupportedError, match="could not launch"):  # later calls: refused at selection
        da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")


def test_forced_backend_whose_backward_cannot_launch_raises_unsupported(monkeypatch):
    Launches(monkeypatch, lambda kernel, config: kernel == "bwd_dkdv")
    q, k, v = _inputs(5, grad=True)
    out = da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    with pytest.raises(da.UnsupportedError, match="backward.*OutOfResources"):
        out.sum().backward()


def test_errors_in_the_inputs_or_the_device_propagate_unchanged(monkeypatch, _cache_dir):
    for error in (ValueError("bad strides"), RuntimeError("CUDA error: an illegal memory access was encountered")):
        Launches(monkeypatch, lambda kernel, config: True, error=lambda e=error: e)
        q, k, v = _inputs(6)
        with da.use_backends("triton_flex", "reference"), pytest.raises(type(error)) as raised:
            da.attention(q, k, v, mask_mod=_row_gap_mask)
        assert raised.value is error
    assert not list(_cache_dir.glob("autotune/*/launch-failures.json"))


# ---- vendor libraries -------------------------------------------------------------------------------------------

def _refusing_sdpa(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)


def test_a_library_refusal_runs_the_next_backend_and_is_explained(monkeypatch, _cache_dir):
    _refusing_sdpa(monkeypatch)
    q, k, v = _inputs(7)
    assert da.explain(q, k, v, is_causal=True).backend == "sdpa"
    out = da.attention(q, k, v, is_causal=True)  # the direct SDPA path of a warm call
    want, _, _ = _oracle(q, k, v, lambda b, h, i, j: j <= i)
    assert (out.double() - want).abs().max() < ATOL
    decision = da.explain(q, k, v, is_causal=True)
    assert decision.backend != "sdpa" and "No available kernel" in str(decision)
    assert any("No available kernel" in e["message"] for e in _failure_file(_cache_dir).values())
    with pytest.raises(da.UnsupportedError, match="No available kernel"):
        da.attention(q, k, v, is_causal=True, backend="sdpa")


def test_a_flash_attn_refusal_runs_the_next_backend(monkeypatch):
    """flash-attn (a test double) refusing the call as it does for an unsupported head dim on a GPU it does not
    know: the next backend of the GPU order runs (SDPA here, on the CPU tensors of the double's test)."""
    from fakes.flash_doubles import install, make_fa2
    from packaging.version import Version

    from dispatchattn.capabilities import DeviceCaps, Libraries, pretend

    fa2 = make_fa2()

    def refuse(*args, **kwargs):
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")

    fa2.flash_attn_func = refuse
    install(monkeypatch, fa2=fa2)
    gpu = DeviceCaps.synthetic("sm_90", libraries=Libraries(torch=Version("2.13"), flash_attn=Version("2.8.3")))
    q, k, v = (t.half() for t in _inputs(19))
    with pretend(gpu):
        assert da.explain(q, k, v, is_causal=True).backend == "flash"
        out = da.attention(q, k, v, is_causal=True)
        decision = da.explain(q, k, v, is_causal=True)
        with pytest.raises(da.UnsupportedError, match="only supports head dimension"):
            da.attention(q, k, v, is_causal=True, backend="flash")
    want, _, _ = _oracle(q, k, v, lambda b, h, i, j: j <= i)
    assert (out.double() - want).abs().max() < 1.5e-3  # fp16 SDPA, CPU: 5.4e-4 (0.5e-3..0.93e-3, 5 seeds)
    assert decision.backend == "sdpa" and "flash did not run" in str(decision)


class _RefusingBackward(torch.autograd.Function):
    """SDPA's forward, and a backward that refuses as cuDNN does for shapes its backward kernels lack."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal):
        return REAL_SDPA(q, k, v, is_causal=is_causal)

    @staticmethod
    def backward(ctx, dout):
        raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph.")


REAL_SDPA = F.scaled_dot_product_attention


def test_a_library_backward_refusal_takes_the_gradients_of_the_next_backend(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, is_causal=False, **kw: _RefusingBackward.apply(q, k, v, is_causal))
    q, k, v = _inputs(17, grad=True)
    out = da.attention(q, k, v, is_causal=True)
    assert da.explain(q, k, v, is_causal=True).backend == "sdpa"
    _check_forward_and_backward(q, k, v, out, lambda b, h, i, j: j <= i, 17)
    after = da.explain(q, k, v, is_causal=True)
    assert after.backend != "sdpa" and "its backward could not launch" in str(after) and "cuDNN" in str(after)
    with pytest.raises(da.UnsupportedError, match="could not launch"):  # refused at selection from now on
        da.attention(q, k, v, is_causal=True, backend="sdpa")


def test_a_library_backward_refusal_with_the_backend_forced_raises_unsupported(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, is_causal=False, **kw: _RefusingBackward.apply(q, k, v, is_causal))
    q, k, v = _inputs(18, grad=True)
    out = da.attention(q, k, v, is_causal=True, backend="sdpa")
    with pytest.raises(da.UnsupportedError, match="sdpa's backward could not launch.*cuDNN"):
        out.sum().backward()


def test_explain_env_logs_the_failure_and_what_ran_instead(monkeypatch, caplog):
    _refusing_sdpa(monkeypatch)
    monkeypatch.setenv("DISPATCHATTN_EXPLAIN", "1")
    q, k, v = _inputs(8)
    with caplog.at_level("INFO", logger="dispatchattn"):
        da.attention(q, k, v, is_causal=True)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "dispatchattn: sdpa for" in logged  # the first decision, logged before it ran
    assert "sdpa did not run: it could not launch on this device: RuntimeError: No available kernel" in logged


# ---- the records themselves ---------------------------------------------------------------------------------------

def test_a_corrupt_failure_file_costs_a_retry_never_the_call(monkeypatch, _cache_dir):
    launches = Launches(monkeypatch, lambda kernel, config: kernel == "fwd" and config.block_n > 32)
    q, k, v = _inputs(9)
    da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    (path,) = _cache_dir.glob("autotune/*/launch-failures.json")
    path.write_bytes(b"\x00{not json")
    failures.clear_memory()
    da.api.clear_memo()
    launches.seen.clear()
    out = da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    assert [c.block_n for kernel, c in launches.seen if kernel == "fwd"] == [64, 32]  # retried, then recorded again
    assert (out.double() - _oracle(q, k, v, _row_gap_mask)[0]).abs().max() < ATOL
    assert len(_failure_file(_cache_dir)) == 1


def test_an_unwritable_cache_keeps_failures_in_memory(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DISPATCHATTN_CACHE_DIR", str(blocker))
    launches = Launches(monkeypatch, lambda kernel, config: kernel == "fwd" and config.block_n > 32)
    q, k, v = _inputs(10)
    first = da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    launches.seen.clear()
    da.api.clear_memo()
    second = da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    assert [c.block_n for kernel, c in launches.seen if kernel == "fwd"] == [32]
    assert torch.equal(first, second)


def test_a_version_change_makes_the_records_foreign(monkeypatch, _cache_dir):
    Launches(monkeypatch, lambda kernel, config: kernel == "fwd" and config.block_n > 32)
    q, k, v = _inputs(11)
    da.attention(q, k, v, mask_mod=_row_gap_mask, backend="triton_flex")
    failures.clear_memory()
    monkeypatch.setattr(da.version, "__version__", "99.0")
    caps = da.capabilities.probe(q.device)
    key = next(iter(_failure_file(_cache_dir)))
    assert failures.lookup(caps, key) is None


# ---- inside torch.compile -----------------------------------------------------------------------------------------

def _compiled_call(**kwargs):
    torch._dynamo.reset()

    def fn(q, k, v):
        return da.attention(q, k, v, mask_mod=_row_gap_mask, **kwargs)

    return torch.compile(fn, fullgraph=True)


def test_compiled_config_that_cannot_launch_is_replaced_while_tracing(monkeypatch):
    launches = Launches(monkeypatch, lambda kernel, config: kernel in ("fwd", "bwd_dq") and config.block_n > 16)
    q, k, v = _inputs(13, grad=True)
    out = _compiled_call(backend="triton_flex")(q, k, v)
    _check_forward_and_backward(q, k, v, out, _row_gap_mask, 13)
    graph_launches = [(kernel, c.block_n) for kernel, c in launches.seen[-4:]]
    assert graph_launches == [("fwd", 16), ("bwd_preprocess", 64), ("bwd_dkdv", 16), ("bwd_dq", 16)]


def test_compiled_backend_that_cannot_launch_is_replaced_while_tracing(monkeypatch):
    Launches(monkeypatch, lambda kernel, config: kernel == "fwd")
    q, k, v = _inputs(14)
    with da.use_backends("triton_flex", "reference"):
        out = _compiled_call()(q, k, v)
    assert (out.double() - _oracle(q, k, v, _row_gap_mask)[0]).abs().max() < ATOL
    decision = getattr(da.compiled.DECIDED, f"d{da.compiled.DECIDED.count - 1}")[1]
    assert decision.backend == "reference" and "could not launch" in decision.reasons["triton_flex"][0]
    with pytest.raises(Exception, match="(?s)forced backend cannot run this call.*OutOfResources"):
        _compiled_call(backend="triton_flex")(q, k, v)  # raised while tracing (dynamo wraps it)


def test_compiled_graph_retries_smaller_configs_inside_it(monkeypatch):
    q, k, v = _inputs(15)
    compiled = _compiled_call()
    with da.use_backends("triton_flex", "reference"):
        first = compiled(q, k, v)  # traced while every launch worked
        launches = Launches(monkeypatch, lambda kernel, config: kernel == "fwd" and config.block_n > 16)
        smaller = compiled(q, k, v)
    assert [c.block_n for kernel, c in launches.seen if kernel == "fwd"] == [64, 32, 16]
    want = _oracle(q, k, v, _row_gap_mask)[0]
    for out in (first, smaller):
        assert (out.double() - want).abs().max() < ATOL


def test_compiled_graph_is_traced_again_after_a_backend_failed_inside_it(monkeypatch):
    """When no config launches inside a graph traced earlier, the error says so (a graph cannot switch backends
    while it runs) and the next call traces again, without the backend."""
    q, k, v = _inputs(16)
    compiled = _compiled_call()
    with da.use_backends("triton_flex", "reference"):
        first = compiled(q, k, v)
        Launches(monkeypatch, lambda kernel, config: kernel == "fwd")
        with pytest.raises(failures.LaunchFailed, match="next decision for this problem runs another backend"):
            compiled(q, k, v)
        after = compiled(q, k, v)
    want = _oracle(q, k, v, _row_gap_mask)[0]
    for out in (first, after):
        assert (out.double() - want).abs().max() < ATOL
    decision = getattr(da.compiled.DECIDED, f"d{da.compiled.DECIDED.count - 1}")[1]
    assert decision.backend == "reference" and "could not launch" in decision.reasons["triton_flex"][0]


def test_compiled_library_refusal_is_met_while_tracing(monkeypatch, _cache_dir):
    """SDPA refusing the call (a double for cuDNN with no kernel): met while the graph is traced, so the graph holds
    the next backend; forced, the trace raises UnsupportedError."""
    _refusing_sdpa(monkeypatch)
    torch._dynamo.reset()
    q, k, v = _inputs(20)

    def fn(q, k, v):
        return da.attention(q, k, v, is_causal=True)

    out = torch.compile(fn, fullgraph=True)(q, k, v)
    want, _, _ = _oracle(q, k, v, lambda b, h, i, j: j <= i)
    assert (out.double() - want).abs().max() < ATOL
    decision = getattr(da.compiled.DECIDED, f"d{da.compiled.DECIDED.count - 1}")[1]
    assert decision.backend != "sdpa" and "No available kernel" in str(decision)
    forced = torch.compile(lambda q, k, v: da.attention(q, k, v, is_causal=True, backend="sdpa"), fullgraph=True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?s)forced backend cannot run this call.*No available kernel"):
        forced(q, k, v)  # refused at selection: the failure is on record
    shutil.rmtree(_cache_dir)
    failures.clear_memory()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="sdpa was forced .* could not launch .* No available kernel"):
        forced(q, k, v)  # met while tracing
