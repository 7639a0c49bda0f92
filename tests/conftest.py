"""Test session set-up: Triton's interpreter is switched on before anything imports triton, so the
``triton_flex`` kernels run on CPU tensors."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# Tile configs, launch failures and backend rankings measured on this machine outside the tests must not decide
# inside them: the session gets a cache of its own (tests that need another set theirs).
os.environ["DISPATCHATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="dispatchattn-tests-")

import pytest

# The strict GPU tier (markers gpu / cuda / rocm; DISPATCHATTN_REQUIRE_GPU=1 turns their skips into failures).
pytest_plugins = ["gpu_tier"]

#: The compatibility subset (marker ``compat``), which ``.ci/run`` runs on every supported torch besides the pinned
#: one: tracing under torch.compile, the transformers integration, selection and validation, every backend on the
#: catalogue (the Triton kernel through the interpreter, small sizes), and the version checks.
COMPAT_FILES = frozenset({"test_compile.py", "test_transformers.py", "test_selector.py", "test_validation.py",
                          "test_catalogue.py", "test_versions.py", "test_launch_failures.py", "test_selftest.py",
                          "test_triton_flex_codegen.py", "test_triton_flex_captures.py", "test_rankings.py",
                          "test_varlen.py"})


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in COMPAT_FILES:
            item.add_marker(pytest.mark.compat)


@pytest.fixture(autouse=True)
def _fresh_decisions():
    """Each test decides afresh: a memoised decision holds the library functions it was made with, and tests
    swap libraries for test doubles."""
    from dispatchattn import api, failures
    from dispatchattn.tuning import rankings

    api.clear_memo()
    failures.clear_memory()
    rankings.clear_memory()
    yield
    failures.clear_memory()
    rankings.clear_memory()
