"""One JSON file of tuned tile configs on disk: read tolerantly, written atomically under a file lock.

Every cache is optional: a missing, corrupt, truncated, foreign-schema, binary or unreadable file reads
as empty (and is replaced by the next write); a directory that cannot be written degrades to an
in-memory cache for this process.  Nothing here raises because of the file system; each operation
returns a status sentence for the explanation instead.

Readers never lock: writers build the new file next to the old one (temp file + ``fsync``) and swap it in
with ``os.replace``, so a reader sees the old file or the new one, never a mix.  Writers serialise on a
``filelock.FileLock`` beside the file and re-read it inside the lock, so concurrent writers merge.

This module depends only on the standard library and ``filelock`` (no torch), so worker processes that
only write the cache start fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

SCHEMA = "dispatchattn.autotune"
SCHEMA_VERSION = 1
#: Seconds a writer waits for another process's lock before keeping its result in memory only.
LOCK_TIMEOUT_S = 30.0
IN_MEMORY = "results kept in memory for this process"

# Results that could not be written (unwritable directory, lock timeout), per file path, for this process.
_memory: dict[str, dict[str, dict]] = {}
_memory_guard = threading.Lock()


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, runs of other characters as one ``-`` ("unknown" when empty)."""
    return re.sub(r"[^a-z0-9_.]+", "-", text.lower()).strip("-") or "unknown"


@functools.lru_cache(maxsize=64)
def device_file(root: Path, arch: str, device_name: str, name: str) -> Path:
    """``<root>/autotune/<arch>-<device>/<name>``: a per-device file beside the tile configs (built once per device:
    every triton_flex launch looks its failures up)."""
    return root / "autotune" / slug(f"{arch}-{device_name}") / name


def device_header(caps) -> dict[str, Any]:
    """What a per-device file (launch failures, backend rankings) is valid for: the device of ``caps`` and every
    library version, dispatchattn's included (an upgrade makes the file foreign: replaced on the next write)."""
    from ..version import __version__

    versions = caps.libraries.describe()
    versions["dispatchattn"] = __version__
    return {"device": {"vendor": caps.vendor, "arch": caps.arch or caps.vendor, "name": caps.device_name},
            "versions": versions}


@dataclass(frozen=True)
class LoadResult:
    """What reading a cache file gave: its entries (possibly empty), and how it went."""

    entries: dict[str, dict]
    healthy: bool  # False when the file existed but could not be used, or the directory is unwritable
    status: str  # a sentence for the explanation: "read 12 entries from ...", "... is corrupt (...) ..."


def empty_document(header: dict[str, Any]) -> dict[str, Any]:
    """A new cache document: schema, the caller's header fields (device, versions), no entries.

    ``backend_rankings`` is reserved for measured rankings of backends per device and shape bucket
    (see DESIGN.md, "Priority is a default; measurement wins"); nothing writes it yet.  Other sections
    (``launch_failures``, see ``dispatchattn.failures``) are added by the first ``put`` into them.
    """
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        **header,
        "tile_configs": {},
        "backend_rankings": {},
    }


def why_document_invalid(document: Any, header: dict[str, Any] | None = None,
                         section: str = "tile_configs") -> str | None:
    """None when ``document`` is a cache document of this schema with a ``section`` (and ``header``'s values)."""
    if not isinstance(document, dict):
        return f"top level is a JSON {type(document).__name__}, expected an object"
    found = (document.get("schema"), document.get("schema_version"))
    if found != (SCHEMA, SCHEMA_VERSION):
        return f"schema {found[0]!r} version {found[1]!r}, expected {SCHEMA!r} version {SCHEMA_VERSION}"
    if not isinstance(document.get(section), dict):
        return f"{section!r} is missing or not an object"
    for name, expected in (header or {}).items():
        if document.get(name) != expected:
            return f"{name} {document.get(name)!r} differs from this process's {expected!r}"
    return None


