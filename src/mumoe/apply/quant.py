"""Round-to-nearest quantization of expert weights (PMQ's quantizer) and the bit packing of its integers.

Asymmetric min-max per group of `group` consecutive input columns of a weight [d_out, d_in]:
    scale = (max − min) / (2^b − 1)   (1 where max = min),   zero = round(−min / scale),
    q = clamp(round(w / scale) + zero, 0, 2^b − 1),          w ≈ (q − zero) · scale.
Packing stores the b-bit integers of a tensor little-endian in a uint8 stream, ceil(n·b / 8) bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MumoeError


@dataclass(frozen=True)
class Quantized:
    """One weight [d_out, d_in] at `bits`: integers q [d_out, d_in] (uint8), per-group scale and zero
    [d_out, ceil(d_in / group)] (float32)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    def rows(self, start: int, stop: int | None = None) -> "Quantized":
        """Output rows start:stop of the weight (each row's groups are its own). -> Quantized [stop - start, d_in]"""
        return Quantized(self.q[start:stop], self.scale[start:stop], self.zero[start:stop], self.bits, self.group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d_out, d_in = self.q.shape
        s = self.scale.repeat_interleave(self.group, dim=1)[:, :d_in]
        z = self.zero.repeat_interleave(self.group, dim=1)[:, :d_in]
        return ((self.q.float() - z) * s).to(dtype)


def rtn(weight: torch.Tensor, bits: int, group: int = 128) -> Quantized:
    """Asymmetric min-max round-to-nearest of `weight` [d_out, d_in] in groups of `group` input columns."""
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise MumoeError(f"quantization width must be 1..8 bits, got {bits!r}")
    if group < 1:
        raise MumoeError(f"quantization group must be >= 1, got {group}")
    w = weight.detach().float()
    d_out, d_in = w.shape
    n = -(-d_in // group)
    pad = n * group - d_in
    g = torch.nn.functional.pad(w, (0, pad), value=float("nan")).reshape(d_out, n, group)  # [d_out, n, group]
    lo = torch.nan_to_num(g, nan=float("inf")).amin(-1)  # padding never sets the range
    hi = torch.nan_to_num(g, nan=float("-inf")).amax(-1)
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale is exact
    zero = torch.round(-lo / scale).clamp(0, qmax)
    q = torch.round(w / scale.repeat_interleave(group, 1)[:, :d_in]) + zero.repeat_interleave(group, 1)[:, :d_in]
    return Quantized(q.clamp(0, qmax).to(torch.uint8), scale, zero, bits, group)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The b-bit integers of `q` (any shape, values < 2^b) as a uint8 stream, little-endian, ceil(n·b/8) bytes."""
    flat = q.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.max()) >= 2 ** bits:
        raise MumoeError(f"a value does not fit in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # bit j of value i at i·b + j
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)


def unpack(data: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """`pack`'s inverse: uint8 integers of `shape`."""
    n = 1
    for s in shape:
        n *= s
    stream = ((data.to(torch.int64).unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: n * bits]
    vals = (stream.reshape(n, bits) << torch.arange(bits, dtype=torch.int64)).sum(1)
    return vals.to(torch.uint8).reshape(shape)


def packed_tensors(name: str, qz: Quantized) -> dict[str, torch.Tensor]:
    """The export's tensors of one quantized matrix: `name.q` (packed integers, uint8), `name.scale` (float32)
    and `name.zero` (uint8), [d_out, groups] each for the last two."""
    return {f"{name}.q": pack(qz.q, qz.bits), f"{name}.scale": qz.scale.float().contiguous(),
            f"{name}.zero": qz.zero.to(torch.uint8).contiguous()}


def from_packed(state: dict[str, torch.Tensor], name: str, bits: int, group: int,
                shape: tuple[int, int]) -> Quantized:
    """`packed_tensors`' inverse (the tensors popped from `state`)."""
    return Quantized(unpack(state.pop(f"{name}.q"), bits, shape), state.pop(f"{name}.scale").float(),
                     state.pop(f"{name}.zero").float(), bits, group)
