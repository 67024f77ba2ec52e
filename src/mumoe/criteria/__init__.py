"""Pure scoring functions: statistics + weights -> one score tensor per MoE layer.

Each method is registered with how it is read (higher = keep, or prune the highest), its grain and whether it
needs calibration data. Any set of calibrated methods shares one observation pass (`score_methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import MumoeDataError, MumoeError
from . import expert
from .stats import LayerStats


@dataclass(frozen=True)
class Method:
    name: str
    grain: str  # "expert" | "atom" | "weight"
    needs_calib: bool
    prune_highest: bool
    description: str
    from_stats: Callable[[LayerStats], torch.Tensor] | None = None  # calibrated: LayerStats -> [E]
    from_weights: Callable | None = None  # calibration-free: MoELayer -> [E]
    needs_expert_outputs: bool = False


def random_scores(layers, seed: int = 0) -> list[torch.Tensor]:
    """Seeded uniform scores, one generator per call so results do not depend on global RNG state."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.num_experts, generator=gen, dtype=torch.float64) for layer in layers]


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("random", "expert", False, False, "seeded random expert scores (baseline)"),
    Method("aimer", "expert", False, True, "AIMER: ‖w‖₁/(√N‖w‖₂) from weights alone; prunes the highest",
           from_weights=expert.aimer),
    Method("frequency", "expert", True, False, "how often the router selects the expert", expert.frequency),
    Method("gate", "expert", True, False, "gate score: summed combine weights (soft count)", expert.gate_score),
    Method("ean", "expert", True, False, "EAN: summed output norm over routed tokens", expert.ean,
           needs_expert_outputs=True),
    Method("reap", "expert", True, False, "REAP: mean g·‖f‖ over routed tokens", expert.reap,
           needs_expert_outputs=True),
    Method("easy-ep", "expert", True, False, "EASY-EP: g·‖f‖ weighted by the residual-stream change",
           expert.easy_ep, needs_expert_outputs=True),
    Method("tcess", "expert", True, False, "PreMoe TCESS (v1): mean arg-max router logit", expert.tcess),
    Method("peu", "expert", True, False, "PreMoe PEU (v3): thresholded pool scores", expert.peu),
    Method("heapr", "atom", True, False, "HEAPr: E[h²]·E[(∂L/∂h)²] per expert neuron (forward + backward)"),
    Method("heapr-token", "atom", True, False, "HEAPr per-token variant: E[h²·(∂L/∂h)²]"),
    Method("atom-act", "atom", True, False, "atom baseline: E[h²]·‖down[:, k]‖²"),
    Method("atom-magnitude", "atom", False, False, "atom baseline: weight norm of the neuron's rows/column"),
    Method("wanda", "weight", True, False, "Wanda: |W|·‖X‖ per weight (row, N:M or column structure)"),
    Method("magnitude", "weight", False, False, "magnitude: |W| with one threshold per matrix"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MumoeError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def score_methods(model, names: list[str], calib: torch.Tensor | None, groups: torch.Tensor | None = None,
                  seed: int | None = None, batch_size: int = 8, progress: bool = False, layers=None,
                  device=None) -> dict[str, object]:
    """Scores of every named method from ONE observation pass (one-shot: every layer observed on the model as it
    is). The collectors the methods need are attached together: expert statistics (with expert outputs if any
    method reads them), HEAPr atom statistics (forward + backward if any method needs gradients), Wanda input
    norms. -> name: per MoE layer [E] (expert grain) or [E, I] (atom grain); weight grain: {param: scores}.
    groups: [N] calibration source of each window (EASY-EP normalizes per source)."""
    from ..models import adapter_for, moe_adapter_for
    from ..observe.collectors import AtomStats, ExpertStats, InputNorms
    from ..observe.runner import run
    from . import weight as weight_scores
    from .heapr import atom_scores

    methods = [get_method(n) for n in names]
    if layers is None:  # expert and atom grains need routed experts: one clear line for a dense model
        needs_moe = any(m.grain != "weight" for m in methods)
        layers = moe_adapter_for(model).moe_layers() if needs_moe else adapter_for(model).moe_layers()
    calibrated = [m for m in methods if m.needs_calib]
    if calibrated and calib is None:
        raise MumoeError(f"method {calibrated[0].name!r} needs calibration data (--calib PATH)")
    experts = ExpertStats(layers, any(m.needs_expert_outputs for m in calibrated),
                          n_groups=1 if groups is None else int(groups.max()) + 1)
    atoms = AtomStats(layers, backward=any(m.name in ("heapr", "heapr-token") for m in calibrated))
    norms = InputNorms(model)
    collectors = ([experts] if any(m.grain == "expert" for m in calibrated) else []) + (
        [atoms] if any(m.grain == "atom" for m in calibrated) else []) + (
        [norms] if any(m.name == "wanda" for m in calibrated) else [])
    if collectors:
        run(model, calib, collectors, batch_size=batch_size, progress=progress, layers=layers, groups=groups,
            device=device)
    stats = experts.result() if experts in collectors else None
    atom_st = atoms.result() if atoms in collectors else [None] * len(layers)
    params = dict(model.named_parameters())
    out: dict[str, object] = {}
    for m in methods:
        if m.name == "random":
            out[m.name] = random_scores(layers, 0 if seed is None else seed)
        elif m.from_weights is not None:
            out[m.name] = [m.from_weights(layer) for layer in layers]
        elif m.from_stats is not None:
            out[m.name] = [m.from_stats(st) for st in stats]
        elif m.grain == "atom":
            out[m.name] = [atom_scores(m.name, layer, st) for layer, st in zip(layers, atom_st)]
        elif m.name == "wanda":
            out[m.name] = {n: weight_scores.wanda(params[n], v) for n, v in norms.result().items()}
        else:  # magnitude
            from ..models.prunable import prunable_names

            out[m.name] = {n: weight_scores.magnitude(params[n]) for n in prunable_names(model)}
    if stats is not None:
        check_tokens([st.n_tokens for st in stats], [layer.index for layer in layers])
    return check_scores(out, [layer.index for layer in layers])


def check_tokens(counts: list[int], layer_index: list[int]) -> None:
    """Calibration that routed no token through a MoE layer scores every expert 0 there: refuse it."""
    empty = [j for j, n in zip(layer_index, counts) if n == 0]
    if empty:
        raise MumoeDataError(f"calibration saw no tokens at MoE layer(s) {', '.join(map(str, empty))}; every score "
                             "there would be 0 — give calibration text (--calib) with at least one window")


def check_scores(scores: dict[str, object], layer_index: list[int]) -> dict[str, object]:
    """scores unchanged, or a one-line MumoeDataError naming the method and layer (or parameter) whose scores
    hold NaN or inf: selecting on them would prune at random, silently."""
    for name, per in scores.items():
        items = per.items() if isinstance(per, dict) else zip((f"MoE layer {j}" for j in layer_index), per)
        for where, s in items:
            if isinstance(s, torch.Tensor) and s.is_floating_point() and s.numel() and not bool(torch.isfinite(s).all()):
                raise MumoeDataError(f"{name} scores of {where} are not finite (NaN or inf): the activations "
                                     "overflowed or the weights are corrupt; try --dtype fp32, or check the checkpoint")
    return scores
