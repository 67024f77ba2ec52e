"""One-token decode steps at the CPU's read speed.

torch's CPU `F.linear` of a single row against a bf16/fp16 row-major weight takes a GEMM path that reads the
weight at ~13–14 GB/s on this project's 2-core machine; `torch.mv` of the same weight reads it at ~19 GB/s
(1.3–1.4x; interleaved medians, BENCHMARKS.md "One-token GEMV"). fp32 reads alike either way, so fp32 linears are
left alone. `linear` picks per call; `fast_decode(model)` routes a model's dense linears (half precision) and its
fused routed experts (half precision or fp32) through one-token paths — prefills (several tokens) keep
transformers' own paths, so only decode steps change. The experts' path runs only the picked experts: on the
CPU, transformers' grouped_mm runs a (mostly empty) matrix product for every expert of the layer at each step.
`fast_decode(model, int4_copies=True)` also makes weight-only int4 copies (`apply.int4`) that every call of at most
`int4.DECODE_ROWS` tokens reads instead of the weights (linears of any float dtype, the routed experts).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..models import MoELayer, adapter_for
from ..models.swap import set_forward
from ..progress import bar
from . import int4

HALF = (torch.bfloat16, torch.float16)
DECODE_DTYPES = (*HALF, torch.float32)  # the fused experts' one-token path


def prefers_mv(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x [.., K] · w [N, K]ᵀ should be `torch.mv`: one row of x, a row-major half-precision CPU weight."""
    return w.dtype in HALF and one_row(x, w)


