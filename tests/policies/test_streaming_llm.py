"""StreamingLLM as a policy: each row's first real tokens and its newest ones."""

from conftest import make_tiny_model
from helpers import left_padded_batch, random_ids

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import StreamingLLM


def test_keeps_sinks_and_the_newest_tokens_through_decoding():
    model = enable_score_capture(make_tiny_model("llama"))
    cache = EvictionCache(model.config, StreamingLLM(budget=10, sink_tokens=3))
    model.generate(random_ids(model, 1, 30), max_new_tokens=5, do_sample=False, **{CACHE_KWARG: cache})
    expected = [0, 1, 2, *range(27, 34)]  # 34 tokens seen: 30 prompt + 4 decoded before the last step
    assert cache.layers[0].kept_positions() == [[expected, expected]]


def test_each_padded_row_keeps_its_own_first_real_tokens_as_sinks():
    model = enable_score_capture(make_tiny_model("llama"))
    ids, mask = left_padded_batch(model, [30, 21])
    cache = EvictionCache(model.config, StreamingLLM(budget=8, sink_tokens=2))
    model.generate(ids, attention_mask=mask, max_new_tokens=1, pad_token_id=0, **{CACHE_KWARG: cache})
    kept = cache.layers[0].kept_positions()
    assert kept[0][0] == [0, 1, *range(24, 30)]
    assert kept[1][0] == [9, 10, *range(24, 30)]  # row 1 starts after 9 padding tokens
