"""Forwards of many models and caches, interleaved over threads with forwards that fail between a layer's update
and its attention: every generation equals the same generation run alone, and nothing an interrupted forward
left behind reaches a later forward (of any cache, any model, in any thread)."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache import build_cache, enable_score_capture
from hf_kvcache.attention import routing
from hf_kvcache.compat import CACHE_KWARG

pytestmark = pytest.mark.usefixtures("one_thread")

# (architecture, attention, score capture on): sdpa models without capture read quantized codes
MODELS = [
    ("llama", "sdpa", False),
    ("llama", "sdpa", True),
    ("qwen2", "eager", True),
    ("gemma2-softcap", "eager", True),
]
SPECS = {
    False: ["quantized:bits=4,residual_length=8", "sink:sink_tokens=4,window=16"],
    True: ["h2o:budget=16", "snapkv:budget=16,observation_window=4", "sink:sink_tokens=4,window=16"],
}
NEW_TOKENS = 12


class Interrupted(RuntimeError):
    """Raised from inside a forward, after a layer's update and before its attention."""


def interrupting(cache):
    """`cache` whose next update of layer 1 runs, then raises (as Ctrl-C in a notebook would)."""
    update = cache.update

    def update_then_raise(key_states, value_states, layer_idx, *args, **kwargs):
        result = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 1:
            cache.update = update
            raise Interrupted
        return result

    cache.update = update_then_raise
    return cache


@pytest.fixture(scope="module")
def models():
    built = {}
    for arch, attn, capture in MODELS:
        model = make_tiny_model(arch, attn)
        built[(arch, attn, capture)] = enable_score_capture(model) if capture else model
    return built


def generate(model, spec: str, seed: int) -> tuple[list[int], torch.Tensor]:
    ids = random_ids(model, 1, 24, seed=seed)
    with torch.no_grad():
        output = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **{CACHE_KWARG: build_cache(spec, model.config)},
        )
    return output.sequences[0].tolist(), torch.stack(output.logits)


def fail_midway(model, spec: str) -> None:
    """A decode step interrupted after layer 1's update: its placeholders or its wait for scores are left."""
    cache = build_cache(spec, model.config)
    ids = random_ids(model, 1, 24, seed=99)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})  # the prefill confirms the code-reading path
        with pytest.raises(Interrupted):
            model(ids[:, :1], **{CACHE_KWARG: interrupting(cache)})


def test_interleaved_generations_equal_each_run_alone(models):
    jobs = [(key, spec, seed) for key in models for spec in SPECS[key[2]] for seed in (0, 1)]
    alone = {job: generate(models[job[0]], job[1], job[2]) for job in jobs}

    def run(order: list) -> dict:
        results = {}
        for index, job in enumerate(order):
            if index % 2 == 0:  # every other job follows an interrupted forward of another model and cache
                other = order[(index + 1) % len(order)]
                fail_midway(models[other[0]], other[1])
            results[job] = generate(models[job[0]], job[1], job[2])
        assert routing.pending() == (None, None)  # nothing module-level is left once a forward returned
        return results

    orders = [random.Random(seed).sample(jobs, len(jobs)) for seed in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(run, orders))
    runs.append(run(orders[0]))  # and in this thread, after the others
    for results in runs:
        for job, (tokens, logits) in results.items():
            assert tokens == alone[job][0], job
            torch.testing.assert_close(logits, alone[job][1], rtol=0, atol=1e-5, msg=str(job))
