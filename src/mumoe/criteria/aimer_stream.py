"""AIMER scored straight from a checkpoint's safetensors files (the model is never loaded)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ..checkpoint import (FUSED, ORDER, PACKED, _expert_matrices, check_finite, dequantized_experts, read_header,
                          shard_files)
from ..errors import MumoeError
from ..progress import bar
from .expert import NormWorkspace, aimer_from_norms, matrix_norms


def stream_aimer(path: str | Path, progress: bool = True) -> dict[int, torch.Tensor]:
    """AIMER scores per decoder layer, read straight from the checkpoint. -> {layer: [E] float64}

    Bit-identical to the in-memory `criteria.expert.aimer` (same per-matrix reductions, same order)."""
    from ..files import read_json
    from ..models.keys import checkpoint_renamer, expert_layout

    path = Path(path)
    model_type = read_json(path / "config.json", "the model config").get("model_type")
    rename, layout = checkpoint_renamer(model_type), expert_layout(model_type)
    norms: dict[int, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))  # (l1, l2², numel)
    ws = NormWorkspace()  # one fp32 buffer of the largest matrix, reused

    def add(L: int, e: int, kind: str, w: torch.Tensor) -> None:
        if layout is not None and kind in layout.names:  # the family's layout -> mumoe's
            w = layout.to_canonical(kind, w)
        if kind == "gate_up_proj":
            half = w.shape[0] // 2
            norms[L][e]["gate_proj"] = (*matrix_norms(w[:half], ws), w[:half].numel())
            norms[L][e]["up_proj"] = (*matrix_norms(w[half:], ws), w[half:].numel())
        else:
            norms[L][e][kind] = (*matrix_norms(w, ws), w.numel())

    packed: dict[str, dict[str, tuple]] = defaultdict(dict)  # MXFP4 experts: name -> blocks, scales
    for file in bar(shard_files(path), desc="aimer (streamed)", enabled=progress, unit="shard"):
        for key, meta in read_header(file).items():
            if p := PACKED.match(key):
                packed[p["name"]][p["part"]] = (file, meta)
                continue
            for L, e, kind, mapped in _expert_matrices(file, key, meta, rename(key)):
                with mapped as w:
                    check_finite(w, f"{file}: tensor {key}" + (f" (expert {e})" if key.endswith("_proj") else ""))
                    add(L, e, kind, w)
                    del w
    for name, pair in packed.items():  # dequantized one expert at a time (the packed tensors resident)
        m = FUSED.match(rename(name))
        if m is None or set(pair) != {"blocks", "scales"}:
            raise MumoeError(f"{path}: {name}: an MXFP4 tensor outside the routed experts, or without its "
                             f"{'scales' if 'blocks' in pair else 'blocks'}")
        for e, w in enumerate(dequantized_experts(pair["blocks"], pair["scales"], torch.float32)):
            add(int(m["layer"]), e, m["kind"], w)
    if not norms:
        raise MumoeError(f"{path}: no routed-expert tensors found (is it an MoE checkpoint?)")
    out = {}
    for L in sorted(norms):
        E = max(norms[L]) + 1
        kinds = ORDER if "gate_proj" in norms[L][0] else ORDER[1:]  # ungated experts (Nemotron-H): up, down
        if len(norms[L]) != E or any(set(norms[L][e]) != set(kinds) for e in range(E)):
            raise MumoeError(f"{path}: layer {L} has incomplete expert tensors")
        l1 = torch.zeros(E, dtype=torch.float64)
        l2 = torch.zeros(E, dtype=torch.float64)
        for e in range(E):
            for kind in kinds:
                l1[e] += norms[L][e][kind][0]
                l2[e] += norms[L][e][kind][1]
        out[L] = aimer_from_norms(l1, l2, sum(norms[L][0][k][2] for k in kinds))
    return out
