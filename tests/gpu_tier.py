"""The strict GPU tier, as a pytest plugin (loaded by tests/conftest.py).

Tests marked ``gpu`` need a CUDA or ROCm GPU, ``cuda`` an NVIDIA GPU, ``rocm`` an AMD GPU. Without the
hardware they skip with a reason. With ``DISPATCHATTN_REQUIRE_GPU=1`` (what the GPU CI jobs set) a skip
of such a test is a FAILURE instead: a missing GPU, and equally a test that skips itself on the GPU
machine ("flash_attn is not installed on this GPU machine"), so a misconfigured runner cannot pass by
skipping everything.

Two skips stay skips in strict mode:
- the other vendor's tests (a ``cuda`` test on an AMD machine), when a GPU is present;
- a skip whose reason starts with ``NOT_APPLICABLE`` ("not applicable here: "): a test stating that the
  case does not exist on this hardware, e.g. a backend refusing a feature on this arch by design.

``cuda`` and ``rocm`` tests are also marked ``gpu``, so ``pytest -m gpu`` selects them.
"""

from __future__ import annotations

import pytest

from dispatchattn import envs

MARKERS = {
    "gpu": "needs a CUDA or ROCm GPU (skipped without one; fails when DISPATCHATTN_REQUIRE_GPU=1)",
    "cuda": "needs an NVIDIA GPU",
    "rocm": "needs an AMD GPU",
}
NOT_APPLICABLE = "not applicable here: "
NEEDS = {"gpu": ("cuda", "rocm"), "cuda": ("cuda",), "rocm": ("rocm",)}
WORDS = {"cuda": "an NVIDIA GPU (CUDA)", "rocm": "an AMD GPU (ROCm)"}


#: Reason codes that say the GPU machine is set up wrong (a library missing or too old), not that the case does
#: not exist on this hardware: a skip for one of them fails in strict mode.
SETUP_REASON_CODES = frozenset({"not_installed", "import_failed", "version_too_old", "device_unsupported",
                                "not_allowed"})


def skip_refused(backend: str, reasons) -> None:
    """Skip a GPU-tier case that ``backend`` refuses: "not applicable here" when every reason is a design
    limit of the backend on this arch, a plain skip (a failure in strict mode) when the machine lacks a library."""
    setup = [r for r in reasons if r.code in SETUP_REASON_CODES]
    if setup:
        pytest.skip(f"{backend} is not set up on this GPU machine: {'; '.join(setup)}")
    pytest.skip(f"{NOT_APPLICABLE}{backend} refuses this case by design: {'; '.join(reasons)}")


def gpu_vendor() -> str | None:
    """Return "cuda", "rocm" or None: the GPU this process can use (torch's view of it)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def _tier_marks(item: pytest.Item) -> list[str]:
    return [name for name in NEEDS if item.get_closest_marker(name) is not None]


def why_missing(marks: list[str], vendor: str | None) -> str | None:
    """The hardware a test with these marks lacks here, as a sentence; None when it can run."""
    for name in marks:
        if vendor not in NEEDS[name]:
            wanted = " or ".join(WORDS[v] for v in NEEDS[name])
            found = WORDS[vendor] if vendor else "no GPU visible to torch"
            return f"needs {wanted}; this machine has {found}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Before `-m` deselects: a `cuda` or `rocm` test belongs to the `gpu` tier too. A test whose hardware
    # is missing gets a skip marker, so the skip is reported at the test, with the reason.
    vendor = gpu_vendor()
    strict = envs.require_gpu() and vendor is None  # those fail in pytest_runtest_setup instead
    for item in items:
        marks = _tier_marks(item)
        if marks and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)
        reason = why_missing(marks, vendor) if marks else None
        if reason is not None and not strict:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    marks = _tier_marks(item)
    if marks and envs.require_gpu() and gpu_vendor() is None:
        reason = why_missing(marks, None)
        pytest.fail(f"DISPATCHATTN_REQUIRE_GPU=1 but the GPU tier cannot run: {reason}", pytrace=False)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not envs.require_gpu():
        return
    marks = _tier_marks(item)
    if not marks:
        return
    reason = _skip_reason(report)
    vendor = gpu_vendor()
    other_vendor = vendor is not None and why_missing(marks, vendor) is not None
    if reason.startswith(NOT_APPLICABLE) or other_vendor:
        return
    report.outcome = "failed"
    report.longrepr = f"DISPATCHATTN_REQUIRE_GPU=1: a GPU-tier test may not skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    # A module under a `gpu` folder that skips itself whole (`pytest.importorskip` at import).
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    in_gpu_folder = isinstance(collector, pytest.Module) and collector.path.parent.name == "gpu"
    if report.skipped and in_gpu_folder and envs.require_gpu():
        report.outcome = "failed"
        report.longrepr = f"DISPATCHATTN_REQUIRE_GPU=1: a GPU-tier module may not skip: {_skip_reason(report)}"
