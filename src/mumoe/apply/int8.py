"""Weight-only int8 for per-prompt compacted decoding: the compacted matrices of μ-MoE's column structure gathered
from an int8 copy of each weight and multiplied by a CPU int8 kernel.

Each prunable weight W [.., N, K] gets, once per model, a symmetric per-output-row int8 copy
    scale_i = max_j |W_ij| / 127   (1 for an all-zero row),   Q_ij = round(W_ij / scale_i) ∈ [−127, 127]
kept beside the weight (`int8_copy`, dropped with it; the weight itself is unchanged, so dense requests and the
prefill keep the model's own precision). A row's scale does not depend on the columns, so a per-prompt
compaction is a gather of Q's kept columns (and rows) with the kept rows' scales — a quarter of the bytes of an
fp32 gather. Decoding then computes y = (x · Q[rows][:, keep]ᵀ) ⊙ scale[rows] with torch's weight-only int8
kernel (`_weight_int8pack_mm`, bf16 activations) on the CPU, or by dequantizing elsewhere.

Why: on this CPU a bf16 GEMV streams ~21 GB/s and `_weight_int8pack_mm` reads the int8 copy at ~14 GB/s of int8
(1.3x the tokens/s of bf16 on a whole model, 1.8x on a compacted one: `benchmarks/peer_decode.py`); with fp32
activations the same kernel is ~10x slower, so activations go through it in bf16. Its error: the per-row rounding
(relative ~1e-2 on random weights) plus bf16 activations.
"""

from __future__ import annotations

import torch

from ..settings import TensorCache

_COPIES = TensorCache()  # weight -> (its version, int8 copy [.., N, K], scales [.., N] float32)


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 of w [.., N, K] -> (Q int8 [.., N, K] row-major, scale float32 [.., N])."""
    w = w.detach().float()
    scale = w.abs().amax(-1) / 127.0  # [.., N]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale


def int8_copy(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 copy of `weight` (`quantize_rows`), made once and kept until the weight is modified or dropped."""
    hit = _COPIES.get(weight)
    if hit is not None and hit[0] == weight._version:
        return hit[1], hit[2]
    q, scale = quantize_rows(weight)
    _COPIES.set(weight, (weight._version, q, scale))
    return q, scale


def release_int8(model: torch.nn.Module) -> int:
    """Drop the int8 copies kept with `model`'s weights; -> bytes freed."""
    freed = 0
    for p in model.parameters():
        hit = _COPIES.pop(p)
        if hit is not None:
            freed += hit[1].numel() + 4 * hit[2].numel()
    return freed


K_MULTIPLE = 16  # torch 2.13's CPU kernel reads K in blocks of 16: other K crash or return garbage (measured)


def pad_k(q: torch.Tensor) -> torch.Tensor:
    """Q [N, K] with zero columns appended up to a multiple of K_MULTIPLE (Q itself when K already is one)."""
    pad = -q.shape[-1] % K_MULTIPLE
    return q if pad == 0 else torch.nn.functional.pad(q, (0, pad))


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """y = x · (Q ⊙ scale)ᵀ + b for x [.., K], Q int8 [N, K'] (contiguous; K' ≥ K: columns past K are zero, see
    `pad_k`), scale [N] -> [.., N] in x's dtype. CPU with K' a multiple of 16: torch's weight-only int8 kernel with
    bf16 activations (x padded with zeros to K'); otherwise dequantized, in x's dtype."""
    K = x.shape[-1]
    if x.device.type == "cpu" and q.shape[1] % K_MULTIPLE == 0:
        x2 = x.reshape(-1, K).to(torch.bfloat16)
        if q.shape[1] > K:
            x2 = torch.nn.functional.pad(x2, (0, q.shape[1] - K))
        y = torch.ops.aten._weight_int8pack_mm(x2, q, scale.to(torch.bfloat16)).to(x.dtype)
        y = y.reshape(*x.shape[:-1], q.shape[0])
    else:
        y = torch.nn.functional.linear(x, q[:, :K].to(x.dtype) * scale.to(x.dtype)[:, None])
    return y if bias is None else y + bias
