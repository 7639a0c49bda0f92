"""What the device and the installed libraries can do: probed once, cached, injectable for tests.

``ARCHS`` is the one table of GPU architecture limits.  The selector, the ahead-of-time compiler,
the autotune config space, the tests and ``python -m dispatchattn matrix`` all read it.
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


@dataclass(frozen=True)
class ArchInfo:
    """Limits of one GPU architecture that decide which kernels and tile configs can run on it."""

    name: str  # "sm_90", "gfx942"
    vendor: str  # "cuda" or "rocm"
    flagship: str
    smem_per_block: int  # bytes, the opt-in maximum for one block / workgroup
    warp_size: int
    max_regs_per_thread: int  # architectural VGPRs (AMD: arch + accumulation VGPRs)
    bf16: bool
    matrix_instr: str | None  # the fp16/bf16 matrix instruction Triton emits: mma.sync / wgmma / tcgen05 / mfma / wmma
    dense_fp16_tflops: float

    @property
    def sm(self) -> tuple[int, int] | None:
        if self.vendor != "cuda":
            return None
        number = int(self.name.removeprefix("sm_"))
        return divmod(number, 10)

    @property
    def triton_target(self) -> tuple[str, int | str, int]:
        """Arguments of ``triton.backends.compiler.GPUTarget`` for this arch."""
        if self.vendor == "cuda":
            major, minor = self.sm
            return ("cuda", major * 10 + minor, self.warp_size)
        return ("hip", self.name, self.warp_size)


# Shared memory per block and warp sizes: CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability" (opt-in maximum: 96 KB sm_70, 64 KB sm_75, 163 KB sm_80, 99 KB sm_86/89/120,
# 227 KB sm_90/100); AMD CDNA2/CDNA3 ISA guides and the ROCm "GPU hardware specifications" table
# (64 KB LDS per workgroup on gfx90a/gfx942/gfx1100, 160 KB on gfx950).  Registers: 255 per thread on
# every NVIDIA arch (PTX ISA); 512 VGPRs (256 arch + 256 AccVGPR) on CDNA, 256 on RDNA3 wave32.
# Dense fp16 TFLOPS: vendor datasheets (flagship part).  Matrix instructions: what Triton 3.x lowers
# tl.dot to on each target (checked by `python -m dispatchattn aot`).
ARCHS: dict[str, ArchInfo] = {
    a.name: a
    for a in (
        ArchInfo("sm_70", "cuda", "V100", 96 * 1024, 32, 255, False, "mma.sync", 125),
        ArchInfo("sm_75", "cuda", "T4", 64 * 1024, 32, 255, False, "mma.sync", 65),
        ArchInfo("sm_80", "cuda", "A100", 163 * 1024, 32, 255, True, "mma.sync", 312),
        ArchInfo("sm_86", "cuda", "A10 / RTX 3090", 99 * 1024, 32, 255, True, "mma.sync", 125),
        ArchInfo("sm_89", "cuda", "L4 / RTX 4090", 99 * 1024, 32, 255, True, "mma.sync", 121),
        ArchInfo("sm_90", "cuda", "H100", 227 * 1024, 32, 255, True, "wgmma", 989),
        ArchInfo("sm_100", "cuda", "B200", 227 * 1024, 32, 255, True, "tcgen05", 2250),
        ArchInfo("sm_120", "cuda", "RTX 5090", 99 * 1024, 32, 255, True, "mma.sync", 209.5),
        ArchInfo("gfx90a", "rocm", "MI250X", 64 * 1024, 64, 512, True, "mfma", 383),
        ArchInfo("gfx942", "rocm", "MI300X", 64 * 1024, 64, 512, True, "mfma", 1307),
        ArchInfo("gfx950", "rocm", "MI355X", 160 * 1024, 64, 512, True, "mfma", 2500),
        ArchInfo("gfx1100", "rocm", "RX 7900 XTX", 64 * 1024, 32, 256, True, "wmma", 123),
    )
}

# The targets the ahead-of-time checks and shipped defaults cover (sm_70/sm_75 predate Triton's
# fp16 tensor-core attention paths that we ship configs for).
AOT_TARGETS: tuple[str, ...] = (
    "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "gfx90a", "gfx942", "gfx950", "gfx1100",
)


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
