"""The failing cases of ../shared/cases/ (07, 20, 24), as tests: each situation, each threshold, as written there."""

import pytest
import torch
from conftest import COMMON_CONFIG
from eviction_reference import dense_on_kept
from helpers import random_ids
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, Gemma4TextConfig, SmolLM3Config

from hf_kvcache import QuantizedCache, SinkCache, SlidingWindowCache, TOVACache, enable_score_capture
from hf_kvcache.compat import CACHE_KWARG

COMMON = {key: value for key, value in COMMON_CONFIG.items() if key != "num_hidden_layers"}
GEMMA4 = dict(
    COMMON,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    vocab_size_per_layer_input=256,
    hidden_size_per_layer_input=16,
)


def model_from(config, attn: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@torch.no_grad()
def worst_sink_error(model, ids: torch.Tensor, sinks: int = 2, window: int = 10, config=None) -> float:
    """Feed `ids` one token at a time through SinkCache(sinks, window); the largest logit difference from a
    dense run over exactly the kept tokens, after the first eviction."""
    cache = SinkCache(config or model.config, sink_tokens=sinks, window=window)
    worst = 0.0
    for t in range(ids.shape[1]):
        logits = model(ids[:, t : t + 1], **{CACHE_KWARG: cache}).logits
        if t > sinks + window:
            kept = list(range(sinks)) + list(range(t - window, t))
            expected = dense_on_kept(model, ids, kept, [t], first_label=t - len(kept))
            worst = max(worst, (logits - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_case_07_gemma3_sliding_layers_rerotate_sinks_with_their_local_rope(layer_type):
    config = Gemma3TextConfig(
        **COMMON, num_hidden_layers=1, num_key_value_heads=2, head_dim=16, sliding_window=64, layer_types=[layer_type]
    )
    model = model_from(config, "eager")
    assert worst_sink_error(model, random_ids(model, 1, 40)) < 1e-4


@pytest.mark.parametrize(("use_rope", "sharpness"), [(1, 1), (0, 1), (0, 8)])
def test_case_20_smollm3_nope_layers_never_rotate_their_sinks(use_rope, sharpness):
    config = SmolLM3Config(**COMMON, num_hidden_layers=1, num_key_value_heads=2, no_rope_layers=[use_rope])
    model = model_from(config)
    with torch.no_grad():  # sharper attention (q/k x 8), closer to a trained model's attention scale
        model.model.layers[0].self_attn.q_proj.weight.mul_(sharpness)
        model.model.layers[0].self_attn.k_proj.weight.mul_(sharpness)
    assert worst_sink_error(model, random_ids(model, 1, 36)) < 1e-4


def test_case_24_gemma4_every_cache_runs_and_equals_dynamic_cache():
    model = enable_score_capture(model_from(Gemma4TextConfig(**GEMMA4, num_hidden_layers=6, sliding_window=8)))
    ids = random_ids(model, 1, 20)
    with torch.no_grad():
        expected = model(ids, **{CACHE_KWARG: DynamicCache(config=model.config)}).logits
    makers = {
        "quantized": lambda c: QuantizedCache(c, bits=8, group_size=8, residual_length=512),
        "window": lambda c: SlidingWindowCache(c, window=500),
        "sink": lambda c: SinkCache(c, window=500),
        "tova": lambda c: TOVACache(c, budget=500),
    }
    for make in makers.values():
        with torch.no_grad():
            actual = model(ids, **{CACHE_KWARG: make(model.config)}).logits
        assert (actual - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "layer_types", [["full_attention"], ["sliding_attention", "full_attention"]], ids=["full", "sliding"]
)
def test_case_24_gemma4_sinks_on_each_layer_kind_equal_a_dense_run_on_the_kept_tokens(layer_types):
    config = Gemma4TextConfig(**GEMMA4, num_hidden_layers=len(layer_types), sliding_window=64, layer_types=layer_types)
    model = model_from(config)
    if len(layer_types) == 2:  # Gemma 4 forces its last layer to full attention: silence it to probe layer 0
        with torch.no_grad():
            model.model.layers[1].self_attn.o_proj.weight.zero_()
    # no escape hatch needed any more: the cache reads each layer's head size from the per-layer config
    assert worst_sink_error(model, random_ids(model, 1, 30, seed=5)) < 1e-4
