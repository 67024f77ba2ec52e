"""The bundled model: loads offline, generates, and matches the perplexities on its card."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mumoe
from mumoe.eval import perplexity
from mumoe.loading import DATA, DEFAULT_MODEL
from mumoe.models import moe_adapter_for

CARD = json.loads((DEFAULT_MODEL / "card.json").read_text())


@pytest.fixture(scope="module")
def default():
    return mumoe.load_default()


def test_shape_of_the_bundled_model(default):
    model, tok = default
    cfg = model.config
    layers = moe_adapter_for(model).moe_layers()
    assert cfg.model_type == "qwen3_moe" and len(layers) >= 4
    assert all(l.num_experts >= 16 for l in layers) and layers[0].top_k >= 2
    assert sum(p.numel() for p in model.parameters()) <= 30_000_000
    assert 8000 <= len(tok) <= 16384
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 60 * 2**20


def test_loads_offline_in_a_fresh_process():
    code = ("import mumoe; m, t = mumoe.load_default(); "
            "print(type(m).__name__, type(t).__name__, len(t))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "Qwen3MoeForCausalLM"


def test_greedy_generation_is_the_argmax_chain(default):
    model, tok = default
    prompt = torch.tensor([tok("It is a truth universally acknowledged, that", add_special_tokens=False)["input_ids"]])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    # independent: re-run the full prefix each step and take the argmax
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq).logits[0, -1].argmax().view(1, 1)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    text = tok.decode(out[0, prompt.shape[1]:])
    assert sum(c.isalpha() for c in text) >= 10, text


@pytest.mark.parametrize("domain", sorted(CARD["domains"]))
def test_eval_perplexity_matches_card(default, domain):
    model, tok = default
    text = (DATA / domain / "eval.txt").read_text("utf-8")
    res = perplexity(model, tok, text, seqlen=CARD["seqlen"], batch_size=8, progress=False)
    card = CARD["domains"][domain]
    assert res["tokens"] == card["tokens"]
    assert abs(res["ppl"] - card["ppl"]) / card["ppl"] < 0.02
    assert card["unigram_ppl"] >= 5 * card["ppl"]  # the card's own claim, re-read
