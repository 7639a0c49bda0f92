"""The tile config of the in-house Triton kernels: what is tuned, cached and compiled ahead of time."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, order=True)
class TileConfig:
    """One launch configuration of a Triton attention kernel.

    ``block_m`` x ``block_n`` is the (query rows x key columns) tile; ``num_warps`` and ``num_stages``
    go to Triton as launch options.  The last three are AMD-only knobs (0 / 1 mean "Triton's default")
    and are forwarded only when compiling for a ``hip`` target.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    waves_per_eu: int = 0
    matrix_instr_nonkdim: int = 0
    kpack: int = 1

    def triton_options(self, vendor: str) -> dict[str, int]:
        """Keyword options for a kernel launch or ``triton.compile`` on ``vendor`` ("cuda", "rocm", "hip")."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if vendor in ("rocm", "hip"):
            options.update(
                waves_per_eu=self.waves_per_eu,
                matrix_instr_nonkdim=self.matrix_instr_nonkdim,
                kpack=self.kpack,
            )
        return options

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TileConfig:
        fields = cls.__dataclass_fields__
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(
                f"unknown TileConfig fields {sorted(unknown)}; expected a subset of {sorted(fields)}"
            )
        return cls(**{name: int(value) for name, value in data.items()})

    def short(self) -> str:
        text = f"BLOCK_M={self.block_m} BLOCK_N={self.block_n}"
        text += f" warps={self.num_warps} stages={self.num_stages}"
        if self.waves_per_eu or self.matrix_instr_nonkdim or self.kpack != 1:
            text += f" waves_per_eu={self.waves_per_eu} mfma={self.matrix_instr_nonkdim} kpack={self.kpack}"
        return text
