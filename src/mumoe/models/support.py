"""What works on which architecture, from the adapters themselves: `mumoe info --architectures` prints it and the
README's architecture table is generated from it (`tests/test_families.py` keeps the two equal)."""

from __future__ import annotations

from dataclasses import dataclass

from .families import NOT_YET, NoWidthKeyAdapter
from .registry import ADAPTERS
from .tiny import TINY_CONFIGS

# HF causal-LM classes llama.cpp's converter (`convert_hf_to_gguf.py`, as vendored in llama-cpp-python 0.3.36)
# registers, among mumoe's families: a GGUF of their exports can be made; `benchmarks/gguf_roundtrip.py` measures.
GGUF_CLASSES = frozenset({
    "AfmoeForCausalLM", "Cohere2MoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV32ForCausalLM",
    "DeepseekV3ForCausalLM", "DeepseekV4ForCausalLM", "Dots1ForCausalLM", "Ernie4_5_MoeForCausalLM",
    "ExaoneMoeForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "GlmMoeDsaForCausalLM",
    "GptOssForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeHybridForCausalLM", "GraniteMoeSWAForCausalLM",
    "GraniteMoeSharedForCausalLM", "HYV3ForCausalLM", "HYV4ForCausalLM", "HunYuanMoEV1ForCausalLM",
    "JambaForCausalLM", "KimiLinearForCausalLM", "LagunaForCausalLM", "Lfm2MoeForCausalLM", "MellumForCausalLM",
    "MiMoV2FlashForCausalLM", "MiniMaxM2ForCausalLM", "MixtralForCausalLM", "NemotronHForCausalLM",
    "OlmoeForCausalLM", "PhiMoEForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
    "Qwen3_5MoeForCausalLM", "SolarOpenForCausalLM",
})


@dataclass
class Support:
    """One model_type's row."""

    model_type: str
    adapter: str
    router: str
    shared: str
    experts: str  # "yes" or why removing / merging experts is refused (the config cannot hold the count)
    layerwise: str  # "yes" or why not
    atom_uniform: str  # "yes" or "global form only"
    gguf: str  # whether llama.cpp's converter registers the class
    tiny: bool  # a tiny-config test model exists (`mumoe info tiny:<model_type>`)


def _causal_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")


def support_table() -> list[Support]:
    """A row per supported MoE model_type, in name order."""
    rows = []
    for t in sorted(ADAPTERS):
        cls = ADAPTERS[t]
        if not cls.is_moe:
            continue
        shared = "–"
        if cls.shared_names:
            shared = "sigmoid-gated" if cls.shared_gate_name else "yes"
        gguf = "PhiMoEForCausalLM" if t == "phimoe" else _causal_class(t)
        rows.append(Support(
            model_type=t, adapter=cls.__name__, router=cls.scoring, shared=shared,
            experts=f"no: {cls.expert_removal_gap}" if cls.expert_removal_gap else
            getattr(cls, "expert_removal_scope", "yes"),
            layerwise="yes" if cls.layerwise_gap is None else f"no: {cls.layerwise_gap}",
            atom_uniform="global form only" if issubclass(cls, NoWidthKeyAdapter) else "yes",
            gguf="yes" if gguf in GGUF_CLASSES else "–", tiny=t in TINY_CONFIGS))
    return rows


def markdown() -> str:
    """The README's table."""
    lines = ["| model_type | adapter | router | shared experts | expert removal + merging | layer by layer + streamed "
             "export | uniform atom form | llama.cpp converter | tiny test |", "|---|---|---|---|---|---|---|---|---|"]
    for r in support_table():
        lines.append(f"| `{r.model_type}` | {r.adapter} | {r.router} | {r.shared} | {r.experts} | {r.layerwise} "
                     f"| {r.atom_uniform} | {r.gguf} | {'`tiny:' + r.model_type + '`' if r.tiny else '–'} |")
    not_yet = ", ".join(f"`{t}` ({why})" for t, (why, _) in sorted(NOT_YET.items()))
    lines += ["", f"Not yet: {not_yet}."]
    return "\n".join(lines)


def text() -> str:
    """`mumoe info --architectures`: one line per model_type."""
    rows = support_table()
    w = max(len(r.model_type) for r in rows)
    dense = ", ".join(sorted(t for t, c in ADAPTERS.items() if not c.is_moe))
    out = [f"{len(rows)} MoE model types (+ dense: {dense} for the weight grain). Every grain works on each (expert, atom, weight, merge, per-prompt), except merges",
           "and per-prompt experts on group-limited configs (n_group > 1), expert removal and merging where marked no",
           "(part: some layers kept whole, see the README's table),",
           "and the uniform atom form where marked global.",
           "columns: router | shared experts | expert removal + merging | layer by layer + streamed export | uniform "
           "atom form | llama.cpp converter", ""]
    for r in rows:
        ex = r.experts if r.experts == "yes" else "no" if r.experts.startswith("no") else "part"
        lw = r.layerwise if r.layerwise == "yes" else "no"
        atom = "yes" if r.atom_uniform == "yes" else "global"
        out.append(f"{r.model_type:<{w}}  {r.router:<12} {r.shared:<13} {ex:<4} {lw:<4} {atom:<7} {r.gguf}")
    out += ["", "not yet: " + ", ".join(f"{t} ({why}; nearest: {near})" for t, (why, near) in sorted(NOT_YET.items()))]
    return "\n".join(out)
