"""Merge-grain features (pure functions): statistics -> what the grouping rule clusters.

    hc_smoe   HC-SMoE: each expert's mean output over ALL calibration tokens, [E, H]
"""

from __future__ import annotations

import torch

from ..observe.collectors import MeanOutputs


def hc_smoe(st: MeanOutputs) -> torch.Tensor:
    """o_i = (1/T) Σ_t E_i(x_t) over every calibration token (every expert run on every token). -> [E, H]"""
    return st.mean()
