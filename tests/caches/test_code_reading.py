"""Code-reading decode attention (`hf_kvcache.caches.code_reading`) against the dequantize-then-attend path.

Tolerance: in float32 the two paths differ only by summation order; logits of the code path are within
1e-4 of the largest logit (relative) of the dequantize path (measured: below 1e-6), and generated tokens
are identical. Set HF_KVCACHE_TEST_DEVICE=cuda to run these tests on a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COMMON_CONFIG, make_tiny_model
from helpers import left_padded_batch, random_ids
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_kvcache import QuantizedCache
from hf_kvcache.attention import routing
from hf_kvcache.caches import code_reading
from hf_kvcache.caches.quantized import CodeReadingLayer
from hf_kvcache.quant import pack_codes

DEVICE = torch.device(os.environ.get("HF_KVCACHE_TEST_DEVICE", "cpu"))
RELATIVE_TOLERANCE = 1e-4
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def head_dim_model(head_dim: int, kv_heads: int = 2, attn_implementation: str = "sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON_CONFIG, num_key_value_heads=kv_heads, head_dim=head_dim)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval().to(DEVICE)


MODELS = {
    "llama-gqa-head16": lambda: make_tiny_model("llama").to(DEVICE),
    "qwen2-gqa": lambda: make_tiny_model("qwen2").to(DEVICE),
    "phi3-head96": lambda: make_tiny_model("phi3-head96").to(DEVICE),
    "llama-head64": lambda: head_dim_model(64),
    "llama-head80": lambda: head_dim_model(80),
    "llama-mha-head96": lambda: head_dim_model(96, kv_heads=4),
}


def cache_for(model, attention: str, **kwargs):
    settings = {"bits": 4, "group_size": 8, "residual_length": 8, "sink_tokens": 2, "compile_attention": False}
    return QuantizedCache(model.config, attention=attention, **{**settings, **kwargs})


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the code-reading attention."""
    calls = []
    original = code_reading.code_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(code_reading, "code_attention", counting)
    return calls


@torch.no_grad()
def decode_logits(model, cache, prompt: torch.Tensor, steps: int, attention_mask=None) -> torch.Tensor:
    """Prefill `prompt`, then `steps` greedy single-token steps; the logits of every step."""
    mask = attention_mask
    logits = [model(prompt, cache=cache, attention_mask=mask).logits[:, -1:]]
    for _ in range(steps):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits.append(model(logits[-1].argmax(-1), cache=cache, attention_mask=mask).logits)
    return torch.cat(logits, dim=1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    relative = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert relative < RELATIVE_TOLERANCE, relative


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 4},
        {"bits": 2},
        {"bits": 3},
        {"bits": 8},
        {"bits": 4, "rotate": False},
        {"bits": 2, "key_bits": 4, "sink_tokens": 0},
        {"bits": 3, "key_bits": 2, "key_group_size": 4, "rotate": False},
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_decode_logits_equal_dequantize_path(name, settings, spy):
    model = MODELS[name]()
    prompt = random_ids(model, 2, 29).to(DEVICE)
    expected = decode_logits(model, cache_for(model, "dequantize", **settings), prompt, steps=14)
    assert not spy
    cache = cache_for(model, "codes", **settings)
    actual = decode_logits(model, cache, prompt, steps=14)
    assert_close(actual, expected)
    readers = [layer for layer in cache.layers if isinstance(layer, CodeReadingLayer)]
    assert readers and len(spy) == 14 * len(readers)  # every decode step of every layer read codes
    assert cache.layers[0].body.quantized_length > 16


