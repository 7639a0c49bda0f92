"""The CI workflows in .github/workflows/ are valid and safe, checked offline in the CPU suite.

- ``check-jsonschema --builtin-schema vendor.github-workflows``: the workflow schema (bundled, no network);
- ``zizmor --offline``: security audit (pinned actions, no template injection, least permissions, no
  persisted credentials);
- and what the project asks of each job, read from the YAML: which tier runs where, with what.

Both tools come with the ``[test]`` extra. Without them the tool checks skip on a laptop, and FAIL when
``CI`` is set, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (it is in the [test] extra: pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set: {message}")
        pytest.skip(message)
    return path


def _load(path: Path) -> dict:
    from ruamel.yaml import YAML  # a dependency of check-jsonschema, so present with the [test] extra

    return YAML(typ="safe").load(path.read_text())


def _jobs() -> dict[str, dict]:
    return {f"{path.stem}.{name}": job for path in WORKFLOWS for name, job in _load(path)["jobs"].items()}


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def _runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in _steps(job))


def test_workflows_exist():
    assert {path.stem for path in WORKFLOWS} >= {"cpu", "gpu", "slow"}


def test_schema_check_jsonschema():
    tool = _tool("check-jsonschema")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_security_audit_zizmor():
    tool = _tool("zizmor")
    result = subprocess.run(
        [tool, "--offline", "--no-progress", str(ROOT / ".github" / "workflows")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege_and_pinned_actions(path: Path):
    workflow = _load(path)
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        assert job.get("permissions", {"contents": "read"}) == {"contents": "read"}, name
        for step in _steps(job):
            if "uses" in step:
                assert PINNED.match(step["uses"]), f"{name}: {step['uses']} is not pinned to a commit SHA"
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name
            assert "${{" not in step.get("run", ""), f"{name}: expression expanded inside run: {step['run']!r}"


def test_cpu_job_runs_ci_script_on_push_and_pull_request():
    workflow = _load(ROOT / ".github" / "workflows" / "cpu.yml")
    assert {"push", "pull_request"} <= set(workflow["on"])
    assert "bash .ci/run" in _runs(workflow["jobs"]["test"])
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script and "ruff check" in script
    # The README's test command on the pinned torch, then the compatibility subset on the other supported ones.
    assert 'python -m pytest "$@"' in script and '-m pytest -m "compat and not slow"' in script


def test_gpu_jobs_are_strict_and_containerised():
    workflow = _load(ROOT / ".github" / "workflows" / "gpu.yml")
    assert workflow["env"]["DISPATCHATTN_REQUIRE_GPU"] == "1"
    nvidia, amd = workflow["jobs"]["nvidia"], workflow["jobs"]["amd"]
    assert nvidia["runs-on"] == ["self-hosted", "linux", "nvidia"]
    assert amd["runs-on"] == ["self-hosted", "linux", "rocm"]
    for job in (nvidia, amd):
        image = job["container"]["image"]
        assert re.search(r"(@sha256:[0-9a-f]{64}|:[\w.-]*\d[\w.-]*)$", image), f"{image} is not pinned"
        assert "latest" not in image
        assert "python -m pytest -m gpu" in _runs(job)
    assert "pytorch" in nvidia["container"]["image"] and "cuda" in nvidia["container"]["image"]
    assert "--gpus all" in nvidia["container"]["options"]
    assert "rocm" in amd["container"]["image"]
    assert "--device=/dev/kfd" in amd["container"]["options"] and "--device=/dev/dri" in amd["container"]["options"]
    assert "bench/flex.py" in _runs(nvidia)
    uploads = [step for step in _steps(nvidia) if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and uploads[0]["with"]["path"].endswith(".json")


def test_slow_tier_is_scheduled():
    workflow = _load(ROOT / ".github" / "workflows" / "slow.yml")
    assert workflow["on"]["schedule"]
    assert "-m slow" in _runs(workflow["jobs"]["slow"])


def test_every_job_has_a_timeout():
    for name, job in _jobs().items():
        assert 0 < job["timeout-minutes"] <= 240, name


def test_missing_tool_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set: zizmor is not installed"):
        _tool("zizmor")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _tool("zizmor")
