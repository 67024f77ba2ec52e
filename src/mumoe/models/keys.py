"""Checkpoint key layouts, gathered from the adapters: under which names the architectures' safetensors files store
the MoE block (`mlp`, and the legacy names an adapter declares in `checkpoint_block_names`), the per-expert
matrices (`gate_proj|up_proj|down_proj`, and an adapter's legacy `checkpoint_expert_kinds`), fused expert tensors
and the router. Code outside `models/` reads keys only through these patterns and `canonical`: a new architecture
with its own spelling adds it to its adapter, nowhere else."""

from __future__ import annotations

import re

from .base import EXPERT_COUNT_KEYS, TOP_K_KEYS  # noqa: F401  (the config keys, with the key names)
from .registry import ADAPTERS

BLOCK_NAMES: tuple[str, ...] = ("mlp", *sorted({n for cls in ADAPTERS.values() for n in cls.checkpoint_block_names}
                                              - {"mlp"}))
KIND: dict[str, str] = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
                        **{k: v for cls in ADAPTERS.values() for k, v in cls.checkpoint_expert_kinds.items()}}

_BLOCK = rf"^(?P<pre>.*\.layers\.(?P<layer>\d+)\.(?:{'|'.join(BLOCK_NAMES)})\.experts)"
FUSED = re.compile(_BLOCK + r"\.(?P<kind>gate_up_proj|down_proj)$")  # transformers v5: [E, 2I, H] and [E, H, I]
# experts without a gate stored fused ([E, I, H]; transformers' own files hold them per expert): not streamed yet
FUSED_UP = re.compile(_BLOCK + r"\.up_proj$")
EXPERT_BIAS = re.compile(_BLOCK + r"\.(?P<kind>gate_up_proj_bias|down_proj_bias)$")  # [E, 2I] and [E, H] (GPT-OSS)
# MXFP4-packed expert tensors (the released gpt-oss checkpoints): <experts>.gate_up_proj_blocks / _scales -> the
# parameter <experts>.gate_up_proj they dequantize to (`checkpoint.dequantized_experts`)
PACKED = re.compile(r"^(?P<name>.*\.experts\.(?:gate_up_proj|down_proj))_(?P<part>blocks|scales)$")
LEGACY = re.compile(_BLOCK + rf"\.(?P<e>\d+)\.(?P<kind>{'|'.join(KIND)})\.weight$")  # one matrix per expert
ROUTER = re.compile(rf"^.*\.layers\.(?P<layer>\d+)\.(?:{'|'.join(BLOCK_NAMES)})\.gate\."
                    r"(?P<kind>weight|bias|e_score_correction_bias)$")


def canonical(key: str) -> str:
    """`key` with its MoE block under the name transformers v5 gives it (`mlp`)."""
    for name in BLOCK_NAMES[1:]:
        key = key.replace(f".{name}.", ".mlp.")
    return key


def routing_keys(model) -> dict[str, tuple[int, int, int]]:
    """Every per-expert routing tensor of `model` (a meta skeleton is enough) by its `canonical` parameter name ->
    (decoder layer, expert axis, entries after the routed experts' on it: `RouterTensor.tail`): router rows and
    biases, correction biases wherever the family keeps them. A streamed export slices (or merges) the checkpoint
    tensors of these names along that axis, the tail kept as it is."""
    from .registry import moe_adapter_for

    layers = moe_adapter_for(model).moe_layers()  # first: an adapter may swap modules in (GPT-OSS's experts)
    names = {id(m): n for n, m in model.named_modules()}
    return {canonical(f"{names[id(rt.module)]}.{rt.name}"): (layer.index, rt.dim, rt.tail)
            for layer in layers for rt in layer.router_tensors}


