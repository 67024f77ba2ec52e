"""Column structure, compacted: keep the chosen input columns of each weight and gather the inputs, so the
matmuls are genuinely smaller (no sparse kernel needed).

Dense linears become `CompactLinear` (W[:, keep], x[..., keep]); fused experts get a forward that gathers
each expert's kept input columns for gate_up (of H) and down (of I). `uncompact` puts the originals back.

Gathering columns of a row-major matrix is a strided copy (~20–60 ms for a 5632×2048 fp32 matrix on this
machine). `prepare_columns` stores every prunable weight column-major once per model — same values, same
shapes, strides swapped — after which W[:, keep] is a copy of whole contiguous rows of Wᵀ (~2 ms), and the
compacted matrix is itself column-major, which batch-1 GEMV reads at least as fast.

The compacted copies are written into a buffer kept with each original weight and reused by the next
prompt: a fresh allocation per prompt costs more in page faults than the gather itself. The buffers grow to
the largest ρ used (at most one extra copy of the prunable weights); `release_buffers(model)` frees them.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..models import adapter_for


def is_column_major(w: torch.Tensor) -> bool:
    """True when the last two dims of w [.., d_out, d_in] are stored transposed (Wᵀ contiguous per matrix)."""
    return w.dim() >= 2 and w.transpose(-1, -2).is_contiguous()


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same tensor [.., d_out, d_in] with column-major storage (one copy unless it already is)."""
    return w if is_column_major(w) else w.transpose(-1, -2).contiguous().transpose(-1, -2)


