"""QuantizedCache against DynamicCache on tiny models of several architectures, and on the real model."""

import pytest
import torch
from helpers import chunked_logits, dynamic_logits, left_padded_batch, random_ids
from transformers import AutoModelForCausalLM, BertConfig, DynamicCache, LlamaConfig, Phi3Config, PhiConfig, T5Config

from hf_kvcache import CACHE_KWARG, QuantizedCache

# Max |logit difference| to DynamicCache on the tiny random models (logits have std ~0.1-1), for a
# 48-token prompt fed in chunks of 8 with group_size 8 and residual_length 8 (most tokens quantized).
TOLERANCE = {8: 5e-3, 4: 6e-2, 2: 3e-1}


def small_cache(model, bits, **kwargs):
    kwargs = {"group_size": 8, "residual_length": 8, "sink_tokens": 2, **kwargs}
    return QuantizedCache(model.config, bits=bits, **kwargs)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_logits_close_to_dynamic_cache(make_model, bits):
    model = make_model()
    ids = random_ids(model, 2, 48)
    reference = dynamic_logits(model, ids, chunk=8)
    cache = small_cache(model, bits)
    logits = chunked_logits(model, ids, cache, chunk=8)
    assert cache.get_seq_length() == 48 == cache.stored_tokens
    assert cache.layers[0].body.quantized_length >= 24  # most tokens really are quantized
    difference = (logits - reference).abs().max().item()
    assert difference < TOLERANCE[bits], difference
    assert difference > 0  # the quantized path was exercised


def test_three_bits_sit_between_two_and_four(make_model):
    model = make_model()
    ids = random_ids(model, 1, 48)
    reference = dynamic_logits(model, ids, chunk=8)
    errors = {
        bits: (chunked_logits(model, ids, small_cache(model, bits), chunk=8) - reference).abs().mean()
        for bits in (2, 3, 4)
    }
    assert errors[4] < errors[3] < errors[2]


def test_greedy_sampling_and_beam_search_match_dynamic_at_8_bits(make_model):
    model = make_model()
    ids = random_ids(model, 2, 20)
    for kwargs in (
        {"do_sample": False},
        {"do_sample": True, "top_k": 0, "temperature": 1.0},
        {"do_sample": False, "num_beams": 3},
        {"do_sample": True, "num_return_sequences": 2},
    ):
        torch.manual_seed(0)
        expected = model.generate(ids, max_new_tokens=24, **kwargs)
        torch.manual_seed(0)
        actual = model.generate(ids, max_new_tokens=24, past_key_values=small_cache(model, 8), **kwargs)
        assert torch.equal(actual, expected), kwargs


def test_left_padded_batch_matches_dynamic(make_model):
    model = make_model()
    ids, mask = left_padded_batch(model, [20, 13, 7])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    actual = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, past_key_values=small_cache(model, 8)
    )
    assert torch.equal(actual, expected)
    reference = dynamic_logits(model, ids, chunk=5, attention_mask=mask)
    logits = chunked_logits(model, ids, small_cache(model, 8), chunk=5, attention_mask=mask)
    real = mask.bool()
    assert (logits - reference)[real].abs().max() < TOLERANCE[8]


def test_cache_reused_across_generate_calls_and_reset():
    model = pytest.importorskip("conftest").make_tiny_model("llama")
    first = random_ids(model, 1, 12)
    dynamic, quantized = DynamicCache(config=model.config), small_cache(model, 8)
    out_d = model.generate(first, max_new_tokens=10, do_sample=False, past_key_values=dynamic)
    out_q = model.generate(first, max_new_tokens=10, do_sample=False, past_key_values=quantized)
    assert torch.equal(out_d, out_q)
    follow_up = torch.cat([out_d, random_ids(model, 1, 6, seed=1)], dim=1)
    out_d = model.generate(follow_up, max_new_tokens=10, do_sample=False, past_key_values=dynamic)
    out_q = model.generate(follow_up, max_new_tokens=10, do_sample=False, past_key_values=quantized)
    assert torch.equal(out_d, out_q)
    quantized.reset()
    assert quantized.get_seq_length() == 0 and quantized.memory_bytes() == 0
    again = model.generate(first, max_new_tokens=10, do_sample=False, past_key_values=quantized)
    assert torch.equal(again, model.generate(first, max_new_tokens=10, do_sample=False))


