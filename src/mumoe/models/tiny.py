"""Tiny random models of every supported architecture, built offline from HF configs.

`mumoe info tiny:qwen3_moe` and the tests use them; weights are random (seeded), so they say nothing
about pruning quality — the bundled model (`default`) does.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..errors import MumoeError

_COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(_COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(_COMMON, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "olmoe": dict(_COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(_COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        rope_interleave=True, num_key_value_heads=4),
    "llama": dict(_COMMON, num_hidden_layers=2, intermediate_size=48),
    "qwen2": dict(_COMMON, num_hidden_layers=2, intermediate_size=48),
    "opt": dict(vocab_size=128, hidden_size=32, num_attention_heads=4, ffn_dim=48, num_hidden_layers=2,
                max_position_embeddings=128, word_embed_proj_dim=32, init_std=0.1, bos_token_id=1,
                eos_token_id=2, pad_token_id=0),
}


def tiny_config(model_type: str, **overrides):
    """The HF config of `tiny:model_type` (no weights)."""
    if model_type not in TINY_CONFIGS:
        raise MumoeError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random `model_type` causal LM in fp32, eval mode, eager attention."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    for module in model.modules():  # random correction bias so that slicing it matters
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model.eval()
