"""The on-disk cache of ahead-of-time compile records: ``cache_root()/aot/triton-<version>/<target>/<key>.json``.

A record is a small JSON dict (resources, or the compiler's error).  The key (``aot.AotJob.cache_key``)
covers the kernel's source files, its signature and constants, the launch options, the target and the
Triton version, so an entry never goes stale; it only stops being looked up.  Every cache is optional:
a missing, corrupt or unwritable entry costs a recompile, never a failure.  Writers are atomic
(temp file + ``os.replace``), so concurrent test workers at worst compile the same kernel twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

from ..paths import cache_root

#: The triton_flex package: its modules (helpers, codegen) are part of every kernel's source.
_KERNEL_PACKAGE_DIR = Path(__file__).resolve().parent.parent / "backends" / "triton_flex"


@functools.cache
def triton_version(python: str | None = None) -> str:
    """The Triton version of this process, or of the Python interpreter ``python`` (another environment)."""
    if python is None:
        import triton

        return triton.__version__
    command = [python, "-c", "import triton; print(triton.__version__)"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digest(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return "missing"  # the compile will fail and say so
    return _file_digest(str(path), stat.st_mtime_ns, stat.st_size)


def source_hash(kernel_files: list[str]) -> str:
    """Hash of the kernel's files and of the modules of the triton_flex package (helpers, codegen).

    The checker's own modules (``tools/aot*.py``) are left out: ``aot.FORMAT_VERSION`` versions what they record.
    """
    package = list(_KERNEL_PACKAGE_DIR.glob("*.py"))
    files = sorted({*(Path(f).resolve() for f in kernel_files), *package})
    return hashlib.sha256("".join(_digest(p) for p in files).encode()).hexdigest()


def cache_dir(version: str | None = None) -> Path:
    """Where compile records of Triton ``version`` (default: this process's) live: ``cache_root()/aot/triton-<v>/``."""
    return cache_root() / "aot" / f"triton-{version or triton_version()}"


def path(target: str, key: str, version: str | None = None) -> Path:
    return cache_dir(version) / target / f"{key}.json"


def load(target: str, key: str, version: str | None = None) -> dict | None:
    """The cached record of ``key`` for ``target``, or None when missing or corrupt (compile again)."""
    try:
        return json.loads(path(target, key, version).read_text())
    except (OSError, ValueError):
        return None


def store(target: str, key: str, result: dict, version: str | None = None) -> None:
    """Write ``result`` atomically; an unwritable cache costs a recompile next time, never a failure."""
    destination = path(target, key, version)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=destination.parent, suffix=".tmp", delete=False) as tmp:
            json.dump(result, tmp)
        os.replace(tmp.name, destination)
    except OSError:
        pass
