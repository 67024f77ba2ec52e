"""Weight-only int8 for compacted μ-MoE decoding (apply.int8): hand-worked quantization, the kernel against a
dequantized product, compaction from the int8 copies against the masked model with dequantized weights."""

import copy

import pytest
import torch

from conftest import ids, make
from mumoe import MumoeError
from mumoe.apply.compact import compact, uncompact
from mumoe.apply.int8 import int8_copy, int8_linear, pad_k, quantize_rows, release_int8
from mumoe.apply.masking import apply_masks
from mumoe.models.prunable import prunable_names
from mumoe.testtime import PromptPruner, prompt_masks


def test_quantize_rows_hand_worked():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.254, -0.127]])
    q, scale = quantize_rows(w)
    # row 0: scale 2/127; 1 -> 63.5 -> 64 (half to even), -2 -> -127, 0.5 -> 31.75 -> 32; row 1 all zero: scale 1
    assert torch.allclose(scale, torch.tensor([2 / 127, 1.0, 0.254 / 127]))
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32], [0, 0, 0], [0, 127, -64]]
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("K", [40, 48, 2000])
@pytest.mark.parametrize("padded", [False, True])
def test_int8_linear_equals_the_dequantized_product(K, padded):
    """Every K: the kernel where K (or the zero-padded K') is a multiple of 16 — torch's kernel returns garbage or
    crashes for others (K = 2000 is one: its values would be ~1e29 off) — else the dequantized product."""
    g = torch.Generator().manual_seed(K)
    w, x, b = torch.randn(24, K, generator=g), torch.randn(3, 5, K, generator=g), torch.randn(24, generator=g)
    q, scale = quantize_rows(w)
    want = x.double() @ (q.double() * scale.double()[:, None]).T + b.double()  # [3, 5, 24]
    if padded:
        q = pad_k(q)
        assert q.shape[1] % 16 == 0 and q.shape[1] - K < 16 and not q[:, K:].any()
    got = int8_linear(x, q, scale, b)
    assert got.shape == (3, 5, 24) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()  # bf16 activations


def test_int8_copy_is_cached_until_the_weight_changes():
    w = torch.nn.Parameter(torch.randn(8, 16))
    q1, s1 = int8_copy(w)
    assert int8_copy(w)[0] is q1
    with torch.no_grad():
        w.mul_(2)
    q2, s2 = int8_copy(w)
    assert q2 is not q1 and torch.allclose(s2, 2 * s1)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_int8_compaction_equals_masked_dequantized_model(arch):
    """Compacting from the int8 copies computes the column-masked model whose prunable weights are the int8 copies
    dequantized (up to bf16 activations); the weights themselves are untouched."""
    model, x = make(arch), ids(1, 10, seed=11)
    masks = prompt_masks(model, x[:, :6], 0.5, "column")
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name in prunable_names(reference):
            q, scale = quantize_rows(params[name])
            params[name].copy_(q.float() * scale[..., None])
    apply_masks(reference, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = reference(x).logits
        float_masked = copy.deepcopy(model)
        apply_masks(float_masked, masks)
        float_logits = float_masked(x).logits
        undo = compact(model, masks, int8=True)
        got = model(x).logits
        uncompact(undo)
    small_read = undo.weights
    assert small_read > 0
    err = (got - want).abs().max()
    assert err <= 0.03 * want.abs().max()
    assert err < (float_logits - want).abs().max() or (float_logits - want).abs().max() < 1e-6  # int8 is what runs
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert release_int8(model) > 0


def test_prompt_pruner_int8_needs_compacted_columns_and_decodes_from_copies():
    model, x = make("llama"), ids(1, 10, seed=2)
    with pytest.raises(MumoeError):
        PromptPruner(model, 0.5, "row", int8=True)
    pruner = PromptPruner(model, 0.5, "column", int8=True)
    norms, _ = pruner.prefill(x[:, :6])
    with pruner.applied(pruner.select(norms)) as undo:
        small = [m for m in model.modules() if type(m).__name__ == "CompactLinear"]
        assert small and all(m.weight.numel() == 0 and m.qweight.dtype == torch.int8 for m in small)
        assert all(m.qweight.shape[1] % 16 == 0 for m in small)  # padded for the kernel
        assert undo.weights == sum(m.keep.numel() * m.qweight.shape[0] for m in small)


def test_generate_int8_cli(capsys):
    from mumoe.cli import main

    assert main(["generate", "--prompt", "hello there", "--int8"]) == 2
    err = capsys.readouterr().err
    assert "--structure column" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--prompt", "def parse(self, text):", "--structure", "column", "--active", "0.9",
                 "--int8", "--max-new-tokens", "4"]) == 0
    assert "compacted decoding reads" in capsys.readouterr().out
