"""transformers 5.25's deferred stop check (Apple MPS): `generate` with a user cache calls
`activate_past_recording(recurrent_states_to_keep=...)` after the prefill, `crop(0)` after every step and
`crop(-1)` to undo the one step it ran past the stop. Simulated on the CPU (the check itself is MPS-only): every
croppable cache must give plain `generate`'s tokens, keep its bounded memory and end with recording off."""

import pytest
import torch
import transformers.generation.utils as generation_utils
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache import QuantizedCache, SinkCache, SlidingWindowCache
from hf_kvcache.compat import CACHE_KWARG

pytestmark = pytest.mark.skipif(
    not hasattr(generation_utils, "DeferredStopCheck"), reason="this transformers has no deferred stop check"
)
CACHES = {
    "quantized-8bit": lambda config: QuantizedCache(config, bits=8, group_size=4, residual_length=4),
    "window": lambda config: SlidingWindowCache(config, window=6),
    "sink": lambda config: SinkCache(config, sink_tokens=2, window=6),
}


class _HostEvent:
    """The CPU has no device events; the deferred check only needs record/synchronize to order copies."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def deferred_stop_on_cpu(monkeypatch):
    check = generation_utils.DeferredStopCheck
    mps_rule = check.is_supported

    def on_any_device(device, cache, cache_is_returned, is_assistant):
        return mps_rule(torch.device("mps"), cache, cache_is_returned, is_assistant)

    monkeypatch.setattr(check, "is_supported", staticmethod(on_any_device))
    monkeypatch.setattr(generation_utils.torch, "Event", _HostEvent)
    calls = []
    original = check.finish
    monkeypatch.setattr(check, "finish", lambda self: calls.append(original(self)) or calls[-1])
    return calls


@pytest.mark.parametrize("cache_name", CACHES)
def test_deferred_stop_gives_plain_greedy_tokens_and_rolls_back_the_extra_step(cache_name, deferred_stop_on_cpu):
    model = make_tiny_model("llama")
    prompt = random_ids(model, 1, 10)
    reference = model.generate(
        prompt, max_new_tokens=12, do_sample=False, **{CACHE_KWARG: CACHES[cache_name](model.config)}
    )
    stop_token = int(reference[0, 16])  # stop at the 7th new token: the check runs one step past it
    expected = model.generate(
        prompt,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=stop_token,
        **{CACHE_KWARG: CACHES[cache_name](model.config)},
    )
    deferred_stop_on_cpu.clear()
    cache = CACHES[cache_name](model.config)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=stop_token, **{CACHE_KWARG: cache})
    assert deferred_stop_on_cpu == [1]  # the deferred path ran and undid one step
    assert torch.equal(out, expected)
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is not fed yet
    assert not any(getattr(layer, "record_past", False) for layer in cache.layers)
    if cache_name != "quantized-8bit":
        assert cache.stored_tokens <= cache.layers[0].get_max_length()
