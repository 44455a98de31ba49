"""The policy contract: names are not taken twice, bad scores and missing methods are named."""

import dataclasses

import pytest
import torch
from helpers import observe, policy_layer, store_tokens

from hf_kvcache.policies import EvictionPolicy, register_policy


def test_a_registered_cache_name_is_not_taken_twice():
    for taken in ("knorm", "dynamic"):
        with pytest.raises(ValueError, match=rf"cache name '{taken}' is already registered.*another name for Other"):

            @register_policy(taken, "another")
            @dataclasses.dataclass(frozen=True)
            class Other(EvictionPolicy):
                pass


@dataclasses.dataclass(frozen=True)
class WrongShape(EvictionPolicy):
    def score(self, step):
        return torch.zeros(step.real.shape[0], 3, step.stored - 1)


def test_scores_of_the_wrong_shape_and_a_missing_score_are_named():
    layer = policy_layer(WrongShape(budget=2))
    store_tokens(layer, torch.randn(1, 2, 4, 1), torch.randn(1, 2, 4, 1))
    with pytest.raises(
        ValueError, match=r"scores must be \[batch, heads or 1, stored\] = \[1, 2 or 1, 4\], got \(1, 3, 3\)"
    ):
        observe(layer)
    layer = policy_layer(EvictionPolicy(budget=2))
    store_tokens(layer, torch.randn(1, 2, 4, 1), torch.randn(1, 2, 4, 1))
    with pytest.raises(NotImplementedError, match=r"EvictionPolicy must define score\(step\)"):
        observe(layer)