def test_batch_operations_match_dynamic_cache(make_model):
    model = make_model()
    ids = random_ids(model, 3, 30)
    dynamic, quantized = DynamicCache(config=model.config), small_cache(model, 8)
    chunked_logits(model, ids, dynamic, chunk=30)
    chunked_logits(model, ids, quantized, chunk=30)
    for cache in (dynamic, quantized):
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([5, 0, 3]))
        cache.reorder_cache(torch.tensor([1, 1, 2]))
    step = random_ids(model, 3, 1, seed=3)
    with torch.no_grad():
        expected = model(step, past_key_values=dynamic).logits
        actual = model(step, past_key_values=quantized).logits
    assert (actual - expected).abs().max() < TOLERANCE[8]


@pytest.mark.parametrize("codebook", ["uniform", "normal"])
@pytest.mark.parametrize("remove", [5, 13, 30, 39])  # residual only, into the last block, across blocks, all
def test_crop_at_any_depth_keeps_the_rest_exactly(make_model, remove, codebook):
    model = make_model()
    ids = random_ids(model, 1, 48)
    cache = small_cache(model, 8, codebook=codebook)
    chunked_logits(model, ids[:, :40], cache, chunk=40)
    before = [layer.body.read() for layer in cache.layers]
    cache.crop(-remove)
    assert cache.get_seq_length() == 40 - remove and cache.is_croppable
    for layer, (keys, values) in zip(cache.layers, before):
        kept = 40 - remove - len(layer.head)
        after_keys, after_values = layer.body.read()
        assert torch.equal(after_keys, keys[:, :, :kept]) and torch.equal(after_values, values[:, :, :kept])
    # the cache goes on from there: 8 more tokens in two chunks, within the 8-bit tolerance of a dense run
    chunked_logits(model, ids[:, 40 - remove : 44 - remove], cache, chunk=4)
    with torch.no_grad():
        expected = model(ids[:, : 48 - remove]).logits[:, -4:]
        actual = model(ids[:, 44 - remove : 48 - remove], past_key_values=cache).logits
    assert (actual - expected).abs().max() < TOLERANCE[8]


def test_memory_bytes_is_what_the_tensors_hold():
    model = pytest.importorskip("conftest").make_tiny_model("llama")
    ids = random_ids(model, 2, 100)
    dynamic = DynamicCache(config=model.config)
    chunked_logits(model, ids, dynamic, chunk=100)
    dynamic_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dynamic.layers)
    for bits in (2, 4, 8):
        cache = QuantizedCache(model.config, bits=bits, group_size=16, residual_length=16, sink_tokens=0)
        chunked_logits(model, ids, cache, chunk=100)
        tensors = [getattr(layer.body, name) for layer in cache.layers for name in layer.body.tensor_names]
        tensors += [t for layer in cache.layers for t in (layer.head.keys, layer.head.values)]
        assert cache.memory_bytes() == sum(t.nbytes for t in tensors)
        codes = cache.layers[0].body.key_codes
        assert codes.dtype == torch.uint8 and codes.shape[-1] == 16 * bits // 8
        assert cache.memory_bytes() < dynamic_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = pytest.importorskip("conftest").make_tiny_model("llama").to(dtype)
    ids = random_ids(model, 1, 40)
    reference = dynamic_logits(model, ids, chunk=8).float()
    logits = chunked_logits(model, ids, small_cache(model, 8), chunk=8).float()
    assert (logits - reference).abs().max() < 5e-2
    assert small_cache(model, 4).layers[0].storage.bits == 4