def one_row(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x [.., K] is one row and w [N, K] a row-major CPU matrix of x's dtype (half precision or fp32)."""
    return (w.device.type == "cpu" and x.dtype == w.dtype and w.dtype in DECODE_DTYPES and w.dim() == 2
            and w.is_contiguous() and x.numel() == x.shape[-1])


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)`: x [.., K], w [N, K], b [N] -> [.., N]; at most `int4.DECODE_ROWS` rows against a weight
    with an int4 copy by the int4 kernel; one row against a half-precision row-major CPU weight by `torch.mv` (the
    same products, summed by another kernel: equal to rounding)."""
    if x.numel() <= int4.DECODE_ROWS * x.shape[-1]:
        q = int4.int4_copy(w)
        if q is not None:
            y = q[0].matmul(x)
            return y if b is None else y + b
    if not prefers_mv(x, w):
        return nn.functional.linear(x, w, b)
    y = torch.mv(w, x.reshape(-1))  # [N]
    if b is not None:
        y = y + b
    return y.view(*x.shape[:-1], w.shape[0])


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def one_token_experts(layer: MoELayer, general):
    """A fused experts forward (hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]) that runs a
    one-token step as one `torch.mv` per picked expert for gate_up and one `addmv_` per picked expert for down and
    the combine (out += w_e · down_e h_e, summed in the kernel's float accumulator; experts ascending; a slot whose
    index is E — transformers' expert-parallel sentinel, used by `testtime.skip` for a skipped slot — is not run;
    where the layer's weight scales the expert's input (`MoELayer.input_scaled`, Llama 4) it scales the input) and
    hands every other call to `general`. The weights are read at each call (swaps made after it are seen)."""
    return OneTokenExperts(layer, general)


class OneTokenExperts:
    """`one_token_experts`'s forward: an object, not a closure, so that a deep copy of the model (`mumoe compare`
    copies one per method) gets a forward over the copy's layer — a closure would keep running the original's."""

    def __init__(self, layer: MoELayer, general) -> None:
        self.layer, self.general = layer, general

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        layer, general = self.layer, self.general
        experts = layer.experts
        gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
        if hidden_states.shape[0] <= int4.DECODE_ROWS:
            gu4, dn4 = int4.int4_copy(gate_up), int4.int4_copy(down)
            if gu4 is not None and dn4 is not None:
                return int4_experts(layer, gu4, dn4, hidden_states, top_k_index, top_k_weights)
        if hidden_states.shape[0] != 1 or not one_row(hidden_states, gate_up[0]):
            return general(hidden_states, top_k_index, top_k_weights)
        gu_bias, dn_bias = layer.gate_up_bias, layer.down_bias  # [E, 2I], [E, H] or None
        x = hidden_states[0]  # [H]
        out = torch.zeros_like(x)  # [H]
        n_experts = gate_up.shape[0]
        for e, w in sorted(zip(top_k_index[0].tolist(), top_k_weights[0].tolist())):
            if e >= n_experts:
                continue
            xe, w = layer.expert_input(x, w)  # (Llama 4: w·x, and 1)
            gu = torch.mv(gate_up[e], xe) if gu_bias is None else torch.addmv(gu_bias[e], gate_up[e], xe)  # [2I]
            h = layer.activate(*gu.chunk(2))  # [I]
            if dn_bias is None:
                out.addmv_(down[e], h, alpha=w)
            else:
                out.add_(torch.addmv(dn_bias[e], down[e], h), alpha=w)
        return out.view(1, -1)


def int4_experts(layer: MoELayer, gu4: list, dn4: list, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
    """The routed experts of a few tokens (hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]) from
    their int4 copies (gu4 / dn4: one `int4.Int4Weight` per expert of gate_up [2I, H] and down [H, I]): each picked
    expert runs once on the tokens that picked it, experts ascending; a slot whose index is E or more (the skip
    sentinel) is not run."""
    gu_bias, dn_bias = layer.gate_up_bias, layer.down_bias  # [E, 2I], [E, H] or None
    n_experts = len(gu4)
    out = torch.zeros_like(hidden_states)  # [T, H]
    if hidden_states.shape[0] == 1:  # one token: its k picks, no grouping (a decode step: few operators)
        x = hidden_states  # [1, H]
        scaled, act = layer.input_scaled, (layer.act_fn if layer.glu is None else None)
        for e, w in sorted(zip(top_k_index[0].tolist(), top_k_weights[0].tolist())):
            if e >= n_experts:
                continue
            xe = x
            if scaled:
                xe, w = layer.expert_input(x, w)
            gu = gu4[e].matmul(xe)  # [1, 2I]
            if gu_bias is not None:
                gu = gu + gu_bias[e]
            gate, up = gu.chunk(2, dim=-1)
            h = act(gate).mul_(up) if act is not None else layer.glu(gate, up)  # (= layer.activate) [1, I]
            y = dn4[e].matmul(h)  # [1, H]
            out.add_(y if dn_bias is None else y + dn_bias[e], alpha=w)
        return out
    for e in torch.unique(top_k_index).tolist():  # ascending
        if e >= n_experts:
            continue
        tok, slot = (top_k_index == e).nonzero(as_tuple=True)  # [n], [n]
        xe, w = layer.expert_input(hidden_states[tok], top_k_weights[tok, slot, None])  # [n, H], [n, 1]
        gu = gu4[e].matmul(xe) if gu_bias is None else gu4[e].matmul(xe) + gu_bias[e]  # [n, 2I]
        y = dn4[e].matmul(layer.activate(*gu.chunk(2, dim=-1)))  # [n, H]
        if dn_bias is not None:
            y = y + dn_bias[e]
        out.index_add_(0, tok, y * w.to(y.dtype) if isinstance(w, torch.Tensor) else y * w)
    return out


def _plain_experts(experts: nn.Module) -> bool:
    """Fused experts on the CPU (half precision or fp32) whose forward is gate_up, the gate, down and the combine —
    nothing `one_token_experts` lacks."""
    w = getattr(experts, "gate_up_proj", None)
    return (w is not None and w.device.type == "cpu" and w.dtype in DECODE_DTYPES and getattr(experts, "has_gate", True)
            and not getattr(experts, "is_transposed", False) and not getattr(experts, "has_post_expert_norm", False))


def fast_decode(model: nn.Module, int4_copies: bool = False) -> int:
    """Route `model`'s one-token steps on the CPU through `linear` and `one_token_experts`: every nn.Linear with a
    half-precision weight, and the fused routed experts of its MoE layers in half precision or fp32. Instance
    forwards only (the classes, the weights and every multi-token call unchanged); idempotent. int4_copies: also
    make int4 copies (`apply.int4`, once; the output head's in int8) of every such linear — fp32 ones too — and of
    those experts, which calls of up to `int4.DECODE_ROWS` tokens then read (weights the kernel does not take keep
    their own precision). `apply.step.build` then builds the lean one-token step on top (the same operators without
    transformers' per-layer glue, bit-identical; Llama-layout families).
    -> modules changed."""
    linears = [m for m in model.modules()
               if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward  # (not a subclass's own:
               # PhiMoE's router, DeepSeek-V4's projections)
               and m.weight.device.type == "cpu" and m.weight.dtype in (HALF if not int4_copies else DECODE_DTYPES)]
    moe_layers = adapter_for(model).moe_layers()  # (none for a dense model)
    layers = [layer for layer in moe_layers if _plain_experts(layer.experts)]
    if int4_copies:  # not the routers: a 4-bit router flips expert choices, for a negligible share of the reads
        routers = {id(m) for layer in moe_layers for m in layer.router.modules()}
        pairs = [(layer.experts.gate_up_proj, layer.experts.down_proj) for layer in layers]
        weights = [m.weight for m in linears if id(m) not in routers] + [
            t for pair in pairs if all(int4.fits(*t.shape[-2:]) for t in pair) for t in pair]  # (both, or neither)
        head = model.get_output_embeddings()
        head = head.weight if isinstance(head, nn.Linear) else None
        for w in bar(weights, desc="int4 copies", unit="tensor"):
            if int4.int4_copy(w) is None:
                int4.make_copy(w, bits=8 if w is head else 4)  # (the output head in int8: `apply.int4`)
    n = 0
    for module in linears:
        if "forward" not in module.__dict__:
            set_forward(module, types.MethodType(_linear_forward, module))
            n += 1
    for layer in layers:
        if "forward" not in layer.experts.__dict__:
            set_forward(layer.experts, one_token_experts(layer, layer.experts.forward))
            n += 1
    return n
