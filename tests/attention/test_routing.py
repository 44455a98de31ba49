"""Routes carried by returned keys, the per-cache forward context and the one mask mailbox."""

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids
from transformers import AttentionInterface

from hf_kvcache import build_cache, enable_score_capture
from hf_kvcache.attention import routing
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.scoring import ScoreCaptureError


class Lost(routing.Route):
    entry = routing.SDPA

    def unread_error(self) -> Exception:
        return RuntimeError("lost route")


def test_tag_marks_a_view_never_the_stored_tensor():
    stored = torch.randn(1, 2, 3, 4)
    tagged = routing.tag(stored, Lost())
    assert routing.route_of(tagged) is not None and routing.route_of(stored) is None
    assert tagged.data_ptr() == stored.data_ptr() and torch.equal(tagged, stored)


def test_an_untaken_route_raises_its_error_at_the_next_hand_over_and_a_new_forward_forgets_it():
    context = routing.ForwardContext()
    context.hand_over(routing.tag(torch.zeros(1), Lost()))
    with pytest.raises(RuntimeError, match="lost route"):
        context.hand_over(torch.zeros(1))
    context.hand_over(routing.tag(torch.zeros(1), Lost()))
    context.begin(seen=0)  # an interrupted forward's route does not reach the next forward
    context.hand_over(torch.zeros(1))
    taken = Lost()
    context.hand_over(routing.tag(torch.zeros(1), taken))
    taken.taken = True
    context.hand_over(torch.zeros(1))


def test_a_route_for_another_entry_runs_the_original_attention():
    routing.install()
    sdpa = AttentionInterface._global_mapping["sdpa"]
    original = getattr(sdpa, routing.ORIGINAL_ATTRIBUTE)
    query, key, value = (torch.randn(1, 2, 5, 8) for _ in range(3))
    route = Lost()
    route.entry = routing.CAPTURE
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    expected, _ = original(module, query, key, value, None)
    output, _ = sdpa(module, query, routing.tag(key, route), value, None)
    assert torch.equal(output, expected) and not route.taken


@pytest.mark.parametrize("spec, capture", [("quantized:bits=4,residual_length=8", False), ("h2o:budget=12", True)])
def test_after_a_forward_nothing_module_level_or_stored_carries_a_route(spec, capture):
    model = make_tiny_model("llama", "sdpa")
    if capture:
        enable_score_capture(model)
    cache = build_cache(spec, model.config)
    with torch.no_grad():
        model.generate(random_ids(model, 1, 20), max_new_tokens=6, do_sample=False, **{CACHE_KWARG: cache})
    assert routing.pending() == (None, None)
    for layer in cache.layers:
        for tensor in vars(layer).values():
            assert not isinstance(tensor, torch.Tensor) or routing.route_of(tensor) is None


def test_a_policy_cache_without_capture_names_the_missing_step():
    model = make_tiny_model("llama", "sdpa")
    cache = build_cache("h2o:budget=12", model.config)
    with pytest.raises(ScoreCaptureError, match="enable_score_capture"), torch.no_grad():
        model(random_ids(model, 1, 20), **{CACHE_KWARG: cache})
    assert routing.pending() == (None, None)


def test_a_route_is_served_by_one_call_only():
    """A model may attend one key twice (DiffLlama): the second call runs the original attention."""
    routing.install()
    sdpa = AttentionInterface._global_mapping["sdpa"]
    calls = []

    class Counting(Lost):
        def attend(self, attention, *args, **kwargs):
            calls.append(1)
            return attention(*args, **kwargs)

    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    query, key, value = (torch.randn(1, 2, 5, 8) for _ in range(3))
    key = routing.tag(key, Counting())
    first, _ = sdpa(module, query, key, value, None)
    second, _ = sdpa(module, query, key, value, None)
    assert calls == [1] and torch.equal(first, second)
