"""Modelling code for a checkpoint pruned by mumoe into a shape a plain transformers config cannot describe:
a different number of routed experts per layer, or experts of different widths (HEAPr's global form).

Load it with transformers alone (mumoe need not be installed):

    AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True ...

The class is the architecture's own transformers class (BASE_CLASS, written by the export) with each MoE layer
reshaped from config.mumoe_layers before the weights are read:
    {"layer": i, "experts": E_i}             that layer keeps E_i experts (router rows and fused tensors)
    {"layer": i, "experts": M_i,             M_i merged experts; the router keeps all its rows and each pick e is
     "expert_map": [m_0, ..., m_E-1]}        routed to merged expert m_e (a bound merge: two picks may add up)
    {"layer": i, "widths": [k_0, ..., k_E]}  expert e keeps k_e atoms: per-expert tensors
                                             mlp.experts.<e>.gate_up [2k_e, H] and mlp.experts.<e>.down [H, k_e]
                                             (+ <e>.gate_up_bias [2k_e], <e>.down_bias [H] where experts have biases;
                                             mlp.experts.<e>.up [k_e, H] where they have no gate: Nemotron-H;
                                             JetMoE's block, which keeps them as input_linear / output_linear,
                                             is given the fused experts call first)
    {..., "shared_width": k_s}               the shared expert keeps k_s neurons (its gate/up rows, down columns)
    {"layer": i, "bits": [b_0, ..., b_E-1],  PMQ: expert e at b_e bits, round-to-nearest in groups of g input
     "group": g}                             columns: mlp.experts.<e>.gate_up.{q,scale,zero} and .down.{q,scale,zero}
                                             (.up.{q,scale,zero} [k, H] where experts have no gate)
                                             (q: the b-bit integers packed little-endian into uint8; scale float32,
                                             zero uint8, one per group); each expert is dequantized when it runs,
                                             w = (q − zero) · scale
Engines that build their own model from the config (llama.cpp's converter, vLLM) do not know the
architecture name "MumoeForCausalLM" and refuse it; export with a uniform form for them.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN

BASE_CLASS = "Qwen3MoeForCausalLM"  # rewritten by the export: the source architecture's CausalLM class
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                "n_experts")
_BLOCKS = ("mlp", "feed_forward", "block_sparse_moe", "mixer")  # where transformers v5 families keep the sparse block
_SHARED = ("shared_experts", "shared_expert", "shared_mlp", "shared_expert_gate")


class _ExpertsHolder(nn.Module):
    """JetMoE's experts (`input_linear`, `output_linear` of its sparse block) as a fused experts module's tensors:
    gate_up_proj [E, 2I, H], down_proj [E, H, I]; replaced by the per-expert form's modules before any forward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = block.input_linear.weight, block.output_linear.weight
        self.act_fn = block.activation  # the block's own, from its config


