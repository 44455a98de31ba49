"""Compaction every N decoding steps (`compaction_interval`): the schedule, the memory freed, the logits and the
kept sets against independent references (a full forward masked to the tokens the cache attends)."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids, sharp_model

from hf_kvcache import EvictionCache, build_cache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import H2O, TOVA, KVzip, SnapKV, StreamingLLM


def decode_token_by_token(model, cache, prompt: torch.Tensor, tokens: torch.Tensor):
    """Feed `prompt`, then `tokens` one at a time through `cache`; yield, per decoding step, layer 0's held
    positions before the step, its held positions after it and the step's logits [batch, vocab]."""
    with torch.no_grad():
        model(prompt, use_cache=True, **{CACHE_KWARG: cache})
        for index in range(tokens.shape[1]):
            before = cache.layers[0].kept_positions()[0][0]
            seen = prompt.shape[1] + index
            logits = model(
                tokens[:, index : index + 1],
                position_ids=torch.tensor([[seen]]),
                use_cache=True,
                **{CACHE_KWARG: cache},
            ).logits[:, -1]
            yield before, cache.layers[0].kept_positions()[0][0], logits


def masked_forward(model, ids: torch.Tensor, attended: dict[int, list[int]]):
    """A cache-free forward of `ids`, causal, except that the query at each position `p` in `attended` attends
    only the positions `attended[p]` (every layer): what a cache that held those tokens at their own positions
    computes, when the keys and values of every later token were computed the same way."""
    length = ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for position, keys in attended.items():
        mask[position] = float("-inf")
        mask[position, keys] = 0.0
    with torch.no_grad():
        return model(ids, attention_mask=mask[None, None], use_cache=False, output_attentions=True)


def test_decoding_compacts_down_to_the_budget_every_interval_steps():
    model = enable_score_capture(make_tiny_model("llama"))
    cache = EvictionCache(model.config, StreamingLLM(budget=10, sink_tokens=3, compaction_interval=4))
    prompt, tokens = random_ids(model, 1, 20), random_ids(model, 1, 12, seed=1)
    held = [len(after) for _, after, _ in decode_token_by_token(model, cache, prompt, tokens)]
    assert held == [11, 12, 13, 10] * 3  # the prompt compacts at once; then steps add 3 and the 4th compacts
    # Memory is freed at each compaction: the layer holds the tensors of 10 tokens, as an interval-1 cache does.
    every_step = EvictionCache(model.config, StreamingLLM(budget=10, sink_tokens=3))
    list(decode_token_by_token(model, every_step, prompt, tokens))
    assert cache.layers[0].body.keys.shape[-2] == 10
    assert cache.get_seq_length() == every_step.get_seq_length() == 32
    assert cache.memory_bytes() == every_step.memory_bytes()
    assert cache.layers[0].get_max_length() == 13


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_equal_full_attention_masked_to_the_held_tokens(attn_implementation):
    """Sink tokens plus the newest, compacted every 4 steps: each step's logits equal a forward without cache
    that attends exactly the tokens the cache held at each step (all layers hold the same positions)."""
    model = enable_score_capture(make_tiny_model("llama", attn_implementation))
    reference = make_tiny_model("llama", "eager")
    cache = EvictionCache(model.config, StreamingLLM(budget=10, sink_tokens=3, compaction_interval=4))
    prompt, tokens = random_ids(model, 1, 20), random_ids(model, 1, 12, seed=1)
    attended, logits = {}, []
    for index, (before, _, step_logits) in enumerate(decode_token_by_token(model, cache, prompt, tokens)):
        attended[prompt.shape[1] + index] = [*before, prompt.shape[1] + index]
        logits.append(step_logits)
    expected = masked_forward(reference, torch.cat([prompt, tokens], 1), attended).logits[0, prompt.shape[1] :]
    torch.testing.assert_close(torch.cat(logits), expected, atol=1e-5, rtol=1e-5)
    assert [len(keys) for keys in attended.values()] == [11, 12, 13, 14] * 3  # 3 beyond the budget, then compact


def test_tova_keeps_the_top_tokens_of_the_compaction_step():
    """Between compactions TOVA keeps every token; at each 4th step it keeps the 10 tokens of the (10 + 4) held
    that the step's query attends most (layer 0, averaged over heads), read from an independent eager run."""
    model = enable_score_capture(sharp_model("sdpa"))
    reference = sharp_model("eager")
    cache = EvictionCache(model.config, TOVA(budget=10, compaction_interval=4))
    prompt, tokens = random_ids(model, 1, 20), random_ids(model, 1, 12, seed=1)
    compactions = 0
    for index, (before, after, _) in enumerate(decode_token_by_token(model, cache, prompt, tokens)):
        attended = [*before, prompt.shape[1] + index]
        if len(attended) < 14:
            assert after == attended
            continue
        compactions += 1
        full = masked_forward(reference, torch.cat([prompt, tokens[:, : index + 1]], 1), {attended[-1]: attended})
        latest = full.attentions[0][0, :, -1, attended].mean(0)  # layer 0, the last query, over every head
        assert after == sorted(attended[i] for i in latest.topk(10).indices.tolist())
    assert compactions == 3


def test_compaction_interval_is_a_spec_parameter_of_every_decoding_policy():
    config = make_tiny_model("llama").config
    cache = build_cache("h2o:budget=16,compaction_interval=8", config)
    assert cache.policy == H2O(budget=16, compaction_interval=8)
    assert H2O(16, True, 4).recent == 4  # keyword only: positional fields keep their order


@pytest.mark.parametrize("make", [lambda: SnapKV(compaction_interval=4), lambda: KVzip(compaction_interval=4)])
def test_a_policy_that_never_evicts_while_decoding_refuses_an_interval(make):
    with pytest.raises(ValueError, match=r"compaction_interval=4: .* never evicts while decoding.*h2o.*tova"):
        make()


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_an_interval_below_one_or_not_an_integer_is_refused(value):
    with pytest.raises(ValueError, match="compaction_interval"):
        TOVA(compaction_interval=value)


def test_held_state_between_compactions_loads_back():
    model = enable_score_capture(make_tiny_model("llama"))
    policy = TOVA(budget=8, compaction_interval=4)
    cache = EvictionCache(model.config, policy)
    model.generate(random_ids(model, 1, 20), max_new_tokens=3, do_sample=False, **{CACHE_KWARG: cache})
    assert cache.stored_tokens == 10  # 2 decoded tokens beyond the budget, before the next compaction
    restored = EvictionCache(model.config, policy)
    restored.load_held_state(cache.held_state())
    assert restored.layers[0].kept_positions() == cache.layers[0].kept_positions()
    with pytest.raises(ValueError, match="10 tokens held, more than the 8"):
        EvictionCache(model.config, TOVA(budget=8)).load_held_state(cache.held_state())