def test_sliding_window_layers_keep_the_model_window():
    model = pytest.importorskip("conftest").make_tiny_model("mistral-sliding")
    ids = random_ids(model, 1, 40)
    reference = dynamic_logits(model, ids, chunk=4)
    cache = small_cache(model, 8, residual_length=4)
    logits = chunked_logits(model, ids, cache, chunk=4)
    assert cache.stored_tokens == model.config.sliding_window - 1
    assert (logits - reference).abs().max() < TOLERANCE[8]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, r"bits=5 is not supported; accepted values: 2, 3, 4, 8"),
        (
            {"bits": 4, "group_size": 12},
            r"group_size=12 must divide the 64 grouped channels of layer 0 \(full_attention\) \(key channels 64, "
            r"value channels 64\); accepted values: 1, 2, 4, 8, 16, 32, 64, or None to choose per layer",
        ),
        ({"bits": 4, "residual_length": -1}, r"residual_length=-1 must be an integer >= 0"),
        ({"bits": 4, "sink_tokens": -2}, r"sink_tokens=-2 must be an integer >= 0"),
        ({"bits": 4, "key_outliers": -1}, r"key_outliers=-1 must be an integer >= 0"),
        ({"bits": 4, "codebook": "nf4"}, r"codebook='nf4' is not supported; accepted values: uniform, normal"),
        (
            {"bits": 4, "key_group_size": 8, "key_outliers": 8},
            r"key_outliers=8 needs KIVI's per-channel key blocks \(not token_wise\) of more than key_outliers and at "
            r"most 256 tokens \(an outlier's position is one byte\); layer 0 \(full_attention\) has key blocks of 8 tokens",
        ),
        (
            {"bits": 4, "key_group_size": 300, "key_outliers": 1},
            r"key_outliers=1 needs .* at most 256 tokens .*; layer 0 \(full_attention\) has key blocks of 300 tokens",
        ),
    ],
)
def test_bad_parameters_name_themselves(kwargs, message):
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_hidden_layers=2)
    with pytest.raises(ValueError, match=message):
        QuantizedCache(config, **kwargs)


