"""What keeps dispatchattn working on every supported torch (pyproject: the last five minor releases, each run
by ``.ci/run``): nothing version-specific in the compiled path, and the bounds, CI and docs stating one range.

- The structured mods declare their fields (``_fields``), which ``compiled.py`` reads by name while tracing:
  plain attribute reads, which every dynamo traces and guards (torch 2.11's cannot trace ``__dict__.items()``).
- Triton's interpreter (how CI runs the ``triton_flex`` kernels on CPU) loops over a count loaded from memory:
  Triton 3.6's interpreter cannot with NumPy >= 2.4 (fixed in Triton 3.7); the test names the fix.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import dispatchattn as da
from dispatchattn import compiled, envs
from dispatchattn.masks import MaskMod
from dispatchattn.scores import ScoreMod

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(name: str, requirements: list[str]) -> Requirement:
    (found,) = [r for r in map(Requirement, requirements) if r.name == name]
    return found


def _supported_minors() -> list[str]:
    """``torch>=2.A,<2.B`` -> ["2.A", ..., "2.(B-1)"]."""
    spec = _requirement("torch", _pyproject()["project"]["dependencies"]).specifier
    bounds = {s.operator: Version(s.version) for s in spec}
    assert set(bounds) == {">=", "<"}, f"torch bounds should be '>=2.A,<2.B', got {spec}"
    low, high = bounds[">="], bounds["<"]
    return [f"{low.major}.{minor}" for minor in range(low.minor, high.minor)]


def _concrete(base: type) -> list[type]:
    out = []
    for cls in base.__subclasses__():
        out.extend([cls] if "__call__" in vars(cls) else [])
        out.extend(_concrete(cls))
    return out


MODS = [
    da.masks.full(), da.masks.causal(), da.masks.causal(bottom_right=True),
    da.masks.causal(bottom_right=True).bind(5, 9), da.masks.sliding_window(7, 2), da.masks.prefix_lm(3),
    da.masks.document(torch.tensor([0, 0, 1, 1, 1])), da.masks.sliding_window(4) & da.masks.causal(),
    da.masks.prefix_lm(2) | (da.masks.causal() & da.masks.document(torch.tensor([[0, 1, 1]]))),
    da.scores.softcap(30.0), da.scores.alibi(torch.linspace(0.1, 0.8, 4)),
    da.scores.relative_bias(torch.randn(2, 9)), da.scores.relative_bias(torch.randn(2, 9)).bind(5, 5),
]


@pytest.mark.parametrize("cls", _concrete(MaskMod) + _concrete(ScoreMod), ids=lambda cls: cls.__name__)
def test_every_structured_mod_declares_its_constructor_parameters_as_fields(cls):
    own_init = cls.__init__ is not object.__init__
    parameters = tuple(inspect.signature(cls.__init__).parameters)[1:] if own_init else ()  # without self
    assert cls._fields == parameters


@pytest.mark.parametrize("mod", MODS, ids=repr)
def test_the_traced_description_of_a_mod_rebuilds_an_equal_structure(mod):
    twin = compiled._rebuild_mod(compiled._static_mod(mod))
    assert type(twin) is type(mod) and twin.key == mod.key and twin.needs_lengths == mod.needs_lengths
    for got, want in zip(twin.captured(), mod.captured()):  # stand-ins: the metadata, not the values
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)


def test_a_mod_compiles_reading_only_its_fields():
    """An attribute that is not a field (a cache, a user's note) is not part of the decision."""
    mask = da.masks.sliding_window(3) & da.masks.causal()
    mask.note = {"not": "a field"}  # dynamo could not make this a constant in every release
    q, k, v = (torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(n)) for n in range(3))
    torch._dynamo.reset()
    try:
        got = torch.compile(lambda q, k, v: da.attention(q, k, v, mask_mod=mask), fullgraph=True)(q, k, v)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, da.attention(q, k, v, mask_mod=mask), atol=1e-5, rtol=1e-5)


IN_REGION = {
    "bottom_right": lambda: {"mask_mod": da.masks.causal(bottom_right=True)},  # bound in the traced code too
    "window_and_causal": lambda: {"mask_mod": da.masks.sliding_window(3) & da.masks.causal()},
    "softcap": lambda: {"score_mod": da.scores.softcap(5.0), "is_causal": True},
}


