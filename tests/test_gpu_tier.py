"""The strict GPU tier (tests/gpu_tier.py): skips without the hardware, fails with DISPATCHATTN_REQUIRE_GPU=1.

Each case runs a tiny suite with ``pytester``; its conftest is the plugin's own source, with
``gpu_vendor`` replaced to play a machine with no GPU, an NVIDIA GPU or an AMD GPU.
"""

from __future__ import annotations

from pathlib import Path

import gpu_tier
import pytest

pytest_plugins = ["pytester"]

SUITE = f'''
import importlib.util
import pytest

@pytest.mark.gpu
def test_any_gpu():
    pass

@pytest.mark.cuda
def test_nvidia_only():
    pass

@pytest.mark.rocm
def test_amd_only():
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA or ROCm GPU")
def test_own_skipif():
    pass

@pytest.mark.gpu
def test_library_missing():
    pytest.skip("no_such_library is not installed on this GPU machine")

@pytest.mark.gpu
def test_not_applicable():
    pytest.skip("{gpu_tier.NOT_APPLICABLE}flash refuses softcap on this arch by design")

def test_cpu():
    pass

def test_cpu_skip():
    pytest.skip("an ordinary skip stays a skip")
'''


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    def run(vendor: str | None, require: bool, *args: str) -> pytest.RunResult:
        source = Path(gpu_tier.__file__).read_text()
        pytester.makeconftest(f"{source}\n\ndef gpu_vendor():\n    return {vendor!r}\n")
        pytester.makepyfile(test_tier=SUITE)
        if require:
            monkeypatch.setenv("DISPATCHATTN_REQUIRE_GPU", "1")
        else:
            monkeypatch.delenv("DISPATCHATTN_REQUIRE_GPU", raising=False)
        return pytester.runpytest("-rA", "-p", "no:cacheprovider", *args)

    return run


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    """test name -> PASSED / SKIPPED / FAILED / ERROR from the -rA summary."""
    found = {}
    for line in result.outlines:
        words = line.split()
        if len(words) >= 2 and words[0] in ("PASSED", "SKIPPED", "FAILED", "ERROR"):
            if words[0] == "SKIPPED":  # "SKIPPED [1] test_tier.py:5: reason" carries no test name
                continue
            found[words[1].split("::")[-1]] = words[0]
    return found


def test_without_gpu_the_tier_skips_with_a_reason(suite):
    result = suite(None, require=False)
    result.assert_outcomes(passed=1, skipped=7)
    result.stdout.fnmatch_lines(["*needs an NVIDIA GPU (CUDA) or an AMD GPU (ROCm); this machine has no GPU*"])


def test_without_gpu_require_gpu_fails_every_gpu_test(suite):
    result = suite(None, require=True)
    assert result.ret != 0
    result.assert_outcomes(passed=1, skipped=1, errors=6)
    result.stdout.fnmatch_lines(["*DISPATCHATTN_REQUIRE_GPU=1 but the GPU tier cannot run*no GPU visible*"])
    assert _outcomes(result)["test_cpu"] == "PASSED"


def test_on_nvidia_require_gpu_fails_self_skips_but_not_the_other_vendor(suite):
    result = suite("cuda", require=True)
    outcomes = _outcomes(result)
    assert outcomes["test_any_gpu"] == outcomes["test_nvidia_only"] == "PASSED"
    assert outcomes["test_own_skipif"] == "ERROR"  # skipped in set-up: reported as an error
    assert outcomes["test_library_missing"] == "FAILED"
    result.stdout.fnmatch_lines(["*may not skip: no_such_library is not installed on this GPU machine*"])
    result.assert_outcomes(passed=3, failed=1, errors=1, skipped=3)  # amd-only, not-applicable, cpu skip


def test_on_amd_the_cuda_tests_skip_and_rocm_tests_run(suite):
    result = suite("rocm", require=True)
    outcomes = _outcomes(result)
    assert outcomes["test_amd_only"] == outcomes["test_any_gpu"] == "PASSED"
    assert outcomes["test_library_missing"] == "FAILED"
    result.stdout.fnmatch_lines(["*needs an NVIDIA GPU (CUDA); this machine has an AMD GPU (ROCm)*"])


def test_on_gpu_without_require_gpu_self_skips_stay_skips(suite):
    result = suite("cuda", require=False)
    result.assert_outcomes(passed=3, skipped=5)


def test_dash_m_gpu_selects_vendor_marked_tests(suite):
    result = suite(None, False, "-m", "gpu")
    result.assert_outcomes(skipped=6)  # test_cpu and test_cpu_skip deselected; cuda/rocm ones selected


def test_module_that_skips_itself_fails_in_strict_mode(pytester: pytest.Pytester, monkeypatch):
    source = Path(gpu_tier.__file__).read_text()
    pytester.makeconftest(source)
    gpu_dir = pytester.mkpydir("gpu")
    (gpu_dir / "test_lib.py").write_text('import pytest\npytest.importorskip("no_such_library")\n')
    monkeypatch.delenv("DISPATCHATTN_REQUIRE_GPU", raising=False)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=1)
    monkeypatch.setenv("DISPATCHATTN_REQUIRE_GPU", "1")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*a GPU-tier module may not skip*no_such_library*"])


def test_marker_report_names_the_hardware():
    assert gpu_tier.why_missing(["cuda"], "rocm") == "needs an NVIDIA GPU (CUDA); this machine has an AMD GPU (ROCm)"
    assert gpu_tier.why_missing(["gpu"], "rocm") is None
    assert gpu_tier.why_missing(["rocm"], None).endswith("no GPU visible to torch")


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_a_gpu_machine_without_the_library_skips_saying_it_is_not_installed(backend):
    """What the GPU tier's compile tests do on an H200 without flash-attn / xFormers: ``da.explain``'s reasons
    for the backend go to ``skip_refused``, a plain skip naming the missing library (a failure in strict mode),
    never "not applicable" and never an error."""
    import torch
    from packaging.version import Version

    import dispatchattn as da
    from dispatchattn.capabilities import DeviceCaps, Libraries, pretend

    q = torch.randn(2, 8, 256, 64, dtype=torch.bfloat16)
    without = Libraries(torch=Version("2.11.0"), triton=Version("3.6.0"))
    with pretend(DeviceCaps.synthetic("sm_90", libraries=without)):
        reasons = da.explain(q, q, q, mask_mod=da.masks.causal()).reasons[backend]
    with pytest.raises(pytest.skip.Exception) as skipped:
        gpu_tier.skip_refused(backend, reasons)
    message = str(skipped.value)
    assert "is not installed" in message and not message.startswith(gpu_tier.NOT_APPLICABLE), message
