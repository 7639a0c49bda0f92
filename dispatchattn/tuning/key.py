"""What a tuned config is keyed on: the device, the versions that compiled it, and the problem's bucket.

Problems that tune alike share an entry: sequence lengths are bucketed to the next power of two and
masks to a structure class (``dense``, ``causal``, ``sparse:1/4`` ... by the fraction of tiles that are
visited, ``sparse:unknown`` when only tensor data or an opaque function could tell).  Versions are part
of the key (and of the file name), so an upgrade of Triton or dispatchattn never reuses stale configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import version
from ..capabilities import DeviceCaps
from ..masks import Causal, Full, MaskMod
from ..paths import cache_root
from ..spec import AttentionSpec
from .store import slug

MIN_SEQ_BUCKET = 16
#: The density of a structured mask is measured on at most this many tiles per side.
DENSITY_GRID = 256
MAX_SPARSE_LEVEL = 6  # "sparse:1/64" is the sparsest bucket


@dataclass(frozen=True)
class TuneKey:
    """Everything a tuned config depends on.  ``entry`` names it inside its file; ``scope`` names the file."""

    kernel: str
    vendor: str
    arch: str
    device_name: str
    triton: str
    dispatchattn: str
    dtype: str
    head_dim: int
    head_dim_v: int
    gqa: int
    mask_class: str
    seq_q_bucket: int
    seq_kv_bucket: int

    @property
    def entry(self) -> str:
        """E.g. ``"fwd float16 d128/128 gqa4 causal q4096 kv4096"``."""
        return (
            f"{self.kernel} {self.dtype} d{self.head_dim}/{self.head_dim_v} gqa{self.gqa} {self.mask_class}"
            f" q{self.seq_q_bucket} kv{self.seq_kv_bucket}"
        )

    @property
    def header(self) -> dict:
        """The fields every entry of one cache file shares (checked when the file is read)."""
        return {
            "device": {"vendor": self.vendor, "arch": self.arch, "name": self.device_name},
            "versions": {"triton": self.triton, "dispatchattn": self.dispatchattn},
        }

    @property
    def file_name(self) -> str:
        """One file per device and versions: ``sm_90-nvidia-h100/triton-3.9.0_dispatchattn-0.1.0.json``."""
        device = slug(f"{self.arch}-{self.device_name}")
        return f"{device}/triton-{slug(self.triton)}_dispatchattn-{slug(self.dispatchattn)}.json"

    def to_dict(self) -> dict:
        return asdict(self)


def seq_bucket(length: int) -> int:
    """The next power of two at least ``length`` (and at least 16)."""
    return max(MIN_SEQ_BUCKET, 1 << (max(int(length), 1) - 1).bit_length())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _has_tensor_data(mask: MaskMod) -> bool:
    return bool(mask._tensor_ids())


def _density(mask: MaskMod, seq_q: int, seq_kv: int) -> float:
    """Fraction of (q tile, kv tile) pairs the kernel visits, on a grid of at most DENSITY_GRID per side."""
    block_m = max(128, -(-seq_q // DENSITY_GRID))
    block_n = max(128, -(-seq_kv // DENSITY_GRID))
    maybe_any, _ = mask.bind(seq_q, seq_kv).tile_classes(block_m, block_n, seq_q, seq_kv)
    return float(maybe_any.float().mean())


def density_bucket(density: float) -> str:
    """``dense`` above 0.9, else ``sparse:1/2^k``, the smallest power-of-two fraction >= ``density``."""
    if density > 0.9:
        return "dense"
    level = 1
    while level < MAX_SPARSE_LEVEL and density <= 0.5 ** (level + 1):
        level += 1
    return f"sparse:1/{2**level}"


def mask_class(spec: AttentionSpec) -> str:
    """``dense`` / ``causal`` / ``sparse:1/2^k`` / ``sparse:unknown`` for the spec's mask."""
    mask = spec.mask
    if mask is None or isinstance(mask, Full):
        return "causal" if spec.is_causal else "dense"
    if not isinstance(mask, MaskMod) or _has_tensor_data(mask):
        return "sparse:unknown"  # an opaque function or document ids: only tensor data could tell
    if isinstance(mask, Causal):
        return "causal"
    try:
        return density_bucket(_density(mask, spec.seq_q, spec.seq_kv))
    except Exception:  # a mask that cannot classify its tiles still gets a (shared) key
        return "sparse:unknown"


def make_key(kernel: str, spec: AttentionSpec, caps: DeviceCaps) -> TuneKey:
    """The cache key of ``kernel`` ("fwd" / "bwd") for ``spec`` on ``caps``'s device."""
    triton = caps.libraries.triton
    return TuneKey(
        kernel=kernel,
        vendor=caps.vendor,
        arch=caps.arch or caps.vendor,
        device_name=caps.device_name,
        triton=str(triton) if triton is not None else "none",
        dispatchattn=version.__version__,  # read per call: an upgrade in place changes the key
        dtype=dtype_name(spec.dtype),
        head_dim=spec.head_dim,
        head_dim_v=spec.head_dim_v,
        gqa=max(1, spec.heads_q // max(spec.heads_kv, 1)),
        mask_class=mask_class(spec),
        seq_q_bucket=seq_bucket(spec.seq_q),
        seq_kv_bucket=seq_bucket(spec.seq_kv),
    )


def autotune_dir() -> Path:
    """``<cache root>/autotune``: one sub-directory per device, one JSON file per set of versions."""
    return cache_root() / "autotune"


def user_cache_path(key: TuneKey) -> Path:
    """The user-cache file that holds ``key``'s entry."""
    return autotune_dir() / key.file_name
