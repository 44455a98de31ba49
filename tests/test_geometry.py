"""Per-layer geometry: every layer's RoPE, head sizes and kind, checked against the models themselves."""

import pytest
import torch
import transformers
from conftest import COMMON_CONFIG, MATRIX, MLA_CONFIG, make_tiny_model, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2VLConfig

from hf_kvcache import QuantizedCache, SinkCache
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import model_geometry

ROTATED = [arch for arch in MATRIX if arch not in ("gpt2", "qwen3-next-linear-hybrid")]
_GQA = dict(COMMON_CONFIG, num_key_value_heads=2)
_MIXED = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
# More families, checked here for their RoPE only (the matrix runs every cache on the ones in conftest).
MORE_FAMILIES = {
    "gptj": lambda: transformers.GPTJConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "codegen": lambda: transformers.CodeGenConfig(vocab_size=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True
    ),
    "llama4": lambda: transformers.Llama4TextConfig(
        **_GQA,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        intermediate_size_mlp=128,
        no_rope_layers=[1, 0],
        attention_chunk_size=16,
        moe_layers=[],
    ),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(**MLA_CONFIG),
    "helium": lambda: transformers.HeliumConfig(**_GQA, head_dim=16),
    "glm4": lambda: transformers.Glm4Config(**_GQA, head_dim=16),
    "ernie4_5": lambda: transformers.Ernie4_5Config(**_GQA, head_dim=16),
    "stablelm": lambda: transformers.StableLmConfig(**_GQA, partial_rotary_factor=0.25),
    "exaone4": lambda: transformers.Exaone4Config(**_GQA, **_MIXED),
    "olmo3": lambda: transformers.Olmo3Config(**_GQA, **_MIXED),
}
if hasattr(transformers, "ErgoConfig"):  # 5.25: interleaved pairs, a family no list here names (read from its code)
    MORE_FAMILIES["ergo"] = lambda: transformers.ErgoConfig(**_GQA, head_dim=16, **_MIXED)


@torch.no_grad()
def cached_states(model, token: torch.Tensor, position: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's cached (keys, values) for one token fed alone at `position`."""
    cache = DynamicCache(config=model.config)
    model(token, position_ids=torch.tensor([[position]]), **{CACHE_KWARG: cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def family_model(arch: str):
    if arch in MORE_FAMILIES:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(MORE_FAMILIES[arch](), attn_implementation="eager").eval()
    return make_tiny_model(arch, "eager", layers=None)


@pytest.mark.parametrize("arch", ROTATED + list(MORE_FAMILIES))
def test_each_layers_rope_shift_equals_the_model_at_a_later_position(arch):
    """A token alone attends only to itself, so its cached states depend on its position only through the
    rotation: the layer's `Rope.shift` must take the states at position p exactly to those at p + delta,
    and a layer without RoPE must cache the same states at both positions."""
    model = family_model(arch)
    geometry = model_geometry(model.config)
    token = torch.tensor([[7]])
    for start, delta in ((3, 50), (0, 1234)):
        before, after = cached_states(model, token, start), cached_states(model, token, start + delta)
        for layer, states, expected in zip(geometry.layers, before, after):
            if layer.positions == "none":
                torch.testing.assert_close(states, expected, atol=1e-6, rtol=1e-5)
                continue
            assert layer.rope is not None, f"{arch} {layer.describe()}: {layer.rope_problem}"
            slot = 0 if layer.rope.slot == "keys" else 1
            torch.testing.assert_close(layer.rope.shift(states[slot], delta), expected[slot], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(states[1 - slot], expected[1 - slot], atol=1e-6, rtol=1e-5)


def test_rope_pair_layout_is_read_from_the_models_rotary_code(monkeypatch):
    import transformers.models.llama.modeling_llama as modeling_llama

    assert model_geometry(tiny_config("llama")).layers[0].rope.layout == "half"
    assert model_geometry(tiny_config("cohere2-interleaved-nope")).layers[0].rope.layout == "interleaved"
    monkeypatch.setattr(modeling_llama, "rotate_half", lambda x: torch.cat([x[..., 4:], -x[..., :4]], dim=-1))
    layer = model_geometry(tiny_config("llama")).layers[0]
    assert layer.rope is None and "pairs channels in a layout hf_kvcache does not know" in layer.rope_problem
    with pytest.raises(ValueError, match="does not know"):
        SinkCache(tiny_config("llama"), sink_tokens=2, window=8)


def test_layer_facts_read_per_layer_from_the_config():
    gemma3 = model_geometry(tiny_config("gemma3-local-rope")).layers
    assert [layer.kind for layer in gemma3] == ["sliding_attention", "full_attention"]
    assert gemma3[0].rope.inv_freq[1].item() == pytest.approx(1e4 ** (-2 / 16))  # local base
    assert gemma3[1].rope.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / 16))  # global base
    assert [layer.positions for layer in model_geometry(tiny_config("smollm3-nope")).layers] == ["rope", "none"]
    gemma4 = model_geometry(tiny_config("gemma4-per-layer-dims")).layers
    assert [(layer.key_dim, layer.value_dim) for layer in gemma4] == [(16, 16), (32, 32)]
    mla = model_geometry(tiny_config("deepseek-v3-mla")).layers[0]
    assert (mla.kv_heads, mla.key_dim, mla.value_dim, mla.rope.slot) == (1, 32, 8, "values")
    cohere2 = model_geometry(tiny_config("cohere2-interleaved-nope")).layers
    assert cohere2[0].rope.layout == "interleaved" and cohere2[1].positions == "none"
    assert model_geometry(tiny_config("gpt-oss-sinks")).layers[0].learned_sinks
    assert model_geometry(tiny_config("gemma2-softcap")).layers[0].softcap == 5.0
    assert model_geometry(tiny_config("gpt2")).layers[0].positions == "absolute"
    alibi = transformers.FalconConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, alibi=True
    )
    assert model_geometry(alibi).layers[0].positions == "absolute"  # it keeps RoPE parameters it does not use
    assert model_geometry(tiny_config("phi-partial-rotary")).layers[0].rope.rotary_dim == 8


def test_recurrent_layers_are_held_as_transformers_holds_them():
    cache = QuantizedCache(tiny_config("qwen3-next-linear-hybrid"))
    assert type(cache.layers[0]) is type(DynamicCache(config=tiny_config("qwen3-next-linear-hybrid")).layers[0])
    assert model_geometry(tiny_config("qwen3-next-linear-hybrid")).layers[0].keeps_recurrent_state


def test_layers_with_per_token_state_besides_kv_are_refused_naming_the_layer_and_why():
    if not hasattr(transformers, "GlmMoeDsaConfig"):
        pytest.skip("this transformers has no GLM-MoE-DSA")
    config = transformers.GlmMoeDsaConfig(**{**COMMON_CONFIG, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"cannot serve glm_moe_dsa layer 0 \(indexed_attention\): its sparse"):
        QuantizedCache(config)


def test_a_model_without_attention_layers_is_refused():
    only_linear_attention = tiny_config("qwen3-next-linear-hybrid", layers=2)
    with pytest.raises(ValueError, match=r"SinkCache cannot serve qwen3_next: it has no attention layer"):
        SinkCache(only_linear_attention)


def test_multimodal_rope_is_refused_for_sink_rerotation():
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        }
    )
    with pytest.raises(ValueError, match=r"layer 0 \(full_attention\) cannot re-rotate its sinks: multimodal RoPE"):
        SinkCache(config, sink_tokens=2, window=8)
    SinkCache(config, sink_tokens=2, window=8, rerotate=False)
    QuantizedCache(config)  # a cache that never moves keys serves it


