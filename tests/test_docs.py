"""Every ```python block in docs/*.md and README.md runs on CPU, so the docs cannot rot.

Each block runs on its own, in a fresh namespace, from a temporary working directory, with the
environment restored afterwards. A block that genuinely needs a GPU opts out with a
``<!-- gpu-only -->`` line right before its fence: it is then a GPU-tier test (``@pytest.mark.gpu``),
skipped on CPU and run by the GPU CI jobs. ``test_inventory`` counts the blocks and keeps the opt-outs rare.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_ONLY = "<!-- gpu-only -->"
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
REQUIRED = ["index", "getting-started", "guide", "explain", "autotune-cache", "performance"]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    source: str
    gpu_only: bool

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, with their line numbers and opt-out markers."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        if opening.group(2) == "python":
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            source = textwrap.dedent("\n".join(lines[i + 1 : end]))
            blocks.append(Block(path, i + 1, source, previous == GPU_ONLY))
        i = end + 1
    return blocks


BLOCKS = [block for path in doc_files() for block in python_blocks(path)]


def _param(block: Block):
    marks = [pytest.mark.gpu] if block.gpu_only else []
    return pytest.param(block, id=block.name, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_doc_example_runs(block: Block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    try:
        exec(compile(block.source, block.name, "exec"), {"__name__": "__doc_example__"})
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_inventory():
    """Counts: every required page exists and has examples; GPU-only opt-outs stay few and marked right."""
    pages = {path.stem for path in (ROOT / "docs").glob("*.md")}
    assert set(REQUIRED) <= pages, f"missing docs pages: {sorted(set(REQUIRED) - pages)}"
    per_page = {stem: sum(b.path.stem == stem for b in BLOCKS) for stem in REQUIRED}
    gpu_only = [b.name for b in BLOCKS if b.gpu_only]
    assert per_page["guide"] >= 15, per_page
    assert all(per_page[stem] >= 1 for stem in ("getting-started", "explain", "autotune-cache")), per_page
    assert len(gpu_only) <= max(2, len(BLOCKS) // 10), (
        f"{len(gpu_only)} of {len(BLOCKS)} blocks are gpu-only: {gpu_only}"
    )


GUIDE_SECTIONS = [
    "Causal (top-left)",
    "Bottom-right causal",
    "Sliding window",
    "Prefix LM",
    "Document packing",
    "Softcap",
    "ALiBi",
    "Relative position bias",
    "Your own score_mod",
    "Your own mask_mod",
    "Dense masks",
    "Grouped-query attention",
    "`bshd` layout",
    "Log-sum-exp",
    "Choosing the backend yourself",
]


def test_guide_covers_every_variant_with_an_example():
    text = (ROOT / "docs" / "guide.md").read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    for title in GUIDE_SECTIONS:
        section = next((s for s in sections if s.startswith(title)), None)
        assert section is not None, f"docs/guide.md has no section '## {title}'"
        assert "```python" in section, f"docs/guide.md section '{title}' has no example"


def test_gpu_only_marker_precedes_a_python_block():
    for path in doc_files():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == GPU_ONLY:
                following = next((text for text in lines[i + 1 :] if text.strip()), "")
                assert FENCE.match(following) and following.strip() == "```python", f"{path.name}:{i + 1}"


def test_block_parser(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```bash\nls\n```\n<!-- gpu-only -->\n\n```python\nx = 1\n```\n  ```python\n  y = 2\n  ```\n")
    blocks = python_blocks(page)
    assert [(b.line, b.source, b.gpu_only) for b in blocks] == [(7, "x = 1", True), (10, "y = 2", False)]


def _load_plot_script():
    if importlib.util.find_spec("matplotlib") is None:
        message = "matplotlib is not installed (it is in the [bench] extra)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set: {message}")
        pytest.skip(message)
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_script_on_synthetic_results(tmp_path, capsys):
    plot = _load_plot_script()
    results, out = tmp_path / "results", tmp_path / "img"
    results.mkdir()

    def row(case, seq, direction, tflops):
        return {
            "case": case,
            "seq": seq,
            "head_dim": 64,
            "direction": direction,
            "density": 0.5,
            "seconds": {b: 1.0 / t for b, t in tflops.items()},
            "tflops": tflops,
            "ratio": {},
        }

    rows = [
        row(c, s, d, {"triton_flex": s / 100, "torch_flex": s / 120})
        for c in ("causal", "document")
        for s in (1024, 2048)
        for d in ("fwd", "bwd")
    ]
    synthetic = {
        "device": "Synthetic GPU",
        "torch": "0.0",
        "triton": "0.0",
        "dtype": "torch.bfloat16",
        "dry_run": False,
        "rows": rows,
    }
    (results / "flex_synthetic.json").write_text(json.dumps(synthetic))
    (results / "flex_cpu_interpreter.json").write_text(json.dumps({**synthetic, "dry_run": True}))
    overhead = {
        "device": "cpu",
        "shape": [1, 8, 128, 64],
        "torch": "0.0",
        "date": "2000-01-01",
        "dispatchattn_us": 12.0,
        "sdpa_us": 10.0,
    }
    (results / "overhead-cpu.json").write_text(json.dumps(overhead))

    assert plot.main(["--results", str(results), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["flex_synthetic_d64.png", "overhead-cpu.png"]
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in written)
    assert "skipped flex_cpu_interpreter.json: a CPU dry run" in capsys.readouterr().out


def _fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_explain_output_in_the_docs_is_real(tmp_path):
    """docs/explain.md pastes the output of its first example; running it again must print the same text."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("the pasted output was taken on a machine without a GPU; its reasons differ on one")
    text = (ROOT / "docs" / "explain.md").read_text()
    script, pasted = _fenced(text, "python")[0], _fenced(text, "text")[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHATTN_", "TRITON_INTERPRET"))}
    env["DISPATCHATTN_EXPLAIN"] = "1"
    (tmp_path / "example.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == pasted.strip(), "docs/explain.md: re-run the example and paste its output"