def test_three_bit_values_in_groups_of_twenty_dequantize():
    """Head size 80 groups values in 20 channels: no whole 3-bit words per group, so no code reading."""
    cache = cache_for(head_dim_model(80), "codes", bits=3, group_size=None)
    assert not any(isinstance(layer, CodeReadingLayer) for layer in cache.layers)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 0, "temperature": 1.0},
        {"do_sample": False, "num_beams": 3},
        {"do_sample": True, "num_return_sequences": 2},
    ],
)
def test_generate_tokens_identical(kwargs, spy):
    model = MODELS["qwen2-gqa"]()
    ids = random_ids(model, 2, 20).to(DEVICE)
    outputs = []
    for attention in ("dequantize", "codes"):
        torch.manual_seed(0)
        outputs.append(model.generate(ids, max_new_tokens=24, cache=cache_for(model, attention), **kwargs))
    assert torch.equal(*outputs)
    assert spy


def test_left_padded_batch(spy):
    model = MODELS["llama-gqa-head16"]()
    ids, mask = left_padded_batch(model, [25, 14, 6])
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    expected = decode_logits(model, cache_for(model, "dequantize"), ids, 12, mask)
    actual = decode_logits(model, cache_for(model, "codes"), ids, 12, mask)
    assert_close(actual, expected)
    assert spy and all(shape[0] == 3 for shape in spy)
    generated = [
        model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, cache=cache_for(model, attention))
        for attention in ("dequantize", "codes")
    ]
    assert torch.equal(*generated)


@pytest.mark.parametrize("length", [1, 3, 8])
def test_short_query_chunks_read_codes(length, spy):
    """Chunks of up to MAX_QUERY_LENGTH tokens (speculative decoding) read codes, causally among themselves."""
    model = MODELS["qwen2-gqa"]()
    ids = random_ids(model, 2, 60).to(DEVICE)
    results = []
    for attention in ("dequantize", "codes"):
        cache = cache_for(model, attention)
        with torch.no_grad():
            model(ids[:, :36], cache=cache)
            results.append(
                torch.cat([model(ids[:, s : s + length], cache=cache).logits for s in range(36, 60, length)], 1)
            )
    assert_close(results[1], results[0])
    assert spy and all(shape[2] == length for shape in spy)


@pytest.mark.parametrize("remove", [3, 11, 20])
def test_crop_then_decode(remove):
    """A crop that leaves a short newest block (read in full precision) or, after more appends, a short
    block in the middle (attention falls back to the materialized cache)."""
    model = MODELS["llama-gqa-head16"]()
    ids = random_ids(model, 1, 70).to(DEVICE)
    results = []
    for attention in ("dequantize", "codes"):
        cache = cache_for(model, attention)
        with torch.no_grad():
            model(ids[:, :40], cache=cache)
            cache.crop(40 - remove)
            logits = [model(ids[:, s : s + 1], cache=cache).logits for s in range(40 - remove, 70 - remove)]
        results.append(torch.cat(logits, 1))
    assert_close(results[1], results[0])


def test_eager_and_score_capture_models_never_read_codes(spy):
    for model in (head_dim_model(16, attn_implementation="eager"), MODELS["llama-gqa-head16"]()):
        if model.config._attn_implementation == "sdpa":
            from hf_kvcache import enable_score_capture

            enable_score_capture(model)
        prompt = random_ids(model, 1, 20).to(DEVICE)
        expected = decode_logits(model, cache_for(model, "dequantize"), prompt, 6)
        actual = decode_logits(model, cache_for(model, "codes"), prompt, 6)
        assert torch.equal(actual, expected)
    assert not spy


def test_the_former_module_name_is_the_same_module():
    from hf_kvcache import code_attention

    assert code_attention is code_reading and code_attention.CodeView is code_reading.CodeView


def test_unread_placeholders_raise():
    model = MODELS["llama-gqa-head16"]()
    cache = cache_for(model, "codes")
    with torch.no_grad():
        decode_logits(model, cache, random_ids(model, 1, 20).to(DEVICE), 2)
    layer = cache.layers[0]
    view = code_reading.CodeView(
        layer.head.keys,
        layer.head.values,
        layer.body.snapshot(),
        layer.head.keys[:, :, :1],
        layer.head.values[:, :, :1],
        False,
    )
    keys, _ = code_reading.placeholders(view)
    assert keys.shape[2] == len(layer.head) + len(layer.body) + 1 and routing.route_of(keys).view is view
    context = routing.ForwardContext()
    context.hand_over(keys)
    with pytest.raises(code_reading.CodeAttentionError, match="never read them"):
        context.hand_over(code_reading.placeholders(view)[0])