class _JetMoeBlock(nn.Module):
    """JetMoE's sparse MLP with its experts behind the fused experts call (the rest of this file replaces them):
    top-k of the router's fp32 logits, softmax over those k, Σ_j g_j f_j(x) + the block's bias."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.router, self.bias = block.router, block.bias  # router.layer [E, H]; bias [H]
        self.experts = _ExpertsHolder(block)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, H = hidden_states.shape
        flat = hidden_states.reshape(-1, H)
        top, index = self.router.layer(flat).float().topk(self.router.top_k, dim=1)
        weights = torch.softmax(top, dim=1).type_as(flat)
        return self.experts(flat, index, weights).view(B, L, H) + self.bias


def _sparse_block(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if hasattr(mlp, "input_linear") and hasattr(mlp, "output_linear"):  # JetMoE's block
        layer.mlp = mlp = _JetMoeBlock(mlp)
        return mlp
    for name in _BLOCKS:
        block = getattr(layer, name, None)
        experts = getattr(block, "experts", None)
        if any(isinstance(getattr(experts, n, None), torch.Tensor) for n in ("gate_up_proj", "up_proj")):
            return block  # (up_proj alone: experts without a gate, Nemotron-H)
    raise ValueError(f"no sparse MoE block ({', '.join(_BLOCKS)}) in decoder layer {type(layer).__name__}")


def _routing_tensors(block: nn.Module, experts: int) -> list:
    """(module, name, expert axis) of every tensor of the block outside its experts, shared experts and norms
    with one entry per routed expert (router rows and biases, selection biases wherever the family keeps them;
    `experts` counts a router's identity experts too where it has them, LongCat-Flash's). The rule of mumoe's
    `Adapter.router_tensors`, restated: this file loads with transformers alone."""
    skip = {id(m) for part in [block.experts, *(getattr(block, n, None) for n in _SHARED)] if part is not None
            for m in part.modules()}
    out = []
    for module in block.modules():
        if id(module) in skip or "Norm" in type(module).__name__:
            continue
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or t.dim() == 0:
                continue
            if t.shape[0] == experts:
                out.append((module, name, 0))
            elif t.dim() == 2 and tuple(t.shape) == (1, experts):
                out.append((module, name, 1))
    return out


def _resize(module: nn.Module, name: str, rows: int, dim: int = 0) -> None:
    """Replace parameter/buffer `name` by an uninitialised one with `rows` entries on axis `dim` (the checkpoint
    fills it)."""
    old = getattr(module, name, None)
    if old is None:
        return
    shape = list(old.shape)
    shape[dim] = rows
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = new


def _bound_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    # the router's picks [T, k] among the source experts -> the merged experts they belong to
    mapping = torch.tensor(self.mumoe_expert_map, dtype=torch.long, device=top_k_index.device)  # [E]
    return super(type(self), self).forward(hidden_states, mapping[top_k_index], top_k_weights, *args, **kwargs)


def _bind(experts: nn.Module, mapping: list[int]) -> None:
    experts.mumoe_expert_map = tuple(int(m) for m in mapping)  # a plain attribute: no buffer to initialise
    cls = type(experts)
    if not getattr(cls, "_mumoe_bound", False):
        experts.__class__ = type(f"Bound{cls.__name__}", (cls,), {"forward": _bound_forward, "_mumoe_bound": True})


class _Expert(nn.Module):
    def __init__(self, width: int, hidden: int, dtype: torch.dtype, bias: bool, gated: bool = True) -> None:
        super().__init__()
        if gated:
            self.gate_up = nn.Parameter(torch.empty(2 * width, hidden, dtype=dtype))  # [2k, H]: gate rows, then up
        else:  # experts without a gate (Nemotron-H: down · act(up x))
            self.up = nn.Parameter(torch.empty(width, hidden, dtype=dtype))  # [k, H]
        self.down = nn.Parameter(torch.empty(hidden, width, dtype=dtype))  # [H, k]
        if bias:  # experts with biases (GPT-OSS)
            self.gate_up_bias = nn.Parameter(torch.empty(2 * width, dtype=dtype))  # [2k]: gate, then up
            self.down_bias = nn.Parameter(torch.empty(hidden, dtype=dtype))  # [H]


class RaggedExperts(nn.Module):
    """Routed experts of different widths; the same call as transformers' fused experts module. The gate is the
    source experts module's own (`_apply_gate`, which transformers gives every fused experts class: act(gate) *
    up, or GPT-OSS's clamped SwiGLU on interleaved columns), run on a copy of the attributes it reads."""

    def __init__(self, widths: list[int], hidden: int, act: str, dtype: torch.dtype,
                 source: nn.Module | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim = len(widths), hidden
        bias = getattr(source, "gate_up_proj_bias", None) is not None
        self.gated = getattr(source, "has_gate", True)  # transformers' experts modules say whether they have one
        for e, k in enumerate(widths):
            self.add_module(str(e), _Expert(k, hidden, dtype, bias, self.gated))
        self.act_fn = getattr(source, "act_fn", None) or ACT2FN[act]
        self.alpha, self.limit = getattr(source, "alpha", None), getattr(source, "limit", None)
        self._gate = getattr(type(source), "_apply_gate", None)  # a plain function of (module, gate_up)
        self.interleaved = not getattr(source, "is_concatenated", True)

    def _activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self._gate is None:
            return self.act_fn(gate) * up
        gate_up = torch.stack([gate, up], -1).flatten(-2) if self.interleaved else torch.cat([gate, up], -1)
        return self._gate(self, gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [T, H]; top_k_index, top_k_weights [T, top_k]; index num_experts = a skipped slot
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e >= self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            expert = getattr(self, str(e))
            in_w, down_w = self._weights(expert, hidden_states.dtype)  # [2k, H] (gate, then up) or [k, H]; [H, k]
            if self.gated:
                gate_up = nn.functional.linear(hidden_states[token], in_w, getattr(expert, "gate_up_bias", None))
                gate, up = gate_up.chunk(2, dim=-1)  # [n, k] each
                h = self._activate(gate, up)
            else:  # down · act(up x)
                h = self.act_fn(nn.functional.linear(hidden_states[token], in_w))
            y = nn.functional.linear(h, down_w, getattr(expert, "down_bias", None))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def _weights(self, expert: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (expert.gate_up if self.gated else expert.up), expert.down  # [2k, H] or [k, H], [H, k]


class _Packed(nn.Module):
    """One matrix [d_out, d_in] at `bits`: packed integers, a scale and a zero per group of `group` columns."""

    def __init__(self, d_out: int, d_in: int, bits: int, group: int) -> None:
        super().__init__()
        self.shape, self.bits, self.group = (d_out, d_in), bits, group
        groups = -(-d_in // group)
        self.register_buffer("q", torch.zeros(-(-d_out * d_in * bits // 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(d_out, groups, dtype=torch.float32))
        self.register_buffer("zero", torch.zeros(d_out, groups, dtype=torch.uint8))

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        d_out, d_in = self.shape
        n, b = d_out * d_in, self.bits
        bit = torch.arange(8, device=self.q.device)
        stream = ((self.q.to(torch.int64).unsqueeze(1) >> bit) & 1).reshape(-1)[: n * b]  # bit j of value i: i·b + j
        q = (stream.reshape(n, b) << torch.arange(b, device=self.q.device)).sum(1).reshape(d_out, d_in)
        s = self.scale.repeat_interleave(self.group, dim=1)[:, :d_in]
        z = self.zero.float().repeat_interleave(self.group, dim=1)[:, :d_in]
        return ((q.float() - z) * s).to(dtype)


class _QuantExpert(nn.Module):
    def __init__(self, width: int, hidden: int, bits: int, group: int, gated: bool = True) -> None:
        super().__init__()
        if gated:
            self.gate_up = _Packed(2 * width, hidden, bits, group)  # gate rows, then up
        else:  # experts without a gate (Nemotron-H)
            self.up = _Packed(width, hidden, bits, group)
        self.down = _Packed(hidden, width, bits, group)


class QuantExperts(RaggedExperts):
    """PMQ's experts, each at its own width of bits, dequantized when it runs (the same call as transformers'
    fused experts module)."""

    def __init__(self, bits: list[int], group: int, width: int, hidden: int, act: str, dtype: torch.dtype,
                 source: nn.Module | None = None) -> None:
        super().__init__([], hidden, act, dtype, source)
        if getattr(source, "gate_up_proj_bias", None) is not None or self.interleaved:
            raise ValueError("this export's experts have biases or interleaved gate/up rows (GPT-OSS); its packed "
                             "experts load with mumoe.load only")
        self.num_experts, self.dtype = len(bits), dtype
        for e, b in enumerate(bits):
            self.add_module(str(e), _QuantExpert(width, hidden, int(b), group, self.gated))

    def _weights(self, expert: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        first = expert.gate_up if self.gated else expert.up
        return first.weight(dtype), expert.down.weight(dtype)  # dequantized when the expert runs


def reshape_layers(model: nn.Module, config) -> None:
    """Give every MoE layer named in config.mumoe_layers its pruned shape."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for entry in getattr(config, "mumoe_layers", None) or []:
        mlp = _sparse_block(model.model.layers[entry["layer"]])
        if "experts" in entry:
            n, bound = int(entry["experts"]), "expert_map" in entry
            E = mlp.experts.down_proj.shape[0]
            Z = int(getattr(text, "zero_expert_num", None) or 0)  # identity experts after the routed ones' rows
            routing = _routing_tensors(mlp, E + Z) if not bound else []
            for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                _resize(mlp.experts, name, n)
            for module, name, dim in routing:
                _resize(module, name, n + Z, dim)
            shared = {id(m) for part in (getattr(mlp, a, None) for a in _SHARED) if part is not None
                      for m in part.modules()}
            owners = [m for m in mlp.modules() if id(m) not in shared] if not bound else [mlp.experts]
            for module in owners:
                for attr in _COUNT_ATTRS:
                    if isinstance(c := getattr(module, attr, None), int):
                        setattr(module, attr, n + (Z if Z and c == E + Z else 0))
            if bound:
                _bind(mlp.experts, [int(m) for m in entry["expert_map"]])
        if "widths" in entry:
            dtype = mlp.experts.down_proj.dtype
            mlp.experts = RaggedExperts([int(k) for k in entry["widths"]], text.hidden_size,
                                        getattr(text, "hidden_act", "silu"), dtype, mlp.experts)
        if "bits" in entry:
            old = mlp.experts
            mlp.experts = QuantExperts([int(b) for b in entry["bits"]], int(entry["group"]), old.down_proj.shape[-1],
                                       text.hidden_size, getattr(text, "hidden_act", "silu"), old.down_proj.dtype, old)
        if "shared_width" in entry:  # the shared expert's neurons pruned too: its three linears at the kept width
            shared = next(part for part in (getattr(mlp, a, None) for a in _SHARED) if hasattr(part, "down_proj"))
            k = int(entry["shared_width"])
            for name in ("gate_proj", "up_proj", "down_proj"):
                old = getattr(shared, name)
                shape = (old.in_features, k) if name != "down_proj" else (k, old.out_features)
                setattr(shared, name, nn.Linear(*shape, bias=old.bias is not None, dtype=old.weight.dtype,
                                                device=old.weight.device))


_Base = getattr(transformers, BASE_CLASS)


class MumoeForCausalLM(_Base):
    """BASE_CLASS with the per-layer shapes of a mumoe export."""

    def __init__(self, config) -> None:
        super().__init__(config)
        reshape_layers(self, config)
