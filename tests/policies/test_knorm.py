"""Knorm: keeps the lowest key norms, per head, in prefill and decoding."""

import torch
from conftest import make_tiny_model
from helpers import kept_indices, observe, policy_layer, random_ids, store_tokens
from transformers import DynamicCache

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import Knorm


def test_keeps_the_lowest_norms_of_hand_built_keys():
    layer = policy_layer(Knorm(budget=3), head_dim=2)
    norms = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 0.5]])
    keys = torch.stack([norms, torch.zeros_like(norms)], dim=-1)[None]  # [1, 2 heads, 5 tokens, 2]
    store_tokens(layer, keys, keys.clone())
    observe(layer)
    assert layer.kept_positions() == [[[1, 3, 4], [0, 1, 4]]]


def test_prefill_and_decoding_keep_the_lowest_norms_of_the_models_keys(attn):
    """Against the keys of an independent DynamicCache run: after the prompt, the kept tokens of every layer
    and head are its `budget` lowest-norm keys; after each decoding step, the lowest among the kept ones
    and the new one."""
    model = enable_score_capture(make_tiny_model("llama", attn))
    ids = random_ids(model, 2, 30)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: reference})
    cache = EvictionCache(model.config, Knorm(budget=10))
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    for layer, reference_layer in zip(cache.layers, reference.layers):
        expected = reference_layer.keys.norm(dim=-1).sort(dim=-1, stable=True).indices[..., :10].sort(-1).values
        assert torch.equal(kept_indices(layer.body.keys, reference_layer.keys), expected)
        assert layer.stored_tokens == 10
    output = model.generate(
        ids, max_new_tokens=4, do_sample=False, **{CACHE_KWARG: EvictionCache(model.config, Knorm(budget=10))}
    )
    assert output.shape == (2, 34)