def _read_document(path: Path, header: dict[str, Any] | None,
                   section: str = "tile_configs") -> tuple[dict | None, str | None]:
    """(document, None) or (None, a sentence saying why it cannot be used); (None, None) when absent."""
    replaced = "ignored, it is replaced on the next write"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except NotADirectoryError as error:
        return None, f"cache directory {path.parent} is unusable ({_why(error)}); results are kept in memory"
    except OSError as error:
        return None, f"cache file {path} is unreadable ({_why(error)}); {replaced}"
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        why = f"{type(error).__name__}: {_first_line(error)}"
        return None, f"cache file {path} is corrupt or truncated ({why}); {replaced}"
    problem = why_document_invalid(document, header, section)
    if problem:
        return None, f"cache file {path} is not a cache of this version ({problem}); {replaced}"
    return document, None


def _why(error: OSError) -> str:
    return f"{type(error).__name__}: {error.strerror or error}"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:120] if str(error) else type(error).__name__


def load(path: Path, header: dict[str, Any] | None = None, section: str = "tile_configs") -> LoadResult:
    """The entries of ``section`` in the cache file at ``path`` (merged with this process's unwritten ones).

    ``header`` (e.g. device and versions) must match the file's, else the file is treated as foreign.
    Never raises.
    """
    document, problem = _read_document(path, header, section)
    with _memory_guard:
        pending = dict(_memory.get(str(path), {}))
    entries = dict(document[section]) if document else {}
    entries.update(pending)
    if problem:
        return LoadResult(entries, False, problem)
    if document is None:
        where = f"no cache file yet at {path}"
        return LoadResult(entries, not pending, where + ("; results kept in memory" if pending else ""))
    return LoadResult(entries, not pending, f"read {len(document[section])} entries from {path}")


def put(path: Path, key: str, entry: dict, header: dict[str, Any] | None = None, section: str = "tile_configs") -> str:
    """Store ``entry`` under ``key`` in ``section`` of the file at ``path``; returns a status sentence.  Never raises.

    Under the lock the current file is re-read (a corrupt or foreign one starts over empty), the entry
    is added and the whole document is written to a temp file in the same directory, ``fsync``-ed and
    swapped in with ``os.replace``.  When that fails the entry is kept in memory for this process.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remember(path, key, entry)
        return f"cache directory {path.parent} is unwritable ({_why(error)}); {IN_MEMORY}"
    try:
        with filelock.FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            document, _problem = _read_document(path, header, section)
            document = document or empty_document(header or {})
            document.setdefault(section, {})[key] = entry
            _write_atomically(path, document)
    except filelock.Timeout:
        _remember(path, key, entry)
        return f"cache file {path} stayed locked for {LOCK_TIMEOUT_S:.0f} s; {IN_MEMORY}"
    except OSError as error:
        _remember(path, key, entry)
        return f"could not write cache file {path} ({_why(error)}); {IN_MEMORY}"
    _forget(path, key)
    return f"stored in {path}"


def _write_atomically(path: Path, document: dict) -> None:
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp:
            temp.write(text)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp makes 0600; a cache is meant to be readable like its directory
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


def _remember(path: Path, key: str, entry: dict) -> None:
    with _memory_guard:
        _memory.setdefault(str(path), {})[key] = entry


def _forget(path: Path, key: str) -> None:
    with _memory_guard:
        _memory.get(str(path), {}).pop(key, None)


def remove(path: Path) -> str:
    """Delete the cache file at ``path`` (under its lock) and this process's memory of it."""
    with _memory_guard:
        _memory.pop(str(path), None)
    try:
        with filelock.FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            path.unlink(missing_ok=True)
    except (OSError, filelock.Timeout) as error:
        return f"could not remove {path} ({type(error).__name__}: {error})"
    return f"removed {path}"


def clear_memory() -> None:
    """Forget every result kept in memory (tests)."""
    with _memory_guard:
        _memory.clear()