def router_axis(key: str, routers: dict[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """(decoder layer, expert axis, tail) of a checkpoint key holding a per-expert routing tensor (`routing_keys`
    of the model: every family's own places), else None."""
    return routers.get(canonical(key))


def expert_layout(model_type: str | None):
    """The family's checkpoint layout of its fused expert tensors where it is not mumoe's (`Adapter.
    checkpoint_layout`: GPT-OSS's transposed, interleaved tensors), else None."""
    cls = ADAPTERS.get(model_type)
    return getattr(cls, "checkpoint_layout", None)


def unchanged(key: str) -> str:
    """The identity renamer: a family without renames on loading."""
    return key


def _adapter_renames(model_type: str | None) -> list[tuple[re.Pattern, str]]:
    """The adapter's renames of the family's key spellings onto its swapped modules (`Adapter.checkpoint_renames`)."""
    return [(re.compile(p), r) for p, r in getattr(ADAPTERS.get(model_type), "checkpoint_renames", ())]


def model_tensors(model) -> dict:
    """The model's state dict (the family's tensor layout: GPT-OSS's transposed experts) under the names its modules
    give the tensors — a swapped-in block's state dict may use the family's names (JetMoE's), renamed back by the
    adapter's `checkpoint_renames`."""
    rules = _adapter_renames(model.config.model_type)
    out = {}
    for name, t in model.state_dict().items():
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        out[name] = t
    return out


def checkpoint_renamer(model_type: str | None, known=None):
    """key -> the name transformers gives it on loading a `model_type` checkpoint, by the family's own renaming
    rules (`WeightRenaming` in transformers' conversion mapping: Granite's input_linear -> experts.gate_up_proj,
    PhiMoE's block_sparse_moe.gate -> mlp.router, HY-V3's expert_bias -> e_score_correction_bias, ...), then the
    adapter's onto the modules it swaps in (`Adapter.checkpoint_renames`). The per-expert merges are not applied
    here (`LEGACY` keys are read per expert). Identity where there are none. known: the model's tensor names
    (`model_tensors`); as transformers does, a key that is one of them and that a rule would rename to none of them
    keeps its name (DeepSeek-V4's rules, written for its original files, rename `model.norm` too)."""
    ours = _adapter_renames(model_type)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # a transformers without conversion mappings: keys are read as they are
        rules, apply_renamings = [], None
    else:
        rules = [r for r in (get_checkpoint_conversion_mapping(model_type) or []) if isinstance(r, WeightRenaming)]
    if not rules and not ours:
        return unchanged
    cache: dict[str, str] = {}

    def rename(key: str) -> str:
        if key not in cache:
            name = apply_renamings(key, rules) if rules else key
            for pattern, repl in ours:
                name = pattern.sub(repl, name)
            cache[key] = key if known is not None and name not in known and key in known else name
        return cache[key]
    return rename


def model_renamer(model):
    """`checkpoint_renamer` of the family of `model` (built from the checkpoint's config: a meta skeleton is
    enough), knowing its tensor names."""
    return checkpoint_renamer(model.config.model_type, model_tensors(model))


def text_prefix(keys: list[str], embed: str, rename=unchanged) -> str | None:
    """The prefix under which a multimodal checkpoint keeps its text model (`language_model.` for Llama 4), found
    from the input embeddings' key (`embed`, the loaded model's name for it; keys read through `rename`); None when
    the embeddings are under their own name (every other checkpoint)."""
    names = [rename(k) for k in keys]
    if embed in names:
        return None
    hits = sorted(k[: len(k) - len(embed)] for k, n in zip(keys, names) if n.endswith("." + embed))
    return hits[0] if hits else None


def as_loaded(state: dict, model) -> dict:
    """A checkpoint's tensors under the names `model` (built from the checkpoint's config) gives them: the family's
    renames on loading (a multimodal checkpoint: its text model's) and a text model's prefix stripped; the other
    towers' tensors (vision) left out — the text model has none."""
    rename = model_renamer(model)
    names = {id(m): n for n, m in model.named_modules()}
    embed = names[id(model.get_input_embeddings())] + ".weight"
    prefix = text_prefix(list(state), embed, rename)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    out = {}
    for key, t in state.items():
        if prefix is not None and not key.startswith(prefix):
            continue
        name = rename(key[len(prefix):] if prefix else key)
        if not any(p.search(name) for p in ignore):  # what transformers ignores on loading too (`model.visual.*`)
            out[name] = t
    return out


def legacy_blocks(param_names) -> bool:
    """Whether a model names its MoE blocks the legacy way (then checkpoint keys map onto it as they are)."""
    return any(canonical(n) != n for n in param_names)


def config_value(cfg: dict, keys: tuple[str, ...]):
    """The first of `keys` set in a config.json dict (or its text_config), else None."""
    for c in (cfg, cfg.get("text_config") or {}):
        for key in keys:
            if c.get(key) is not None:
                return c[key]
    return None


# config keys of the widths a prunable linear can take as input (an N:M block must divide each)
INPUT_WIDTH_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                    "ffn_dim")
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")  # the routed experts' width, first found


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def input_widths(config) -> set[int]:
    """Every input width of the model's prunable linears that its config states (attention output included)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    widths = {w for k in INPUT_WIDTH_KEYS if _int(w := getattr(cfg, k, None))}
    heads, head_dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "head_dim", None)
    if heads and head_dim:
        widths.add(heads * head_dim)
    return widths


def expert_width(config) -> int | None:
    """The routed experts' intermediate width from a config (None when it has none)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((v for k in EXPERT_WIDTH_KEYS if _int(v := getattr(cfg, k, None)) and v > 0), None)
