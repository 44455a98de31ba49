"""EvictionCache: every policy x every storage; padded batches keep each row's own tokens, as alone."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import chunked_logits, dynamic_logits, left_padded_batch, random_ids

from hf_kvcache import EvictionCache, HeavyHitterCache, Storage, build_cache, enable_score_capture
from hf_kvcache.caches.evicting import PolicyLayer
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import H2O, EvictionPolicy, Knorm
from hf_kvcache.registry import registered_caches

POLICY_SPECS = sorted(
    name
    for name, registration in registered_caches().items()
    if getattr(registration.factory, "func", None) is not None and "budget" in registration.parameters
)
# Compress-once policies (KVzip) never evict during forwards, so a plain prompt is kept whole: the tests of
# eviction after a prompt leave them out. Their compression (`cache.compress_context`) is tested, with every
# storage and padded batches, in tests/policies/test_kvzip.py.
PROMPT_EVICTING_SPECS = [
    name for name in POLICY_SPECS if not getattr(registered_caches()[name].factory.args[0], "compress_once", False)
]
SMALL = {
    "h2o": "recent=4",
    "snapkv": "observation_window=4",
    "pyramidkv": "observation_window=2,beta=2",
    "adakv": "observation_window=4",
}


def spec(name: str, budget: int, extra: str = "") -> str:
    settings = ",".join(filter(None, [f"budget={budget}", SMALL.get(name, ""), extra]))
    return f"{name}:{settings}"


def test_every_registered_policy_is_covered():
    assert {"h2o", "tova", "snapkv", "knorm", "streaming-llm", "pyramidkv", "adakv", "kvzip"} <= set(POLICY_SPECS)


@pytest.mark.parametrize("name", POLICY_SPECS)
def test_within_budget_equals_dynamic_cache(name, attn):
    """A budget no prompt reaches keeps every token: logits equal DynamicCache's, in prefill and chunks."""
    model = enable_score_capture(make_tiny_model("qwen2", attn))
    ids = random_ids(model, 2, 24)
    expected = dynamic_logits(model, ids, chunk=5)
    cache = build_cache(spec(name, 4096), model.config)
    torch.testing.assert_close(chunked_logits(model, ids, cache, chunk=5), expected)


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
@pytest.mark.parametrize("name", PROMPT_EVICTING_SPECS)
def test_every_storage_serves_every_policy(name, bits):
    model = enable_score_capture(make_tiny_model("llama"))
    storage = f"bits={bits},residual_length=4" if bits else "bits=None"  # code settings need codes
    cache = build_cache(spec(name, 10, storage), model.config)
    output = model.generate(random_ids(model, 1, 24), max_new_tokens=6, do_sample=False, **{CACHE_KWARG: cache})
    assert output.shape == (1, 30)
    layer = cache.layers[0]
    assert layer.stored_tokens <= max(layer.budget, 24) and cache.get_seq_length() == 29
    assert layer.storage.bits == bits
    assert cache.memory_bytes() > 0


def test_kivi_storage_is_refused_at_construction():
    config = make_tiny_model("llama").config
    with pytest.raises(ValueError, match=r"storage=Storage\(bits=4.*token_wise=True"):
        EvictionCache(config, Knorm(budget=8), Storage(bits=4))
    with pytest.raises(ValueError, match="policy='h2o' must be an EvictionPolicy"):
        EvictionCache(config, "h2o")
    with pytest.raises(ValueError, match="H2O has no parameter 'window'; accepted parameters: budget, per_head"):
        HeavyHitterCache(config, budget=8, window=4)
    with pytest.raises(ValueError, match="cache 'h2o' has no parameter 'window'"):
        build_cache("h2o:window=4", config)


def kept_positions(layer: PolicyLayer, row: int, padding: int) -> list[list[int]]:
    """Positions of the real kept tokens of `row`, counted from its first real token, per KV head."""
    return [[position - padding for position in head] for head in layer.kept_positions()[row]]


@pytest.mark.parametrize("name", POLICY_SPECS)
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_padded_batch_rows_equal_rows_alone(name, mode, attn):
    """A left-padded batch of 4 prompts: every row generates the same tokens and keeps the same tokens (by
    position in the row) in every layer and head as that row run alone."""
    model = enable_score_capture(make_tiny_model("llama", attn))
    lengths = [30, 22, 26, 17]
    ids, mask = left_padded_batch(model, lengths, seed=3)
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=2 if mode == "beam" else 1, pad_token_id=0)
    batch_cache = build_cache(spec(name, 12), model.config)
    batched = model.generate(ids, attention_mask=mask, **settings, **{CACHE_KWARG: batch_cache})
    for row, length in enumerate(lengths):
        padding = ids.shape[1] - length
        alone_cache = build_cache(spec(name, 12), model.config)
        alone = model.generate(ids[row : row + 1, padding:], **settings, **{CACHE_KWARG: alone_cache})
        assert torch.equal(batched[row, padding:], alone[0]), f"row {row}"
        if mode == "greedy":
            for batch_layer, alone_layer in zip(batch_cache.layers, alone_cache.layers):
                assert kept_positions(batch_layer, row, padding) == kept_positions(alone_layer, 0, 0)


@pytest.mark.parametrize("name", PROMPT_EVICTING_SPECS)
def test_sampling_on_a_padded_batch_never_keeps_padding(name):
    model = enable_score_capture(make_tiny_model("llama"))
    ids, mask = left_padded_batch(model, [30, 20], seed=1)
    cache = build_cache(spec(name, 12), model.config)
    torch.manual_seed(0)
    output = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0, **{CACHE_KWARG: cache}
    )
    assert output.shape == (2, 36)
    for layer in cache.layers:
        assert layer.padding_held() == 0  # both rows have more real tokens than the budget


def test_a_row_shorter_than_the_budget_keeps_padding_masked():
    """Row 1 has 6 real tokens for a budget of 10: it keeps 4 padding tokens as filler, never attended,
    and its logits equal the row alone with DynamicCache (which it keeps entirely)."""
    model = enable_score_capture(make_tiny_model("llama"))
    ids, mask = left_padded_batch(model, [20, 6], seed=2)
    cache = EvictionCache(model.config, H2O(budget=10, recent=2))
    logits = chunked_logits(model, ids, cache, chunk=20, attention_mask=mask)
    layer = cache.layers[0]
    assert [len(head) for head in layer.kept_positions()[1]] == [6, 6] and layer.padding_held() == 8
    with torch.no_grad():
        next_ids = torch.tensor([[5], [7]])
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step = model(next_ids, attention_mask=full_mask, **{CACHE_KWARG: cache}).logits[1, -1]
        alone_ids = torch.cat([ids[1:, 14:], next_ids[1:]], dim=1)
        expected = dynamic_logits(model, alone_ids, chunk=7)[0, -1]
    torch.testing.assert_close(step, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1, 14:], dynamic_logits(model, ids[1:, 14:], chunk=6)[0], atol=1e-4, rtol=1e-4)


def test_the_base_policy_is_abstract_where_it_must_be():
    with pytest.raises(ValueError, match="budget=0"):
        EvictionPolicy(budget=0)
    with pytest.raises(ValueError, match="per_head='yes'"):
        Knorm(per_head="yes")
