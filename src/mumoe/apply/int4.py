"""Weight-only int4 for decode steps: group-wise 4-bit copies of a model's linears and routed experts, multiplied
by torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations).

Each weight W [N, K] (N output rows, K inputs) gets, once per model, an asymmetric 4-bit copy in groups of G = 32
consecutive inputs of a row (llama.cpp's Q4_1 grain):
    lo, hi = min, max of the group;  s = (hi − lo) / 15 and z = lo + 8·s, both rounded to bf16 (what the kernel
    reads);  q = clamp(round((W − z) / s) + 8, 0, 15);  W ≈ (q − 8)·s + z
(a group of equal values: s = 1, z = the value + 8 — exact). The copy is kept beside the weight (`int4_copy`, dropped
with it); the weight itself is unchanged, so prefills (many tokens: the kernel costs 6–12x a bf16 GEMM there,
measured) and μ-MoE's per-prompt compaction keep the model's own precision, and only calls of at most
`DECODE_ROWS` tokens — decode steps, batched or not — read the copy. The output head is copied in int8 instead
(per-row scales, `apply.int8`'s kernel), as llama.cpp's Q4_K_M keeps its output in 6 bits: on the bundled model a
4-bit head alone costs a third of int4's perplexity loss, for ~5% of a large model's reads.

Why (measured on the 2-core Xeon of BENCHMARKS.md, "Weight-only int4 decode copies"): a one-row product reads the
int4 copy of a 5632×2048 matrix in 0.41–0.47 ms against 0.9–1.2 ms for torch.mv of the bf16 weight and 0.9–1.3 ms
for the int8 kernel — 0.625 bytes per weight, read about as fast. Its error: the 4-bit rounding (~8% of a random
Gaussian matrix's weights, rms — llama.cpp's Q4 grain) plus bf16 activations. The kernel needs N a multiple of 16
and K of G; other weights keep their own precision (`fits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import TensorCache
from . import masking
from .int8 import int8_linear, pad_k, quantize_rows

GROUP = 32  # inputs per scale/zero pair (the kernel takes 32, 64, 128 or 256)
DECODE_ROWS = 32  # calls with at most this many tokens read the int4 copy (decode steps, batched up to 32)
_COPIES = TensorCache()  # weight -> (its state, [Int4Weight or Int8Rows per matrix]) — one for a 2-D weight


def fits(n_out: int, n_in: int, group: int = GROUP) -> bool:
    """Whether torch's CPU int4 kernel takes an [n_out, n_in] weight in groups of `group` inputs."""
    return n_out % 16 == 0 and n_in % group == 0 and n_in >= group


@torch.no_grad()
def quantize_groups(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit of w [N, K] in groups of `group` inputs (the module docstring's rule) -> (codes uint8 [N, K]
    in 0..15, scale [N, K/group] and zero [N, K/group], float32 holding bf16 values): W ≈ (codes − 8)·scale + zero
    per group."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)  # [N, G', group]
    lo, hi = g.amin(-1), g.amax(-1)  # [N, G']
    scale = ((hi - lo) / 15).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    codes = torch.round((g - zero[..., None]) / scale[..., None]).add_(8).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(codes − 8)·scale + zero: codes [N, K], scale and zero [N, K/group] -> float32 [N, K]."""
    n, k = codes.shape
    group = k // scale.shape[1]
    q = codes.float().reshape(n, -1, group) - 8
    return (q * scale[..., None] + zero[..., None]).reshape(n, k)


@dataclass
class Int4Weight:
    """One matrix [N, K] in the kernel's layout: packed codes (uint8 [N, K/2]) and bf16 (scale, zero) pairs
    [K/group, N, 2]."""

    packed: torch.Tensor
    scale_zero: torch.Tensor
    group: int
    n_out: int
    n_in: int

    @classmethod
    def of(cls, w: torch.Tensor, group: int = GROUP) -> "Int4Weight":
        """The int4 copy of w [N, K] (`fits` must hold)."""
        codes, scale, zero = quantize_groups(w, group)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scale_zero = torch.stack([scale, zero], -1).transpose(0, 1).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
        return cls(packed, scale_zero, group, w.shape[0], w.shape[1])

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.scale_zero.numel()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., K] · Wᵀ -> [.., N] in x's dtype (x taken in bf16)."""
        if x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous():  # bf16 rows: the kernel alone
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zero)
        x2 = x.reshape(-1, self.n_in).to(torch.bfloat16)  # [M, K]
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)  # [M, N]
        return y.to(x.dtype).view(*x.shape[:-1], self.n_out)


