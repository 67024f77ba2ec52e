"""GrowingLayer: the same keys/values and the same generations as HF's DynamicLayer, without a copy per token."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from conftest import ids, make
from mumoe.testtime.kvcache import GrowingLayer, grow_in_place


def test_growing_layer_matches_concatenation_through_growth_and_crop():
    gen = torch.Generator().manual_seed(0)
    ref, grow = DynamicLayer(), GrowingLayer()
    GrowingLayer.MIN_CAPACITY, saved = 4, GrowingLayer.MIN_CAPACITY  # force several regrowths
    try:
        for step, m in enumerate([3, 1, 1, 5, 1, 2, 1]):
            k, v = torch.randn(2, 3, m, 4, generator=gen), torch.randn(2, 3, m, 5, generator=gen)
            a, b = ref.update(k, v), grow.update(k, v)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            if step == 3:  # crop two positions, then keep appending: buffer reused, positions overwritten
                ref.crop(-2), grow.crop(-2)
                assert grow.get_seq_length() == ref.get_seq_length() == 8
        assert grow.keys.data_ptr() == grow._key_buf.data_ptr()  # views of the buffer, not copies
        assert grow._key_buf.shape[-2] >= grow.get_seq_length()
    finally:
        GrowingLayer.MIN_CAPACITY = saved


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_generation_with_grown_cache_is_identical(arch):
    model, x = make(arch), ids(1, 9, seed=4)
    with torch.no_grad():
        out = model(x, use_cache=True)
        out.past_key_values.crop(-1)  # as mumoe's generate: the last prompt token is fed again
        plain = model.generate(x, past_key_values=out.past_key_values, max_new_tokens=8, do_sample=False,
                               pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        out = model(x, use_cache=True)
        assert grow_in_place(out.past_key_values) == model.config.num_hidden_layers
        out.past_key_values.crop(-1)
        grown = model.generate(x, past_key_values=out.past_key_values, max_new_tokens=8, do_sample=False,
                               pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(plain.sequences, grown.sequences)
    for a, b in zip(plain.logits, grown.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
