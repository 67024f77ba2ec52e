import os

# Nothing in the suite may touch a model or dataset hub (none is reachable here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from mumoe.models.tiny import tiny_model

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
DENSE_ARCHS = ["llama", "qwen2", "opt"]


@pytest.fixture(params=MOE_ARCHS)
def moe_arch(request):
    return request.param


def make(arch, seed=0, **kw):
    return tiny_model(arch, seed=seed, **kw)


def ids(batch=2, length=12, seed=0, vocab=128):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def char_tokenizer():
    """A character-level HF tokenizer whose ids fit the tiny models' 128-token vocabulary."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - {"\x0b", "\x0c", "\r"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def recompose(layer, route, events, routed_scale=1.0):
    """A block's output rebuilt slowly, token by token, from its per-expert events: routed_scale · Σ_i g_i f_i(x)
    (+ the shared expert, sigmoid-gated where it has a gate; + g_j x for a pick j of an identity expert, LongCat's;
    + the block's output bias, JetMoE's).
    -> (output [T, H], experts seen per token [T])."""
    T, H = route.hidden.shape
    total, seen = torch.zeros(T, H), torch.zeros(T, dtype=torch.long)
    for e in events:
        for n, t in enumerate(e.tokens.tolist()):
            total[t] += e.weight[n] * e.output[n]
            seen[t] += 1
    for t in range(T):
        for j in range(route.indices.shape[1]):
            if route.indices[t, j] >= layer.num_experts:  # a zero-computation expert: its input, weighted
                total[t] += route.weights[t, j] * route.hidden[t]
                seen[t] += 1
    total = total * routed_scale
    if layer.output_bias is not None:  # a bias the block adds to every token (JetMoE)
        total += layer.output_bias
    if layer.shared is not None:
        shared = layer.shared(route.hidden)
        if layer.shared_gate is not None:
            shared = torch.sigmoid(layer.shared_gate(route.hidden)) * shared
        total += shared
    return total, seen


def assert_reloads_to(folder, x, expected, tol=1e-5):
    """The export at `folder` gives `expected` logits for x within tol both as mumoe.load reads it and as plain
    transformers reads it with trust_remote_code (mumoe's own forms), fp32, eval mode."""
    import mumoe
    from transformers import AutoModelForCausalLM

    readers = (lambda: mumoe.load(folder, "fp32"),
               lambda: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval())
    with torch.no_grad():
        for read in readers:
            assert (read()(x).logits - expected).abs().max() <= tol


def safetensors_of(folder):
    """Every tensor of a checkpoint folder's safetensors files, by key."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="session")
def tok():
    return char_tokenizer()


SAMPLE_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
               "must be in want of a wife.\n\ndef f(x):\n    return x * 2\n\n") * 6


@pytest.fixture
def ckpt(tmp_path):
    """A tiny qwen3_moe checkpoint with a character tokenizer (tmp_path/m), and a calibration text (tmp_path/c.txt)."""
    model, tok = make("qwen3_moe"), char_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT * 4)
    return tmp_path