@dataclass
class Int8Rows:
    """One matrix [N, K] as symmetric per-row int8 (`apply.int8.quantize_rows`, K zero-padded for the kernel)."""

    q: torch.Tensor  # int8 [N, K']
    scale: torch.Tensor  # float32 [N]

    @classmethod
    def of(cls, w: torch.Tensor) -> "Int8Rows":
        q, scale = quantize_rows(w)
        return cls(pad_k(q), scale)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scale.numel()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., K] · Wᵀ -> [.., N] in x's dtype (x taken in bf16 by the CPU int8 kernel)."""
        return int8_linear(x, self.q, self.scale)


def state(weight: torch.Tensor) -> int:
    """What a copy of `weight` describes: its in-place version (a copy made before an in-place change is stale)."""
    return weight._version


def unchanged(weight: torch.Tensor, recorded: int) -> bool:
    """Whether `weight` holds what it held when `state` gave `recorded`: not modified in place since, and no masked
    copy swapped in as its `.data` now (μ-MoE's row masks: `apply.masking.swap_masked`, the version unchanged)."""
    return state(weight) == recorded and not masking.is_swapped(weight)


def make_copy(weight: torch.Tensor, group: int = GROUP, bits: int = 4) -> int:
    """Make and keep the int4 copy (bits=8: the int8 one) of a CPU weight [N, K] or stacked experts' weight
    [E, N, K] (one per matrix) when every matrix fits the kernel; -> bytes of the copy (0: none made)."""
    if weight.device.type != "cpu" or weight.dim() not in (2, 3) or (bits == 4 and not fits(*weight.shape[-2:], group)):
        return 0
    make = (lambda m: Int4Weight.of(m, group)) if bits == 4 else Int8Rows.of
    mats = [make(m) for m in (weight if weight.dim() == 3 else [weight])]
    _COPIES.set(weight, (state(weight), mats))
    return sum(m.nbytes for m in mats)


def int4_copy(weight: torch.Tensor) -> list[Int4Weight | Int8Rows] | None:
    """The int4 copies kept for `weight` (one per matrix), or None where there are none or the weight was
    modified in place since they were made, or it holds a masked copy now (μ-MoE's row masks swap one in as its
    `.data`, the version unchanged: `apply.masking.swap_masked`)."""
    hit = _COPIES.get(weight)
    if hit is None or not unchanged(weight, hit[0]):
        return None
    return hit[1]


def fuse(weights: list[torch.Tensor]) -> Int4Weight | None:
    """One int4 matrix for sibling weights that read the same input (q, k, v; gate, up): their rows quantized as
    one [ΣN, K] — the same codes, scales and zeros as their own copies (the rule is per row) — so one kernel call
    computes all their products, each output row bit for bit as its own copy computes it (tested). Where a
    weight's own packed codes are the stacked ones' rows (the kernel packs rows in blocks of 64: row offsets and
    counts that are multiples of 64, as in real models' projections; checked, not assumed), its copy is re-kept as
    a view of them, so the codes are held once; the bf16 scales and zeros are held twice (the kernel ignores
    strides: a strided slice of the stacked ones gives wrong products, measured) — 0.125 bytes per weight more.
    -> the stacked matrix, or None where a weight has no current int4 copy of one matrix or they differ in inputs
    or group."""
    copies = [int4_copy(w) for w in weights]
    if any(c is None or len(c) != 1 or not isinstance(c[0], Int4Weight) for c in copies):
        return None
    mats = [c[0] for c in copies]
    if len({(m.n_in, m.group) for m in mats}) != 1:
        return None
    fused = Int4Weight.of(torch.cat([w.detach() for w in weights]), mats[0].group)  # [ΣN, K]
    start = 0
    for w, m in zip(weights, mats):
        rows = fused.packed[start:start + m.n_out]
        if torch.equal(rows, m.packed):
            _COPIES.set(w, (state(w), [Int4Weight(rows, m.scale_zero, m.group, m.n_out, m.n_in)]))
        start += m.n_out
    return fused


def copy_bytes(model: torch.nn.Module) -> int:
    """Bytes of the int4 copies kept for `model`'s weights (0: none)."""
    return sum(sum(m.nbytes for m in c) for p in model.parameters() if (c := int4_copy(p)) is not None)
