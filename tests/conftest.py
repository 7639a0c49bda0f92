"""Test session set-up: Triton's interpreter is switched on before anything imports triton, so the
``triton_flex`` kernels run on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# The strict GPU tier (markers gpu / cuda / rocm; DISPATCHATTN_REQUIRE_GPU=1 turns their skips into failures).
pytest_plugins = ["gpu_tier"]


@pytest.fixture(autouse=True)
def _fresh_decisions():
    """Each test decides afresh: a memoised decision holds the library functions it was made with, and tests
    swap libraries for test doubles."""
    from dispatchattn import api, failures

    api.clear_memo()
    failures.clear_memory()
    yield
    failures.clear_memory()