def test_a_config_with_fewer_layers_than_the_model_is_refused():
    model = make_tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match=r"does not match this model \(2 layers here, 3 in the model\)"):
        model(torch.tensor([[5, 6]]), **{CACHE_KWARG: SinkCache(tiny_config("llama", layers=2))})
    keys = torch.zeros(1, 2, 1, 16)  # and where no mask is built (a direct update), at the extra layer
    with pytest.raises(ValueError, match=r"built from a config with 2 layers, but the model updates layer 2"):
        SinkCache(tiny_config("llama", layers=2)).update(keys, keys, 2)


def test_a_state_space_config_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"has no num_attention_heads \(state-space models such as Mamba"):
        QuantizedCache(transformers.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2))


def test_a_config_of_the_same_shapes_but_another_rope_or_window_is_refused_before_attention():
    """The mask functions receive the model's config: a cache built from another one says what differs."""
    model = make_tiny_model("llama")
    other_rope = tiny_config("llama")
    other_rope.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    with pytest.raises(ValueError, match=r"layer 0 \(full_attention\): its rotary embedding .* differs"):
        model(torch.tensor([[5, 6]]), **{CACHE_KWARG: SinkCache(other_rope, sink_tokens=1, window=4)})
    sliding = make_tiny_model("mistral-sliding")
    with pytest.raises(ValueError, match=r"kind full_attention here, sliding_attention in the model"):
        sliding(torch.tensor([[5, 6]]), **{CACHE_KWARG: QuantizedCache(tiny_config("mistral"))})
    copy = tiny_config("llama")  # another object, same geometry: served
    model(torch.tensor([[5, 6]]), **{CACHE_KWARG: SinkCache(copy, sink_tokens=1, window=4)})


def test_cache_built_for_another_model_is_refused():
    model = make_tiny_model("llama")  # head_dim 16, 2 KV heads
    with pytest.raises(ValueError, match=r"key_dim 96 here, 16 in the model"):
        model(torch.tensor([[5, 6]]), **{CACHE_KWARG: QuantizedCache(tiny_config("phi3-head96"))})
    keys = torch.zeros(1, 2, 1, 16)  # where no mask is built (a direct update): at the first update
    with pytest.raises(ValueError, match=r"built from a config with 2 KV heads, 96 key and 96 value channels"):
        QuantizedCache(tiny_config("phi3-head96")).update(keys, keys, 0)


def test_the_old_rope_rotator_name_returns_a_layers_rope_with_a_deprecation_warning():
    from hf_kvcache.geometry import RopeRotator

    config = tiny_config("gemma3-local-rope")
    with pytest.warns(DeprecationWarning, match="RoPE differs per layer"):
        rope = RopeRotator(config, 1)
    assert rope is not None and torch.equal(rope.inv_freq, model_geometry(config).layers[1].rope.inv_freq)
    with pytest.raises(ValueError, match="has no RoPE to shift"), pytest.warns(DeprecationWarning):
        RopeRotator(tiny_config("gpt2"))
