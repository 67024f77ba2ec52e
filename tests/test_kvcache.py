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


def _sliding_families() -> list[str]:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from mumoe.models.registry import MOE_TYPES
    from mumoe.models.tiny import TINY_CONFIGS, tiny_config

    out = []
    for family in sorted(t for t in TINY_CONFIGS if t in MOE_TYPES):
        try:
            layers = DynamicCache(config=tiny_config(family)).layers
        except Exception:  # noqa: BLE001 - a family whose cache needs its model (DeepSeek-V4's): not plain sliding
            continue
        if any(type(layer) is DynamicSlidingWindowLayer for layer in layers):
            out.append(family)
    return out


@pytest.mark.parametrize("family", _sliding_families())
def test_refeed_past_the_sliding_window_equals_the_dense_decode(family):
    """A prompt longer than the sliding window, through the per-prompt protocol with an identity pruning (every
    expert kept): the refed last position and the tokens after it give the dense decode's logits. (Before
    `refeed_cache`, transformers refused the crop of a sliding layer past its window: per-prompt μ-MoE and experts
    requests crashed on GPT-OSS-like models with prompts longer than the window.)"""
    from transformers import DynamicCache

    from mumoe.compat import cache_kwarg, output_cache
    from mumoe.models import adapter_for
    from mumoe.testtime.kvcache import refeed_possible
    from mumoe.testtime.protocol import Experts, ready_to_decode

    model = make(family)
    assert refeed_possible(model.config)
    window = min(getattr(layer, "sliding_window", 10**9) for layer in DynamicCache(config=model.config).layers)
    x, feed = ids(1, window + 6, seed=3), ids(1, 3, seed=4)[0].tolist()
    kw = cache_kwarg()
    with torch.no_grad():
        out = model(input_ids=x, use_cache=True)
        cache, want = output_cache(out), [out.logits[0, -1]]
        for t in feed:
            out = model(input_ids=torch.tensor([[t]]), **{kw: cache}, use_cache=True)
            cache = output_cache(out)
            want.append(out.logits[0, -1])
        every = min(layer.num_experts for layer in adapter_for(model).moe_layers())
        prefilled = Experts(every).prefill(model, x)
        with prefilled.applied():
            ready_to_decode(prefilled)
            cache, got = prefilled.cache, []
            for t in [int(x[0, -1])] + feed:  # the last prompt token again, then the same tokens
                out = model(input_ids=torch.tensor([[t]]), **{kw: cache}, use_cache=True)
                cache = output_cache(out)
                got.append(out.logits[0, -1])
    assert torch.allclose(torch.stack(got), torch.stack(want), atol=1e-4, rtol=1e-4)