@pytest.mark.parametrize(
    "config",
    [
        Phi3Config(
            vocab_size=256,
            hidden_size=192,
            num_attention_heads=2,
            num_hidden_layers=2,
            intermediate_size=128,
            pad_token_id=0,
        ),
        PhiConfig(vocab_size=256, hidden_size=160, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128),
    ],
    ids=["phi3-head96", "phi2-head80"],
)
def test_phi_models_run_with_defaults_and_8bit_matches_dynamic(config):
    """Phi-3 (head size 96) and Phi-2 (80, partial rotary): defaults work (rotation and groups that fit)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = random_ids(model, 1, 200)  # past the 128-token residual: whole blocks are quantized
    chunked_logits(model, ids, QuantizedCache(model.config), chunk=50)
    cache = QuantizedCache(model.config, bits=8)
    logits = chunked_logits(model, ids, cache, chunk=50)
    assert cache.layers[0].body.quantized_length > 0 and cache.layers[0].storage.rotate
    assert (logits - dynamic_logits(model, ids, chunk=50)).abs().max() < TOLERANCE[8]


@pytest.mark.parametrize(("head_dim", "group_size"), [(96, 32), (80, 20), (72, 24)])
def test_defaults_work_on_head_sizes_that_are_not_powers_of_two(head_dim, group_size):
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_hidden_layers=1)
    cache = QuantizedCache(config)
    assert cache.layers[0].storage.group_size == group_size and cache.layers[0].storage.rotate


def test_non_decoder_configs_are_refused():
    with pytest.raises(ValueError, match="encoder-decoder"):
        QuantizedCache(T5Config())
    with pytest.raises(ValueError, match="must be a transformers PreTrainedConfig"):
        QuantizedCache({"num_hidden_layers": 2})
    QuantizedCache(BertConfig(is_decoder=True))  # BERT as a causal LM is a decoder config


@pytest.mark.real_model
def test_real_model_greedy_tokens_identical_at_8_bits(real_model):
    model, tokenizer = real_model
    prompt = tokenizer("The history of the Roman Empire begins", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=64, do_sample=False)
    actual = model.generate(
        **prompt, max_new_tokens=64, do_sample=False, past_key_values=QuantizedCache(model.config, bits=8)
    )
    assert torch.equal(actual, expected)


def test_keys_can_have_their_own_bits_and_block_size():
    """key_bits / key_group_size set the keys apart: their codes, blocks and statistics, nothing else."""
    model = pytest.importorskip("conftest").make_tiny_model("llama")
    ids = random_ids(model, 1, 48)
    cache = QuantizedCache(
        model.config, bits=2, key_bits=4, group_size=16, key_group_size=8, residual_length=8, sink_tokens=0
    )
    chunked_logits(model, ids, cache, chunk=8)
    body = cache.layers[0].body
    assert body.key_codes.shape[-1] == 16 * 4 // 8 and body.value_codes.shape[-1] == 16 * 2 // 8
    assert body.quantized_length == 40 and body.key_scale.shape[-2] == 40 // 8  # 8-token key blocks
    assert body.value_scale.shape[-1] == 16 // 16  # values grouped by 16 channels
    # layer 0 sees the same keys and values under any cache: 4-bit keys read back closer, values identically
    reference = DynamicCache(config=model.config)
    chunked_logits(model, ids, reference, chunk=8)
    reads = {}
    for key_bits in (2, 4):
        quantized = QuantizedCache(model.config, bits=2, key_bits=key_bits, group_size=16, residual_length=8)
        chunked_logits(model, ids, quantized, chunk=8)
        reads[key_bits] = quantized.layers[0].body.read()
    exact = reference.layers[0].keys[:, :, 4:]  # after the 4 sink tokens
    assert (reads[4][0] - exact).abs().mean() < (reads[2][0] - exact).abs().mean() / 2
    assert torch.equal(reads[4][1], reads[2][1])


@pytest.mark.parametrize("bits", [2, 4])
def test_a_left_padded_row_keeps_its_own_sinks_and_scores_as_alone(bits):
    """The sinks of a padded row are its first real tokens (not padding), and its logits are as close to
    DynamicCache's as the same text's alone (block boundaries shift with the padding: not bit-exact)."""
    model = pytest.importorskip("conftest").make_tiny_model("llama")
    ids, mask = left_padded_batch(model, [96, 81], seed=4)
    padding = 15
    batch_cache = QuantizedCache(model.config, bits=bits, group_size=16, residual_length=16)
    next_ids = torch.full((2, 1), 5)
    full_mask = torch.cat([mask, mask[:, -1:]], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded row
    with torch.no_grad():  # the prompt, then one step that attends the held (quantized) tokens
        prompt = model(ids, attention_mask=mask, position_ids=positions[:, :-1], **{CACHE_KWARG: batch_cache})
        step = model(next_ids, attention_mask=full_mask, position_ids=positions[:, -1:], **{CACHE_KWARG: batch_cache})
    batch_logits = torch.cat([prompt.logits, step.logits], dim=1)
    alone_ids = torch.cat([ids[1:, padding:], next_ids[1:]], dim=1)
    alone_cache = QuantizedCache(model.config, bits=bits, group_size=16, residual_length=16)
    alone_logits = chunked_logits(model, alone_ids, alone_cache, chunk=81)
    expected = dynamic_logits(model, alone_ids, chunk=81)
    for layer, alone_layer in zip(batch_cache.layers, alone_cache.layers):
        torch.testing.assert_close(layer.head.keys[1], alone_layer.head.keys[0])  # the row's own first tokens
        assert layer.head_real is None and not layer.body_real[1, :padding].any()  # sinks: no padding
    padded_error = (batch_logits[1, padding:] - expected[0]).abs().mean()
    alone_error = (alone_logits[0] - expected[0]).abs().mean()
    assert padded_error < 1.5 * alone_error + 1e-4, (padded_error, alone_error)


def test_key_outliers_through_generate_beam_search_and_padded_batches(make_model):
    """Outlier tensors follow every batch operation (beam reorder, repeat, select): at 8 bits the tokens equal
    DynamicCache's, and at 2 bits outliers bring the logits closer to it."""
    model = make_model()
    ids, mask = left_padded_batch(model, [20, 13])
    for kwargs in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, **kwargs)
        cache = small_cache(model, 8, key_outliers=1)
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=20, past_key_values=cache, **kwargs)
        assert torch.equal(actual, expected), kwargs
        assert type(cache.layers[0]).__name__ == "KVLayer"  # outliers: decode dequantizes (no code reading)
    ids = random_ids(model, 2, 48)
    reference = dynamic_logits(model, ids, chunk=8)
    errors = [
        (chunked_logits(model, ids, small_cache(model, 2, key_outliers=count), chunk=8) - reference).abs().mean()
        for count in (0, 2)
    ]
    assert errors[1] < errors[0]