@pytest.mark.parametrize("backend", ["reference", "torch_flex"])
@pytest.mark.parametrize("case", sorted(IN_REGION))
def test_mods_made_inside_the_compiled_region_compile(case, backend):
    """Mods the caller makes inside the region, and ``bind``'s, are objects dynamo creates while tracing: the
    kernels run the decision's twins where they capture no tensor (torch 2.11's dynamo cannot read such an object's
    attributes), the caller's own objects where they do (``test_mods_capturing_tensors_made_inside_the_region``)."""
    q, k, v = (torch.randn(1, 2, 80, 16, generator=torch.Generator().manual_seed(n)) for n in range(3))
    q = q[:, :, :70]  # torch_flex on CPU: at least 64 positions and head_dim 16

    def fn(q, k, v):
        return da.attention(q, k, v, backend=backend, **IN_REGION[case]())

    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True)(q, k, v)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, fn(q, k, v), atol=1e-5, rtol=1e-5)


def test_the_installed_torch_and_triton_are_in_the_supported_range():
    torch_req = _requirement("torch", _pyproject()["project"]["dependencies"])
    assert torch_req.specifier.contains(Version(torch.__version__).base_version), (torch.__version__, torch_req)
    triton = pytest.importorskip("triton")
    for extra in ("triton", "test"):
        triton_req = _requirement("triton", _pyproject()["project"]["optional-dependencies"][extra])
        assert triton_req.specifier.contains(triton.__version__), (triton.__version__, extra, triton_req)


def test_the_supported_range_is_the_last_five_minors_and_ci_runs_each():
    minors = _supported_minors()
    assert len(minors) == 5, minors
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = re.search(r'^PINNED_TORCH="(\d+\.\d+)\.\d+"', ci, re.M)
    others = re.search(r'^COMPAT_TORCH="([\d. ]+)"', ci, re.M)
    assert pinned and others, "expected PINNED_TORCH=... and COMPAT_TORCH=... in .ci/run"
    assert sorted([pinned.group(1), *others.group(1).split()], key=Version) == minors


def test_the_readme_states_the_supported_range():
    minors = _supported_minors()
    readme = (ROOT / "README.md").read_text()
    assert f"torch {minors[0]} to {minors[-1]}" in readme


def test_the_interpreter_loops_over_a_count_loaded_from_memory():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if not envs.triton_interpret():
        pytest.skip("TRITON_INTERPRET is not set: the kernels run compiled")

    @triton.jit
    def count_up(n_ptr, out_ptr):
        total = 0
        for _ in range(0, tl.load(n_ptr)):
            total += 1
        tl.store(out_ptr, total)

    n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    try:
        count_up[(1,)](n, out)
    except Exception as error:  # noqa: BLE001 - the interpreter wraps the NumPy TypeError in its own error
        numpy = pytest.importorskip("numpy")
        pytest.fail(f"Triton {triton.__version__}'s interpreter cannot loop over a loaded count with NumPy "
                    f"{numpy.__version__} (Triton < 3.7 needs NumPy < 2.4: pip install 'numpy<2.4'): {error}")
    assert int(out) == 3


CAPTURING_IN_REGION = {
    "document": lambda: {"mask_mod": da.masks.document(torch.arange(40) // 10) & da.masks.causal()},
    "alibi": lambda: {"score_mod": da.scores.alibi(torch.linspace(0.1, 0.9, 2)), "is_causal": True},
}


@pytest.mark.parametrize("case", sorted(CAPTURING_IN_REGION))
def test_mods_capturing_tensors_made_inside_the_region(case):
    """A structured mod that captures a tensor, made inside the region: the kernels call the caller's own object,
    which torch 2.11's dynamo hashes through a stand-in built without ``__init__`` before calling it
    (``masks.structure_hash``); compared with the same call in float64, outside any region."""
    q, k, v = (torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(n)) for n in range(3))

    def fn(q, k, v):
        return da.attention(q, k, v, backend="reference", **CAPTURING_IN_REGION[case]())

    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True)(q, k, v)
    finally:
        torch._dynamo.reset()
    want = fn(q.double(), k.double(), v.double())
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)
