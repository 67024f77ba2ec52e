"""Perplexity equals an independent token-by-token NLL loop."""

import math

import pytest
import torch

from conftest import SAMPLE_TEXT, make
from mumoe.eval import perplexity


def slow_ppl(model, ids, seqlen):
    """Token by token: the NLL of token t given only the prefix of its window, one forward per token."""
    n = ids.numel() // seqlen
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            win = ids[w * seqlen:(w + 1) * seqlen]
            for t in range(1, seqlen):
                logits = model(win[:t].unsqueeze(0)).logits[0, -1].double()
                nll -= float(logits[win[t]] - torch.logsumexp(logits, 0))
                count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("batch_size", [1, 4])
def test_matches_token_by_token_loop(tok, batch_size):
    model = make("qwen3_moe")
    text = SAMPLE_TEXT[:200]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    expected, count = slow_ppl(model, ids, 24)
    res = perplexity(model, tok, text, seqlen=24, batch_size=batch_size, progress=False)
    assert res["tokens"] == count == (ids.numel() // 24) * 23
    assert res["windows"] == ids.numel() // 24 and res["seqlen"] == 24
    assert abs(res["ppl"] - expected) / expected < 1e-4
