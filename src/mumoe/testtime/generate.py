"""μ-MoE generation: dense prefill of the prompt (statistics + KV cache), per-prompt masks, pruned decoding.

The prompt is run once densely: its activations give the masks and its KV cache is kept. The cache is then
cropped by one token and the last prompt token is fed again, now through the pruned weights, to produce the
first new token — so HF's generation (greedy, sampling, stopping) runs unchanged on the pruned model, with
every prompt position but the last cached from the dense pass. Weights are restored afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MumoeError
from ..select.weights import check_active
from ..compat import cache_kwarg
from .protocol import MuMoE, ready_to_decode


@dataclass
class TestTimeResult:
    sequences: torch.Tensor  # [1, L + new]
    prefill_seconds: float  # dense prefill, statistics hooks included
    select_seconds: float  # mask selection + applying it (experts compacted lazily in the decode included)
    active_weights: int
    total_weights: int
    statistics_seconds: float = 0.0  # spent inside the statistics hooks (part of prefill_seconds)
    read_weights: int | None = None  # column, compacted: elements of the compacted matrices decoding reads
    # (fewer than active_weights: MLP rows whose outputs the masked down projection drops are not computed)




def generate(model: nn.Module, input_ids: torch.Tensor, active: float, structure: str = "row",
             compacted: bool = True, int8: bool = False, **generate_kwargs) -> TestTimeResult:
    """Generate a continuation of one prompt [L] or [1, L] with masks chosen from the prompt itself (the
    per-prompt protocol's μ-MoE, `protocol.MuMoE`). structure="column" decodes with compacted matrices and
    gathered inputs (compacted=False: zeroed columns); its first call stores the model's prunable weights
    column-major (`prepare_columns`, once per model, values unchanged) so that each prompt's compaction is a fast
    row gather. int8 (column, compacted): the compacted matrices are gathered from int8 copies of the weights and
    decoded by a weight-only int8 kernel (`apply.int8`)."""
    check_active(active)
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    if ids.numel() == 0:
        raise MumoeError("empty prompt")
    per_prompt = MuMoE(model, active, structure, compacted, int8)
    t0 = time.perf_counter()
    prefilled = per_prompt.prefill(model, ids)
    t1 = time.perf_counter()
    with prefilled.applied():
        t2 = time.perf_counter()
        ready_to_decode(prefilled)  # decode appends in place; the last prompt position is fed again, pruned
        with torch.no_grad():
            out = model.generate(ids, **{cache_kwarg(): prefilled.cache}, **generate_kwargs)
    st = prefilled.stats
    select = st["select_s"] + t2 - t1 + st.get("lazy_s", 0.0)  # (+ experts compacted on first use, in the decode)
    return TestTimeResult(out, t1 - t0 - st["select_s"], select, st["kept_weights"],
                          st["prunable_weights"], st["statistics_s"], st.get("read_weights"))
