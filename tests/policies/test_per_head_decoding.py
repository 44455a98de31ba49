"""Policies that evict a different set of tokens in each KV head while decoding (TOVA, H2O, R-KV with
`per_head=True`): each step's logits equal a cache-free forward of a one-layer model whose every query head attends
exactly the tokens its KV head held at that step."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import H2O, RKV, TOVA

POLICIES = {
    "tova": lambda: TOVA(budget=8, per_head=True),
    "h2o": lambda: H2O(budget=8, per_head=True, recent=2),
    "rkv": lambda: RKV(budget=8, per_head=True, observation_window=2),
}


def sharpened(model):
    """Queries and keys scaled up, so that heads attend sharply and their choices differ."""
    with torch.no_grad():
        for name in ("q_proj", "k_proj"):
            getattr(model.model.layers[0].self_attn, name).weight.mul_(8)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_each_query_head_attends_what_its_kv_head_held(name, attn_implementation):
    model = enable_score_capture(sharpened(make_tiny_model("llama", attn_implementation, layers=1)))
    reference = sharpened(make_tiny_model("llama", "eager", layers=1))
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    cache = EvictionCache(config, POLICIES[name]())
    prompt, tokens = random_ids(model, 1, 20), random_ids(model, 1, 10, seed=1)
    ids = torch.cat([prompt, tokens], dim=1)
    length = ids.shape[1]
    mask = torch.full((config.num_attention_heads, length, length), float("-inf")).triu(1)
    logits, held_differently = [], False
    with torch.no_grad():
        model(prompt, use_cache=True, **{CACHE_KWARG: cache})
        for index in range(tokens.shape[1]):
            position = prompt.shape[1] + index
            held = cache.layers[0].kept_positions()[0]  # per KV head, before this step
            held_differently |= len({tuple(h) for h in held}) > 1
            for head in range(config.num_attention_heads):
                mask[head, position] = float("-inf")
                mask[head, position, [*held[head // group], position]] = 0.0
            step = model(tokens[:, index : index + 1], position_ids=torch.tensor([[position]]), **{CACHE_KWARG: cache})
            logits.append(step.logits[:, -1])
        expected = reference(ids, attention_mask=mask[None], use_cache=False).logits[0, prompt.shape[1] :]
    assert held_differently  # the heads did keep different tokens
    torch.testing.assert_close(torch.cat(logits), expected, atol=1e-5, rtol=1e-5)
