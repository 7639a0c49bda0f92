"""Test session set-up: Triton's interpreter is switched on before anything imports triton, so the
``triton_flex`` kernels run on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# The strict GPU tier (markers gpu / cuda / rocm; DISPATCHATTN_REQUIRE_GPU=1 turns their skips into failures).
pytest_plugins = ["gpu_tier"]