def reference_attention(query, keys, values, mask, scaling, softcap, sinks):
    """Plain float64 attention with GQA, softcapping and learned sink logits: [B, L, q_heads, Dv]."""
    group = query.shape[1] // keys.shape[1]
    keys, values = (t.double().repeat_interleave(group, dim=1) for t in (keys, values))
    logits = (query.double() @ keys.mT) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink_logits = sinks.double().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        probabilities = torch.cat([logits, sink_logits], -1).softmax(-1)[..., :-1]
    else:
        probabilities = logits.softmax(-1)
    return (probabilities @ values).transpose(1, 2)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("extras", [(None, False), (30.0, False), (None, True), (5.0, True)])
def test_kernel_with_softcap_sinks_and_padding_matches_reference(compiled, extras):
    softcap, with_sinks = extras
    torch.manual_seed(0)
    model = MODELS["llama-head64"]()
    cache = cache_for(model, "codes", bits=4, compile_attention=compiled)
    with torch.no_grad():
        model(random_ids(model, 2, 50).to(DEVICE), cache=cache)
    layer = cache.layers[1]
    new_keys, new_values = torch.randn(2, 2, 2, 64, device=DEVICE), torch.randn(2, 2, 2, 64, device=DEVICE)
    view = code_reading.CodeView(
        layer.head.keys, layer.head.values, layer.body.snapshot(), new_keys, new_values, with_sinks, compiled
    )
    keys, values = view.materialize()
    query = torch.randn(2, 4, 2, 64, device=DEVICE)
    mask = torch.ones(2, 1, 2, keys.shape[2], dtype=torch.bool, device=DEVICE)
    mask[0, :, :, :7] = False  # padding of the first row
    mask[:, :, 0, -1] = False  # causal among the two new tokens
    sinks = torch.randn(4, device=DEVICE) if with_sinks else None
    actual = code_reading.code_attention(query, view, mask, 0.2, softcap, sinks, compiled=compiled)
    expected = reference_attention(query, keys, values, mask, 0.2, softcap, sinks)
    assert (actual.double() - expected).abs().max() < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compiled_kernels_equal_eager(bits):
    torch.manual_seed(bits)
    batch, heads, rows, channels, block, blocks = 2, 3, 3, 64, 16, 5
    tokens = block * blocks
    codes = pack_codes(torch.randint(0, 1 << bits, (batch, heads, tokens, channels), dtype=torch.uint8), bits)
    queries = torch.randn(batch, heads, rows, channels)
    scale, minimum = torch.rand(batch, heads, blocks, channels), torch.randn(batch, heads, blocks, channels)
    probabilities = torch.rand(batch, heads, rows, tokens).softmax(-1)
    value_scale, value_minimum = torch.rand(batch, heads, tokens, 2), torch.randn(batch, heads, tokens, 2)
    args = [
        (code_reading.key_logits, (queries, codes, scale, minimum, bits, block)),
        (code_reading.value_output, (probabilities, codes, value_scale, value_minimum, bits, 32)),
    ]
    for function, arguments in args:
        arguments = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in arguments]
        eager = function(*arguments, False)
        compiled = code_reading._run(function, True, *arguments)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


def test_gpu_check_script_parses_and_its_python_runs_on_cpu(real_model, tmp_path):
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=False).returncode == 0
    command = [sys.executable, str(BENCHMARKS / "decode.py"), "--device", "cpu", "--contexts", "96", "--fill", "48"]
    command += ["--steps", "1", "--warmup", "1", "--output", str(tmp_path)]
    command += ["--specs", "dynamic", "quantized:bits=4,attention=codes,compile_attention=False"]
    subprocess.run(command, check=True, capture_output=True)
    assert (tmp_path / "decode.json").exists()
