"""PyramidKV: SnapKV with budgets shrinking with depth, mean budget unchanged."""

import pytest
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import PyramidKV, SnapKV


def test_budgets_form_an_arithmetic_pyramid_with_the_same_mean():
    policy = PyramidKV(budget=100, observation_window=8, beta=20)
    budgets = [policy.layer_budget(index, 5) for index in range(5)]
    assert budgets == [192, 146, 100, 54, 8]  # last: max(100 // 20, window 8); first: 2 * 100 - 8
    assert sum(budgets) == 5 * 100
    assert PyramidKV(budget=64, observation_window=4).layer_budget(0, 1) == 64


def test_each_layer_keeps_what_snapkv_keeps_at_that_layers_budget(attn):
    """Layer i of PyramidKV holds exactly the tokens SnapKV keeps at PyramidKV's budget for layer i."""
    model = enable_score_capture(make_tiny_model("llama", attn, layers=3))
    ids = random_ids(model, 2, 40)
    pyramid = EvictionCache(model.config, PyramidKV(budget=12, observation_window=4, beta=3))
    model.generate(ids, max_new_tokens=1, do_sample=False, **{CACHE_KWARG: pyramid})
    for index, layer in enumerate(pyramid.layers):
        snap = EvictionCache(model.config, SnapKV(budget=layer.budget, observation_window=4))
        model.generate(ids, max_new_tokens=1, do_sample=False, **{CACHE_KWARG: snap})
        assert layer.kept_positions() == snap.layers[index].kept_positions()
    assert [layer.budget for layer in pyramid.layers] == [20, 12, 4]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="beta=0"):
        PyramidKV(budget=8, observation_window=2, beta=0)
