"""A lean one-token decode step for Llama-layout decoders: the same operators as transformers' forward, without its
per-layer glue.

A decode step of a small or int4 model on the CPU is mostly not its matrix products: transformers' layers spend
~40% of a step of the 848M qwen3_moe of BENCHMARKS.md (int4 copies, bf16) on views, masks, position and cache
bookkeeping, dtype round trips and module calls, and ~45% on the bundled 15.5M model. `LeanStep` runs one token
of batch 1 through the decoder directly: the embedding row, then per layer RMSNorm, q/k/v (one int4 kernel call for
the three where the model has int4 copies: `apply.int4.fuse`), per-head q/k norms where the family has them,
rotary, the KV cache's own `update`, the model's own attention function (eager or SDPA) over the cache, o,
RMSNorm and the MLP — the
dense one's gate/up/down, or the MoE block's router and experts called as modules (so per-prompt expert slices,
per-token skipping and their hooks act as they do in transformers' forward) — and the final norm and head. Every
operator is the one transformers runs, with the same inputs (the fused q/k/v kernel computes each output row as
the separate calls do), so the logits equal transformers' for the same model and cache bit for bit (tests:
`tests/test_step.py`, every supported family, fp32 / bf16, with and without int4).

It is used only where it is exact: a supported family (`FAMILIES`; rotary embeddings whose frequencies do not
depend on the length, no sliding window, SiLU MLPs), a plain attention cache (`DynamicLayer`s) of one sequence,
and a model whose structure is unchanged since the step was built (`LeanStep.intact`: no module the step bypasses
has a hook, a swapped forward, a replaced submodule, another weight or a weight modified in place or swapped). The
linears are looked at once per decode (`_Layer.plan`): one as it was is applied by reading its weight (a μ-MoE row
mask's masked copy, swapped in as its data, included; the fused int4 matrices only where the weights are
untouched), one replaced, swapped or hooked is called as a module — μ-MoE's column compaction puts `CompactLinear`s
in the projections' places, and the experts it compacts as decoded tokens reach them are inside the experts'
module, which the step calls. Everything else — prefills, batched steps, other families — keeps transformers'
forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..settings import TensorCache
from . import int4
from .gemv import linear

# decoder classes whose forward is: embedding, [RMSNorm, attention, residual, RMSNorm, MLP, residual] per layer,
# RMSNorm, head — with the attention and MLPs below (checked per module when the step is built)
FAMILIES = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
    "Qwen3MoeForCausalLM": "Qwen3MoeDecoderLayer",
    "MixtralForCausalLM": "MixtralDecoderLayer",
}
MOE_BLOCKS = ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock")  # forward: router, then experts — nothing else
DENSE_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MoeMLP")  # down(act(gate x) · up x)
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3MoeRMSNorm", "MixtralRMSNorm")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # an attention's linears
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a dense MLP's
ATTENTIONS = ("eager", "sdpa")  # transformers' attention functions the step calls (others: flash, flex — not here)
_STEPS = TensorCache()  # model -> its LeanStep (a deep copy of the model has none: transformers' forward)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' RMSNorm of these families, operator for operator: x [.., D] -> [.., D] in x's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [.., d] at one position (cos, sin [d]): x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Recorded(NamedTuple):
    """A projection as the step was built on it."""

    module: nn.Module
    forward: object  # its instance forward (None: the class's)
    weight: torch.Tensor
    state: int  # `int4.state` of the weight


@dataclass
class _Layer:
    """One decoder layer's parts, as the step reads them."""

    attn: nn.Module
    norm1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    moe: bool
    heads: int
    kv_heads: int
    head_dim: int
    attend: object = None  # transformers' attention function of the model (eager or SDPA)
    qkv4: int4.Int4Weight | None = None  # q, k and v's int4 copies as one matrix (`int4.fuse`)
    gate_up4: int4.Int4Weight | None = None  # a dense MLP's gate and up, likewise
    linears: dict = field(default_factory=dict)  # projection name -> _Recorded
    direct: dict = field(default_factory=dict)  # this decode: name -> read its weight (True) or call the module
    fused_qkv: bool = False  # this decode: qkv4 describes q, k and v as they are
    fused_gate_up: bool = False

    def owners(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """(module, the names of its projections): the attention's, and a dense MLP's."""
        return [(self.attn, PROJECTIONS)] + ([] if self.moe else [(self.mlp, MLP_PROJECTIONS)])

    def record(self) -> None:
        """Keep each projection as it is now (the step reads its weight while it stays so)."""
        for owner, names in self.owners():
            for n in names:
                m = getattr(owner, n)
                self.linears[n] = _Recorded(m, m.__dict__.get("forward"), m.weight, int4.state(m.weight))

    def as_recorded(self, owner: nn.Module, name: str) -> bool:
        """Whether projection `name` of `owner` is the recorded module, with the recorded forward."""
        m, rec = getattr(owner, name), self.linears[name]
        return m is rec.module and m.__dict__.get("forward") is rec.forward

    def plan(self) -> None:
        """For this decode: which projections are as recorded (their weights are read, as `apply.gemv.linear` reads
        them — a masked copy swapped in as `.data` included) and which were replaced, swapped or hooked (μ-MoE's
        `CompactLinear`s: called as modules); the fused int4 matrices only where their weights are untouched."""
        for owner, names in self.owners():
            for n in names:
                m = getattr(owner, n)
                self.direct[n] = self.as_recorded(owner, n) and not (m._forward_hooks or m._forward_pre_hooks)

        def untouched(names):
            return all(self.direct[n] and (rec := self.linears[n]).module.weight is rec.weight
                       and int4.unchanged(rec.weight, rec.state) for n in names)

        self.fused_qkv = self.qkv4 is not None and untouched(PROJECTIONS[:3])
        self.fused_gate_up = self.gate_up4 is not None and untouched(MLP_PROJECTIONS[:2])

    def project(self, owner: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
        """Projection `name` of `owner` applied to h [1, K] -> [1, N], as its forward computes it."""
        m = getattr(owner, name)
        return linear(h, m.weight, m.bias) if self.direct[name] else m(h)


class LeanStep:
    """The lean decode step of one model (module doc). `build(model)` makes and keeps it; `lean_step(model, cache)`
    hands it out where it can decode `cache` now (`ready`: once per decode), then `step(token, cache)` per token."""

    def __init__(self, model: nn.Module, layers: list[_Layer]) -> None:
        inner = model.model
        self.embed, self.norm, self.rotary, self.head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        self.layers = layers
        self.fused = any(layer.qkv4 is not None for layer in layers)  # int4 copies were there to fuse
        for layer in layers:
            layer.record()  # (the projections: `_Layer.plan`, per decode)
        self._watched = self._watch(model)

    def _watch(self, model: nn.Module) -> list[tuple[nn.Module, object, list, list]]:
        """The modules whose forward the step does not call: (module, its instance forward or None, [(name,
        tensor, `int4.state`)] of its own parameters, [(name, child)] of its submodules) as they are now."""
        bypassed = [model, model.model, model.model.layers, self.embed, self.norm, self.rotary, self.head]
        for layer in self.layers:
            attn = layer.attn
            bypassed += [layer.norm1, layer.norm2, attn, layer.mlp]
            bypassed += [m for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)) if m is not None]
        bypassed += [m for m in model.model.layers]
        return [(m, m.__dict__.get("forward"), [(n, p, int4.state(p)) for n, p in m.named_parameters(recurse=False)],
                 [(n, c) for n, c in m._modules.items() if n not in PROJECTIONS + MLP_PROJECTIONS])
                for m in bypassed]

    def intact(self) -> bool:
        """Whether every module the step bypasses is as it was when the step was built: no hooks (nor global
        ones), the same forward, the same parameters, none modified in place or swapped, the same submodules — the
        projections (linears) aside: `_Layer.plan` decides per decode how each is applied (μ-MoE's compaction
        puts `CompactLinear`s in their places, its row masks swap masked copies in as their data)."""
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return False
        for m, forward, params, children in self._watched:
            if m._forward_hooks or m._forward_pre_hooks or m.__dict__.get("forward") is not forward:
                return False
            if any(m._modules.get(n) is not c for n, c in children):
                return False
            for name, p, st in params:
                if getattr(m, name, None) is not p or not int4.unchanged(p, st):
                    return False
        return True

    def as_built(self) -> bool:
        """Whether every projection is the module, with the forward, it was when the step was built."""
        return all(layer.as_recorded(owner, n) for layer in self.layers for owner, names in layer.owners()
                   for n in names)

    def ready(self, cache) -> bool:
        """Whether the step can decode the next token of `cache` (a DynamicCache of one sequence, plain attention
        layers, one per decoder layer) on the model as built (`intact`)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.layers):
            return False
        for layer in layers:
            if not isinstance(layer, DynamicLayer) or type(layer).update is not _plain_update(type(layer)):
                return False
            if not layer.is_initialized or layer.keys.shape[0] != 1:
                return False
        if not self.intact():
            return False
        for layer in self.layers:
            layer.plan()
        return True

    @torch.no_grad()
    def step(self, token: torch.Tensor, cache) -> torch.Tensor:
        """Run token [1, 1] at the cache's next position (the cache grows by one): -> logits [1, 1, V]."""
        pos = cache.get_seq_length()
        x = self.embed.weight[token.view(-1)]  # [1, H]
        freqs = pos * self.rotary.inv_freq.float()  # [d/2]
        emb = torch.cat((freqs, freqs))  # [d]
        scaling = self.rotary.attention_scaling
        cos, sin = (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
        for layer, kv in zip(self.layers, cache.layers):
            x = x + self._attention(layer, rms_norm(x, layer.norm1), cos, sin, kv)
            h = rms_norm(x, layer.norm2)  # [1, H]
            if layer.moe:
                block = layer.mlp
                _, weights, index = block.gate(h)  # [1, k], [1, k]
                x = x + block.experts(h, index, weights)
            else:
                x = x + self._mlp(layer, h)
        return linear(rms_norm(x, self.norm), self.head.weight, self.head.bias).view(1, 1, -1)

    @staticmethod
    def _attention(layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv) -> torch.Tensor:
        """Self-attention of one token h [1, H] over the cache layer `kv` (which it appends to): -> [1, H]."""
        attn, d = layer.attn, layer.head_dim
        if layer.fused_qkv and int4.DECODE_ROWS:  # one kernel call for q, k, v (their own copies' rows)
            qkv = layer.qkv4.matmul(h)  # [1, (heads + 2 kv_heads)·d]
            q, k, v = qkv.split([layer.heads * d, layer.kv_heads * d, layer.kv_heads * d], dim=-1)
            if attn.q_proj.bias is not None:
                q, k, v = q + attn.q_proj.bias, k + attn.k_proj.bias, v + attn.v_proj.bias
        else:
            q = layer.project(attn, "q_proj", h)  # [1, heads·d]
            k = layer.project(attn, "k_proj", h)  # [1, kv_heads·d]
            v = layer.project(attn, "v_proj", h)
        q, k = q.view(layer.heads, d), k.view(layer.kv_heads, d)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if q_norm is not None:
            q, k = rms_norm(q, q_norm), rms_norm(k, k_norm)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        keys, values = kv.update(k.view(1, layer.kv_heads, 1, d), v.view(1, layer.kv_heads, 1, d))  # [1, kv, n, d]
        # one query attends to every cached position: no mask (what transformers passes for an unpadded step)
        o, _ = layer.attend(attn, q.view(1, layer.heads, 1, d), keys, values, None, dropout=0.0,
                            scaling=attn.scaling)  # [1, 1, heads, d]
        return layer.project(attn, "o_proj", o.reshape(1, -1))

    @staticmethod
    def _mlp(layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        """A dense SiLU MLP of h [1, H] -> [1, H]."""
        mlp = layer.mlp
        if layer.fused_gate_up and int4.DECODE_ROWS:
            gate, up = layer.gate_up4.matmul(h).chunk(2, dim=-1)  # [1, I] each
        else:  # (μ-MoE compacted: the rows down reads, [1, kI])
            gate, up = layer.project(mlp, "gate_proj", h), layer.project(mlp, "up_proj", h)
        return layer.project(mlp, "down_proj", mlp.act_fn(gate) * up)


def _plain_update(cls) -> object:
    """The `update` a plain attention cache layer may have: DynamicLayer's, or `testtime.kvcache.GrowingLayer`'s."""
    from transformers.cache_utils import DynamicLayer

    from ..testtime.kvcache import GrowingLayer

    return GrowingLayer.update if issubclass(cls, GrowingLayer) else DynamicLayer.update


def _attention_function(attn: nn.Module, config):
    """The attention function transformers' forward of `attn` calls (eager: its family's own), or None where the
    model uses another implementation."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(config, "_attn_implementation", None)
    if impl not in ATTENTIONS:
        return None
    if impl == "eager":
        return getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS[impl]


def _layer(decoder: nn.Module, config) -> _Layer | None:
    """The step's view of one decoder layer, or None where it is not the layout the step runs."""
    attn, mlp = getattr(decoder, "self_attn", None), getattr(decoder, "mlp", None)
    norms = getattr(decoder, "input_layernorm", None), getattr(decoder, "post_attention_layernorm", None)
    if attn is None or mlp is None or any(type(n).__name__ not in RMS_NORMS for n in norms):
        return None
    if getattr(attn, "sliding_window", None) is not None or getattr(config, "sliding_window", None) is not None:
        return None
    if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None and type(q_norm).__name__ not in RMS_NORMS:
        return None
    moe = type(mlp).__name__ in MOE_BLOCKS
    if not moe and (type(mlp).__name__ not in DENSE_MLPS or getattr(config, "hidden_act", None) != "silu"):
        return None
    d = attn.head_dim
    heads, kv_heads = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    if heads * d != attn.q_proj.out_features or kv_heads * d != attn.k_proj.out_features or heads % kv_heads:
        return None
    layer = _Layer(attn, norms[0], norms[1], mlp, moe, heads, kv_heads, d, _attention_function(attn, config))
    if layer.attend is None:
        return None
    layer.qkv4 = int4.fuse([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    if not moe:
        layer.gate_up4 = int4.fuse([mlp.gate_proj.weight, mlp.up_proj.weight])
    return layer


def build(model: nn.Module) -> LeanStep | None:
    """Build and keep `model`'s lean step (after `apply.gemv.fast_decode`, whose int4 copies it fuses; again after a
    later `fast_decode` changed the model — its forwards swapped, copies made — while the kept step is reused if it
    still describes the model): -> it, or None where the model is not a supported layout (`FAMILIES`) on the
    CPU."""
    hit = _STEPS.get(model)
    if hit is not None and hit.intact() and hit.as_built() and hit.fused == _has_copies(hit):
        return hit
    decoder_class = FAMILIES.get(type(model).__name__)
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if decoder_class is None or inner is None or rotary is None or not isinstance(getattr(model, "lm_head", None),
                                                                                  nn.Linear):
        return None
    rope = getattr(rotary, "rope_type", None)
    if not isinstance(rope, str) or "dynamic" in rope or rope == "longrope":  # frequencies that move with length
        return None
    if type(inner.norm).__name__ not in RMS_NORMS or not isinstance(inner.embed_tokens, nn.Embedding):
        return None
    if any(p.device.type != "cpu" for p in model.parameters()):
        return None
    layers = []
    for decoder in inner.layers:
        if type(decoder).__name__ != decoder_class:
            return None
        layer = _layer(decoder, model.config)
        if layer is None:
            return None
        layers.append(layer)
    step = LeanStep(model, layers)
    _STEPS.set(model, step)
    return step


def _has_copies(step: LeanStep) -> bool:
    """Whether the first layer's q projection has an int4 copy (`fast_decode(int4_copies=True)` ran)."""
    return int4.int4_copy(step.layers[0].attn.q_proj.weight) is not None


def lean_step(model: nn.Module, cache) -> LeanStep | None:
    """`model`'s lean step (built by `build`), where it can decode the next token of `cache` now (`LeanStep.ready`);
    else None (transformers' forward)."""
    step = _STEPS.get(model)
    return step if step is not None and step.ready(cache) else None