def gather_columns(w: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W[:, keep] of one matrix [d_out, d_in] -> [d_out, k]: a row gather of Wᵀ when w is column-major
    (result column-major too), else an index_select along the columns. `out`: a flat buffer of ≥ d_out·k
    elements to write into instead of allocating."""
    d_out, k = w.shape[0], keep.numel()
    if is_column_major(w):
        if out is None:
            return w.t().index_select(0, keep).t()
        return torch.index_select(w.t(), 0, keep, out=out[: k * d_out].view(k, d_out)).t()
    if out is None:
        return w.index_select(-1, keep)
    return torch.index_select(w, 1, keep, out=out[: d_out * k].view(d_out, k))


_BUFFER = "_mumoe_compact_buffer"


def _claim(w: torch.Tensor, numel: int) -> tuple[torch.Tensor, list]:
    """A flat buffer of ≥ numel elements kept with weight w and reused across prompts; -> (buffer, undo
    entries). A buffer already in use (nested compaction) is not shared: a fresh one is returned."""
    entry = getattr(w, _BUFFER, None)
    if entry is not None and entry["busy"]:
        return torch.empty(numel, dtype=w.dtype, device=w.device), []
    if entry is None or entry["buf"].numel() < numel:
        entry = {"buf": torch.empty(numel, dtype=w.dtype, device=w.device), "busy": False}
        setattr(w, _BUFFER, entry)
    entry["busy"] = True
    return entry["buf"], [(entry, "busy", False)]


def release_buffers(model: nn.Module) -> int:
    """Free the compaction buffers kept with `model`'s weights (they are re-created on the next compaction);
    -> bytes freed."""
    freed = 0
    for p in model.parameters():
        entry = getattr(p, _BUFFER, None)
        if entry is not None and not entry["busy"]:
            freed += entry["buf"].numel() * entry["buf"].element_size()
            delattr(p, _BUFFER)
    return freed


@torch.no_grad()
def prepare_columns(model: nn.Module) -> int:
    """Store every prunable weight of `model` column-major, in place (values and shapes unchanged), so that
    per-prompt compaction is cheap. Idempotent; returns the number of weights converted. Costs one copy of each
    weight, once per model."""
    from .masks import prunable_names

    params = dict(model.named_parameters())
    n = 0
    for name in prunable_names(model):
        p = params[name]
        if not is_column_major(p):
            p.data = column_major(p.data)
            n += 1
    return n


class CompactLinear(nn.Module):
    """y = W[:, keep] · x[..., keep] + b. weight [d_out, k], keep [k]."""

    def __init__(self, linear: nn.Linear, keep: torch.Tensor, out: torch.Tensor | None = None) -> None:
        super().__init__()
        self.original = linear
        self.register_buffer("keep", keep.to(linear.weight.device), persistent=False)
        self.weight = nn.Parameter(gather_columns(linear.weight.detach(), self.keep, out), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.index_select(-1, self.keep), self.weight, self.bias)


def _compact_experts_forward(layer, keep_in: torch.Tensor, keep_mid: torch.Tensor, undo: list):
    """keep_in [E, kH] input columns of gate_up per expert; keep_mid [E, kI] intermediate columns of down."""
    E, kH, kI = keep_in.shape[0], keep_in.shape[1], keep_mid.shape[1]
    gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    two_i, H = gate_up.shape[1], down.shape[1]
    buf_gu, rel = _claim(layer.experts.gate_up_proj, E * two_i * kH)
    undo += rel
    buf_dn, rel = _claim(layer.experts.down_proj, E * H * kI)
    undo += rel
    gu = [gather_columns(gate_up[e], keep_in[e], buf_gu[e * two_i * kH :]) for e in range(E)]  # E × [2I, kH]
    dn = [gather_columns(down[e], keep_mid[e], buf_dn[e * H * kI :]) for e in range(E)]  # E × [H, kI]
    act = layer.act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == e)
            x = hidden_states[tok].index_select(-1, keep_in[e])  # [n, kH]
            gate, up = nn.functional.linear(x, gu[e]).chunk(2, dim=-1)
            h = (act(gate) * up).index_select(-1, keep_mid[e])  # [n, kI]
            y = nn.functional.linear(h, dn[e]) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


def _columns(mask: torch.Tensor) -> torch.Tensor:
    """Kept input columns of a column-structured mask [.., d_out, d_in] -> [.., k] (same count per matrix)."""
    cols = mask.select(-2, 0) if mask.stride(-2) == 0 else mask.any(-2)  # [.., d_in]; expanded masks: one row
    return torch.stack([c.nonzero().flatten() for c in cols.reshape(-1, cols.shape[-1])]).reshape(*cols.shape[:-1], -1)


def compact(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Swap in compacted modules / expert forwards for column-structured `masks`; returns an undo list."""
    adapter = adapter_for(model)
    modules = dict(model.named_modules())
    undo = []
    for name, mask in masks.items():
        if name.endswith(".weight"):
            parent_name, _, attr = name[: -len(".weight")].rpartition(".")
            parent = modules[parent_name] if parent_name else model
            lin = getattr(parent, attr)
            keep = _columns(mask)
            buf, rel = _claim(lin.weight, lin.weight.shape[0] * keep.numel())
            undo += rel
            setattr(parent, attr, CompactLinear(lin, keep, buf))
            undo.append((parent, attr, lin))
    names = {id(m): n for n, m in modules.items()}
    for layer in adapter.moe_layers():
        prefix = names[id(layer.experts)]
        if f"{prefix}.gate_up_proj" in masks:
            keep_in = _columns(masks[f"{prefix}.gate_up_proj"])  # [E, kH]
            keep_mid = _columns(masks[f"{prefix}.down_proj"])  # [E, kI]
            undo.append((layer.experts, "forward", layer.experts.__dict__.get("forward")))
            forward = _compact_experts_forward(layer, keep_in, keep_mid, undo)
            layer.experts.forward = types.MethodType(forward, layer.experts)
    return undo


def uncompact(undo: list) -> None:
    """Put back what `compact` swapped out; its buffers become free for the next prompt."""
    for owner, attr, original in reversed(undo):
        if isinstance(owner, dict):  # a buffer claim
            owner[attr] = original
        elif attr == "forward" and original is None:
            del owner.forward
        else:
            setattr(owner, attr, original)
