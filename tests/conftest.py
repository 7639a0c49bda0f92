"""Test session set-up: Triton's interpreter is switched on before anything imports triton, so the
``triton_flex`` kernels run on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
