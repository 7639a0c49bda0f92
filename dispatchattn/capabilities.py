"""What the device and the installed libraries can do: probed once, cached, injectable for tests.

The architecture limits it reports (``DeviceCaps.arch_info``) come from ``vendor_tables.ARCHS``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from packaging.version import InvalidVersion, Version

from . import envs
from .vendor_tables import ARCHS, ArchInfo


@dataclass(frozen=True)
class Libraries:
    """Installed versions (None = not installed) of every library a backend may use."""

    torch: Version | None = None
    triton: Version | None = None
    flash_attn: Version | None = None  # FA2 (`flash_attn`)
    flash_attn_3: Version | None = None  # FA3 (`flash_attn_interface` / `flash_attn_3`), Hopper
    flash_attn_4: Version | None = None  # FA4 (`flash_attn.cute`)
    xformers: Version | None = None
    transformers: Version | None = None

    def describe(self) -> dict[str, str | None]:
        return {name: (str(v) if v is not None else None) for name, v in self.__dict__.items()}


@dataclass(frozen=True)
class DeviceCaps:
    """The device a call runs on, and what is installed to run it."""

    vendor: str  # "cuda", "rocm", "cpu", "mps", "xpu"
    arch: str | None = None  # "sm_90", "gfx942"; None on CPU
    device_name: str = "cpu"
    total_memory: int | None = None  # bytes
    multiprocessor_count: int | None = None
    libraries: Libraries = field(default_factory=Libraries)
    triton_interpret: bool = False

    @property
    def arch_info(self) -> ArchInfo | None:
        return ARCHS.get(self.arch) if self.arch else None

    @property
    def sm(self) -> tuple[int, int] | None:
        if self.vendor != "cuda" or not self.arch:
            return None
        return divmod(int(self.arch.removeprefix("sm_")), 10)

    @property
    def is_gpu(self) -> bool:
        return self.vendor in ("cuda", "rocm")

    def describe(self) -> str:
        if self.vendor == "cpu":
            return "cpu"
        where = self.vendor if not self.arch else f"{self.vendor} {self.arch}"
        return f"{where} ({self.device_name})"

    def to_dict(self) -> dict:
        return {
            "vendor": self.vendor,
            "arch": self.arch,
            "device_name": self.device_name,
            "total_memory": self.total_memory,
            "multiprocessor_count": self.multiprocessor_count,
            "libraries": self.libraries.describe(),
            "triton_interpret": self.triton_interpret,
        }

    @classmethod
    def synthetic(cls, arch: str, libraries: Libraries | None = None, **overrides) -> DeviceCaps:
        """Caps of a device we do not have, for "what would be chosen on an H100 / MI300X" questions.

        ``arch`` is a key of ``ARCHS`` or "cpu".  Libraries default to the ones installed here.
        """
        libs = libraries if libraries is not None else installed_libraries()
        if arch == "cpu":
            return replace(cls(vendor="cpu", libraries=libs), **overrides)
        if arch not in ARCHS:
            raise ValueError(f"arch: expected 'cpu' or one of {sorted(ARCHS)}, got {arch!r}")
        info = ARCHS[arch]
        caps = cls(vendor=info.vendor, arch=arch, device_name=info.flagship, libraries=libs)
        return replace(caps, **overrides)


def _dist_version(*names: str) -> Version | None:
    for name in names:
        try:
            return Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        except InvalidVersion:
            return Version("0")
    return None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def installed_libraries() -> Libraries:
    """Versions from package metadata: nothing is imported, so probing is cheap and side-effect free."""
    flash = _dist_version("flash-attn", "flash_attn")
    fa3 = _dist_version("flash-attn-3", "flash_attn_3")
    if fa3 is None and (_module_present("flash_attn_interface") or _module_present("flash_attn_3")):
        fa3 = Version("3.0.0")
    fa4 = _dist_version("flash-attn-4", "flash-attn4")
    return Libraries(
        torch=Version(torch.__version__.split("+")[0]),
        triton=_dist_version("triton", "pytorch-triton-rocm", "pytorch-triton"),
        flash_attn=flash,
        flash_attn_3=fa3,
        flash_attn_4=fa4,
        xformers=_dist_version("xformers"),
        transformers=_dist_version("transformers"),
    )


def parse_gfx_arch(gcn_arch_name: str) -> str:
    """"gfx942:sramecc+:xnack-" -> "gfx942"."""
    return gcn_arch_name.split(":", 1)[0].strip()


@functools.cache
def probe_device(device_type: str, index: int | None) -> DeviceCaps:
    """Caps of the real device (``pretend`` ignored), probed once per device."""
    libs = installed_libraries()
    interpret = envs.triton_interpret()
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
        common = dict(
            device_name=props.name,
            total_memory=props.total_memory,
            multiprocessor_count=props.multi_processor_count,
            libraries=libs,
            triton_interpret=interpret,
        )
        if torch.version.hip is not None:
            return DeviceCaps(vendor="rocm", arch=parse_gfx_arch(props.gcnArchName), **common)
        return DeviceCaps(vendor="cuda", arch=f"sm_{props.major}{props.minor}", **common)
    if device_type == "cpu":
        return DeviceCaps(vendor="cpu", device_name="cpu", libraries=libs, triton_interpret=interpret)
    return DeviceCaps(vendor=device_type, device_name=device_type, libraries=libs, triton_interpret=interpret)


#: The caps ``pretend`` installs, innermost last (read directly by the warm call and by traced code).
pretended: list[DeviceCaps] = []


def probe(device: torch.device) -> DeviceCaps:
    """Caps of ``device`` (probed once per device), or the caps installed by ``pretend``."""
    if pretended:
        return pretended[-1]
    return probe_device(device.type, device.index)


@contextlib.contextmanager
def pretend(caps: DeviceCaps) -> Iterator[DeviceCaps]:
    """Decide as if every tensor lived on ``caps``'s device (for tests and "what if" explanations)."""
    pretended.append(caps)
    try:
        yield caps
    finally:
        pretended.pop()
