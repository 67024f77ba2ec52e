"""Tiny random models of every supported architecture, built offline from HF configs.

`mumoe info tiny:qwen3_moe` and the tests use them; weights are random (seeded), so they say nothing
about pruning quality — the bundled model (`default`) does.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..errors import MumoeError
from .registry import ADAPTERS

_COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4)  # multi-head latent attention (DeepSeek-V2/V3, GLM-4 MoE Lite, Kimi)
_LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2, linear_num_key_heads=2,
               linear_key_head_dim=8, linear_value_head_dim=8)  # gated delta-net + full attention (Qwen3-Next)

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
    **{t: dict(_COMMON, **kw) for t, kw in {
        # softmax routers
        "cohere2_moe": dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        "llama4_text": dict(num_hidden_layers=2, hidden_size=48, intermediate_size=16, intermediate_size_mlp=48,
                            num_local_experts=8,
                            num_experts_per_tok=2, head_dim=8, moe_layers=[1]),  # layer 0 dense, as Maverick's
        "deepseek_v2": dict(_MLA, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                            routed_scaling_factor=1.5),
        "ernie4_5_moe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8,
                             moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, head_dim=8),
        "flex_olmo": dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        "granitemoe": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
        "granitemoe_swa": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                               num_experts_per_tok=2),
        "granitemoeshared": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                                 num_experts_per_tok=2, shared_intermediate_size=24),
        "granitemoehybrid": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                                 num_experts_per_tok=2, shared_intermediate_size=24,
                                 layer_types=["linear_attention", "full_attention"], mamba_n_heads=4,
                                 mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8),
        "hunyuan_v1_moe": dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, moe_topk=2, head_dim=8),
        "jamba": dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                      mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4),
        "lara_mini": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                          num_experts_per_tok=2, shared_expert_intermediate_size=24, head_dim=8, **_LINEAR),
        "mellum": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_local_experts=8,
                       num_experts_per_tok=2, head_dim=8),
        "minimax": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                        head_dim=8),
        "gpt_oss": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                        head_dim=8, sliding_window=4, swiglu_limit=1.0,
                        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                         "rope_theta": 150000.0, "original_max_position_embeddings": 4}),  # a limit the tiny model's gates reach
        "phimoe": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
        "qwen3_next": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                           num_experts_per_tok=2, shared_expert_intermediate_size=24, head_dim=8, **_LINEAR),
        "qwen3_5_moe_text": dict(num_hidden_layers=2, moe_intermediate_size=16, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=24, head_dim=8, **_LINEAR),
        # sigmoid routers
        "afmoe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1, head_dim=8),
        "deepseek_v32": dict(_MLA, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                             n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                             first_k_dense_replace=1, routed_scaling_factor=2.5, index_head_dim=16,
                             index_n_heads=2, index_topk=8),
        "dots1": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                      norm_topk_prob=True, routed_scaling_factor=2.0, head_dim=8, max_window_layers=3),
        "exaone_moe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                           num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, head_dim=8),
        "glm4_moe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                         topk_group=1, routed_scaling_factor=2.5, head_dim=8),
        "glm4_moe_lite": dict(_MLA, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                              n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                              first_k_dense_replace=1, routed_scaling_factor=1.8),
        "glm_moe_dsa": dict(_MLA, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                            index_head_dim=16, index_n_heads=2, index_topk=8,
                            indexer_types=["full", "full", "shared"]),  # the last layer reuses the top-k
        "hy_v3": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, head_dim=8,
                      router_scaling_factor=2.0),
        "kimi_linear": dict(_MLA, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                            num_experts=8, num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1,
                            linear_attn_config={"kda_layers": [2], "full_attn_layers": [1, 3], "head_dim": 8,
                                                "num_heads": 4, "short_conv_kernel_size": 4}),
        "kolibri1": dict(num_hidden_layers=2, moe_intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                         head_dim=8),
        "laguna": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                       num_experts_per_tok=2, shared_expert_intermediate_size=24, head_dim=8,
                       moe_routed_scaling_factor=2.0, moe_router_logit_softcapping=5.0),
        "mimo_v2_flash": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                              n_routed_experts=8, num_experts_per_tok=2, head_dim=8, n_group=2, topk_group=1),
        "lfm2_moe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                         num_experts_per_tok=2, num_dense_layers=1, routed_scaling_factor=2.0,
                         layer_types=["conv", "full_attention", "conv"]),  # short convolutions + attention
        "flint": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=8,
                      mlp_only_layers=[], layer_types=["full_attention", "sliding_attention"], sliding_window=4),
        "beam": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                     num_experts_per_tok=2, head_dim=8, n_group=2, topk_group=1, routed_scaling_factor=2.0,
                     mlp_layer_types=["dense", "sparse"], layer_types=["sliding_attention", "full_attention"],
                     sliding_window=4),
        "bailing_hybrid": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                               num_experts_per_token=2, head_dim=8, num_key_value_heads=4, num_expert_group=2,
                               topk_group=1, num_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                               mlp_layer_types=["dense", "sparse", "sparse"],
                               layer_types=["linear_attention", "full_attention", "linear_attention"],
                               expert_swiglu_limit_list=[0, 0.5, 0.5],  # clamps the tiny model's gates reach
                               share_expert_swiglu_limit_list=[0, 0, 0]),
        "kolibri1_1": dict(num_hidden_layers=3, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                           num_experts=8, num_experts_per_tok=2, head_dim=16, num_attention_heads=2,
                           num_key_value_heads=1, sliding_window=4,
                           layer_types=["sliding_attention", "indexed_attention", "indexed_attention"],
                           index_layers=[1], kv_source_layers=[0, 1, 1],  # layer 2 reads layer 1's K/V
                           index_num_heads=1, index_topk=4, index_pool_size=16, index_compression=2,
                           index_num_local_tokens=2, index_num_sink_tokens=1),
        "axk2": dict(_MLA, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_shared_experts=1,
                     n_routed_experts=8, num_experts_per_tok=2, head_dim=8, index_head_dim=16, index_n_heads=2,
                     index_topk=8, routed_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse"],
                     layer_types=["indexed_attention"] * 3),
        "minicpm5_moe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, head_dim=8,
                             routed_scaling_factor=2.5),
        "minimax_m2": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                           head_dim=8),
        "nemotron_h": dict(num_hidden_layers=4, layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
                           head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                           moe_shared_expert_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                           n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                           mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8,
                           expand=2),
        "deepseek_v4": dict(num_hidden_layers=3, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                            n_shared_experts=1, head_dim=16, num_key_value_heads=1, q_lora_rank=16, o_groups=2,
                            o_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=4,
                            hc_mult=2, hc_sinkhorn_iters=3, routed_scaling_factor=1.5, num_nextn_predict_layers=0,
                            mlp_layer_types=["hash_moe", "moe", "moe"]),  # layer 0 hash-routed
        "hy_v4": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.0,
                      q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2, swiglu_limit=1.0,
                      indexer_types=["full", "full", "shared"]),  # layer 2 reuses layer 1's top-k
        "jetmoe": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                       kv_channels=8, num_key_value_heads=4),  # 4 attention experts x 8 channels = hidden 32
        "longcat_flash": dict(num_layers=2, ffn_hidden_size=48, expert_ffn_hidden_size=16, n_routed_experts=8,
                              moe_topk=2, zero_expert_num=2, routed_scaling_factor=2.0, q_lora_rank=16,
                              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8,
                              num_key_value_heads=4),  # 2 identity experts after the 8 routed ones
        "solar_open": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, head_dim=8),
    }.items()},
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
    _randomize_zero_routers(model, seed, getattr(config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed + 2)
    for module in model.modules():  # a hash layer's token -> experts table (DeepSeek-V4): k distinct experts a token
        table = getattr(module, "tid2eid", None)
        if isinstance(table, torch.Tensor) and not bool(table.any()):
            E = module.num_experts
            table.copy_(torch.rand(table.shape[0], E, generator=gen).argsort(-1)[:, : table.shape[1]])
    return model.eval()


def _randomize_zero_routers(model: PreTrainedModel, seed: int, std: float) -> None:
    """Routing tensors a family initializes to zero (AFMoE's router and expert bias, ERNIE's statistics) and
    experts' biases (GPT-OSS): random, so that routing is not a tie between all experts and slicing them matters."""
    cls = ADAPTERS.get(model.config.model_type)
    if cls is None or not cls.is_moe:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in cls(model).moe_layers():
            biases = [b for b in (layer.gate_up_bias, layer.down_bias) if b is not None]
            for t in [rt.tensor for rt in layer.router_tensors] + biases:
                if t is not None and t.is_floating_point() and not t.is_meta and not bool(t.any()):
                    t.copy_(torch.randn(t.shape, generator=gen) * (std if t.dim() == 2 and t.shape[-1] > 1 else 0.1))
