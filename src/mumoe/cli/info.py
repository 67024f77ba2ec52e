"""`mumoe info`: architecture, layers, experts, top_k and parameter counts."""

from __future__ import annotations

import json
from .common import load_model, model_args


def _param_counts(model, adapter) -> dict:
    from ..models import stored_weights

    total = stored_weights(model)
    layers = adapter.moe_layers() if adapter.is_moe else []
    expert = sum(layer.expert_weights for layer in layers)
    inactive = sum(layer.expert_weights * (1 - layer.top_k / layer.num_experts) for layer in layers)
    return {"total": total, "active": int(total - inactive), "routed_experts": expert}


def cmd_info(args) -> int:
    from ..models import adapter_for

    if args.architectures:
        from ..models.support import text

        print(text())
        return 0
    model = load_model(args.model, args.dtype, args.device)
    adapter = adapter_for(model)
    layers = adapter.moe_layers()
    counts = _param_counts(model, adapter)
    info = {
        "model": args.model, "model_type": model.config.model_type,
        "architecture": type(model).__name__, "decoder_layers": len(adapter.decoder_layers()),
        "moe_layers": [layer.index for layer in layers], "params": counts,
    }
    if layers:
        first = layers[0]
        info.update({
            "experts_per_layer": [layer.num_experts for layer in layers], "top_k": first.top_k,
            "expert_intermediate_size": first.intermediate_size, "router": first.scoring,
            "norm_topk_prob": first.norm_topk_prob, "shared_expert": first.shared is not None,
            "n_group": first.n_group, "topk_group": first.topk_group,
        })
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model          {args.model}  ({info['model_type']}, {info['architecture']})")
    print(f"decoder layers {info['decoder_layers']}; MoE layers: {len(layers)}"
          + (f" ({', '.join(map(str, info['moe_layers']))})" if layers else " (dense model)"))
    if layers:
        experts = sorted(set(info["experts_per_layer"]))
        groups = f", groups {first.n_group} (top {first.topk_group})" if first.n_group else ""
        print(f"experts        {'/'.join(map(str, experts))} routed per layer, top_k {first.top_k}, "
              f"expert width {first.intermediate_size}, router {first.scoring}"
              f"{' (top-k renormalized)' if first.norm_topk_prob else ''}{groups}, "
              f"shared expert: {'yes' if first.shared is not None else 'no'}")
    t = counts["total"]
    print(f"parameters     total {t:,} | active/token {counts['active']:,} ({100 * counts['active'] / t:.1f}%) | "
          f"routed experts {counts['routed_experts']:,} ({100 * counts['routed_experts'] / t:.1f}% of total)")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("info", help="architecture, layers, experts, top_k and parameter counts",
                        description="Print architecture, MoE layers, experts, top_k and parameter counts "
                        "(total / active per token / routed-expert share).")
    model_args(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.add_argument("--architectures", action="store_true",
                    help="list every supported model_type with what works on it (no model is loaded)")
    sp.set_defaults(func=cmd_info)
