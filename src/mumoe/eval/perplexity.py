"""Paper-exact perplexity: tokenize the whole text once, non-overlapping windows of `seqlen`,
ppl = exp(mean NLL over every predicted token). Not lm-eval's word perplexity."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..observe.calib import tokenize, windows
from ..progress import bar


@torch.no_grad()
def window_nll(model: nn.Module, batch: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (fp64) and predicted-token count of a batch of windows [B, L]."""
    logits = model(input_ids=batch.to(model.device)).logits  # [B, L, V]
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = batch[:, 1:].to(logp.device)
    nll = -logp.gather(-1, target.unsqueeze(-1)).sum()
    return float(nll), target.numel()


def perplexity_of_windows(model: nn.Module, wins: torch.Tensor, batch_size: int = 4, progress: bool = True,
                          desc: str = "ppl") -> dict:
    """Perplexity over windows [N, L]. -> {ppl, nll, tokens, windows, seqlen, seconds}"""
    model.eval()
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for i in bar(range(0, len(wins), batch_size), desc=desc, enabled=progress, unit="batch"):
        nll, n = window_nll(model, wins[i : i + batch_size])
        total, count = total + nll, count + n
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(wins),
            "seqlen": wins.shape[1], "seconds": round(time.perf_counter() - t0, 3)}


def perplexity(model: nn.Module, tokenizer, text: str, seqlen: int, batch_size: int = 4,
               max_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity of `text` with windows of `seqlen` tokens (the remainder is dropped)."""
    wins = windows(tokenize(tokenizer, text), seqlen, max_windows)
    return perplexity_of_windows(model, wins, batch_size, progress)
