"""SinkCache: equal to DynamicCache before eviction, equal to a dense run on the kept tokens after."""

import pytest
import torch
from conftest import ROPE_ARCHITECTURES, make_tiny_model
from eviction_reference import dense_on_kept
from helpers import chunked_logits, dynamic_logits, left_padded_batch, random_ids
from transformers import DynamicCache, GPT2Config
from transformers.masking_utils import AttentionMaskInterface

from hf_kvcache import CACHE_KWARG, SinkCache
from hf_kvcache.geometry import model_geometry

SINKS, WINDOW = 2, 10


@pytest.fixture(params=ROPE_ARCHITECTURES)
def rope_model(request, attn):
    from conftest import make_tiny_model

    return make_tiny_model(request.param, attn)


@pytest.fixture(params=ROPE_ARCHITECTURES)
def one_layer_model(request, attn):
    """One layer: its keys/values depend only on token and position, so a dense run on the kept tokens
    is an exact reference (deeper layers' cached states also carry the evicted tokens' influence)."""
    from conftest import make_tiny_model

    return make_tiny_model(request.param, attn, layers=1)


def kept_before(seen: int) -> list[int]:
    """Token indices a SinkCache(SINKS, WINDOW) holds after `seen` tokens."""
    if seen <= SINKS + WINDOW:
        return list(range(seen))
    return list(range(SINKS)) + list(range(seen - WINDOW, seen))


def test_equal_to_dynamic_cache_before_eviction(rope_model):
    ids = random_ids(rope_model, 2, SINKS + WINDOW)
    cache = SinkCache(rope_model.config, sink_tokens=SINKS, window=WINDOW)
    logits = chunked_logits(rope_model, ids, cache, chunk=3)
    torch.testing.assert_close(logits, dynamic_logits(rope_model, ids, chunk=3))


def test_decode_after_eviction_equals_dense_run_on_kept_tokens(one_layer_model):
    ids = random_ids(one_layer_model, 2, 40)
    cache = SinkCache(one_layer_model.config, sink_tokens=SINKS, window=WINDOW)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            kept = kept_before(t)
            assert cache.get_mask_sizes(1, 0) == (len(kept) + 1, t - len(kept))
            logits = one_layer_model(ids[:, t : t + 1], past_key_values=cache).logits
            if t > SINKS + WINDOW:
                expected = dense_on_kept(one_layer_model, ids, kept, [t], first_label=t - len(kept))
                torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 40 and cache.stored_tokens == SINKS + WINDOW


@pytest.mark.parametrize("chunk", [4, 16])  # 16 > WINDOW: chunks larger than the window
def test_chunked_prefill_equals_dense_run(one_layer_model, chunk):
    ids = random_ids(one_layer_model, 1, 48)
    cache = SinkCache(one_layer_model.config, sink_tokens=SINKS, window=WINDOW)
    with torch.no_grad():
        for start in range(0, 48, chunk):
            kept = kept_before(start)
            queries = list(range(start, start + chunk))
            logits = one_layer_model(ids[:, start : start + chunk], past_key_values=cache).logits
            expected = dense_on_kept(one_layer_model, ids, kept, queries, first_label=start - len(kept))
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_rerotation_matches_rope_at_shifted_positions(rope_model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rope = model_geometry(rope_model.config).layers[0].rope
    raw = torch.randn(1, 2, 5, 16)
    positions = torch.arange(5)[None]
    rotary = rope_model.model.rotary_emb
    rotated, _ = apply_rotary_pos_emb(raw, raw, *rotary(raw, positions))
    shifted, _ = apply_rotary_pos_emb(raw, raw, *rotary(raw, positions + 1234))
    torch.testing.assert_close(rope.shift(rotated, 1234), shifted, atol=1e-5, rtol=1e-4)


def test_sinks_are_rotated_from_the_original_keys_each_time():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    cache = SinkCache(model.config, sink_tokens=SINKS, window=WINDOW)
    chunked_logits(model, random_ids(model, 1, 300), cache, chunk=1)
    layer = cache.layers[0]
    original = layer.head.keys.clone()
    assert torch.equal(layer.head_states(288)[0], model_geometry(model.config).layers[0].rope.shift(original, 288))
    assert torch.equal(layer.head.keys, original)  # stored sinks never drift


def test_generate_greedy_sampling_beam_and_reuse(rope_model):
    ids = random_ids(rope_model, 2, 8)
    # Nothing evicted: identical to DynamicCache for every decoding mode.
    for kwargs in ({"do_sample": False}, {"do_sample": True}, {"num_beams": 3, "do_sample": False}):
        torch.manual_seed(0)
        expected = rope_model.generate(ids, max_new_tokens=20, **kwargs)
        torch.manual_seed(0)
        cache = SinkCache(rope_model.config, sink_tokens=SINKS, window=64)
        assert torch.equal(rope_model.generate(ids, max_new_tokens=20, past_key_values=cache, **kwargs), expected)
    # With eviction, beam search runs and keeps the cache bounded.
    cache = SinkCache(rope_model.config, sink_tokens=SINKS, window=WINDOW)
    out = rope_model.generate(ids, max_new_tokens=30, num_beams=2, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 38) and cache.stored_tokens == SINKS + WINDOW
    # Reuse across calls, then reset.
    more = rope_model.generate(out[:1], max_new_tokens=5, do_sample=False, past_key_values=SinkCache(rope_model.config))
    assert more.shape == (1, 43)


def test_left_padding_never_attends_to_padding(one_layer_model):
    ids, mask = left_padded_batch(one_layer_model, [30, 24])
    cache = SinkCache(one_layer_model.config, sink_tokens=SINKS, window=WINDOW)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits = one_layer_model(ids[:, t : t + 1], past_key_values=cache, attention_mask=mask[:, : t + 1]).logits
            if t > SINKS + WINDOW:
                kept = kept_before(t)
                expected = dense_on_kept(one_layer_model, ids, kept, [t], t - len(kept), mask=mask[:, : t + 1])
                torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_memory_is_constant_once_the_window_is_full():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    for bits in (None, 4):
        settings = {"group_size": 16, "residual_length": 16} if bits else {}  # code settings need codes
        cache = SinkCache(model.config, sink_tokens=4, window=64, bits=bits, **settings)
        sizes = []
        with torch.no_grad():
            for token in random_ids(model, 1, 400)[0]:
                model(token.view(1, 1), past_key_values=cache)
                sizes.append(cache.memory_bytes())
        tensors = [getattr(layer.body, n) for layer in cache.layers for n in layer.body.tensor_names]
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors)  # no hidden evicted memory
        steady = sizes[200:]
        if bits is None:
            assert len(set(steady)) == 1
        else:  # quantized blocks and the residual trade places periodically, within a fixed bound
            assert max(steady) == max(sizes[100:200]) and max(steady) < sizes[-1] * 1.5
        assert cache.stored_tokens == 68


def test_quantized_window_matches_full_precision_sinks_closely():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    ids = random_ids(model, 1, 120)
    full = chunked_logits(model, ids, SinkCache(model.config, 4, 48), chunk=1)
    quant = chunked_logits(model, ids, SinkCache(model.config, 4, 48, bits=8, group_size=8, residual_length=8), chunk=1)
    assert 0 < (full - quant).abs().max() < 5e-3


def test_crop_before_eviction_and_clear_error_after():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    cache = SinkCache(model.config, sink_tokens=SINKS, window=WINDOW)
    chunked_logits(model, random_ids(model, 1, 8), cache, chunk=8)
    cache.crop(-3)
    assert cache.get_seq_length() == 5
    chunked_logits(model, random_ids(model, 1, 20), cache, chunk=20)
    with pytest.raises(
        ValueError, match=r"were evicted. Assisted decoding works because it calls `activate_past_recording\(\)`"
    ):
        cache.crop(-1)


def test_bad_input_is_refused_clearly():
    from conftest import tiny_config

    config = tiny_config("llama")
    with pytest.raises(ValueError, match="window=0 must be an integer >= 1"):
        SinkCache(config, window=0)
    with pytest.raises(ValueError, match="sink_tokens=-1"):
        SinkCache(config, sink_tokens=-1)
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        SinkCache(config, bits=5, group_size=8)
    with pytest.raises(ValueError, match=r"no rotary position embedding.*rerotate=False"):
        SinkCache(GPT2Config(n_layer=2, n_embd=64, n_head=4))
    with pytest.raises(ValueError, match="window=2 is smaller than sink_tokens=4"):
        SinkCache(config, sink_tokens=4, window=2)
    with pytest.raises(ValueError, match="leaves no room in the model's sliding window"):
        SinkCache(tiny_config("mistral-sliding"), sink_tokens=12, window=12)


def test_sinks_inside_a_models_sliding_window_equal_a_dense_run_on_the_kept_tokens(attn):
    """Mistral with a window of 12: the sliding layer keeps its 2 sinks + the last 9 tokens (11 = the 12-token
    window less the query), so it differs from DynamicCache by design and equals a dense run on those."""
    from conftest import make_tiny_model

    model = make_tiny_model("mistral-sliding", attn, layers=1)
    ids = random_ids(model, 1, 30)
    cache = SinkCache(model.config, sink_tokens=SINKS, window=WINDOW)
    assert cache.layers[0].window == 9
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits = model(ids[:, t : t + 1], past_key_values=cache).logits
            if t > SINKS + 9:
                kept = list(range(SINKS)) + list(range(t - 9, t))
                expected = dense_on_kept(model, ids, kept, [t], first_label=t - len(kept))
                torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_models_without_rope_run_with_rerotate_false():
    from conftest import make_tiny_model

    model = make_tiny_model("gpt2")
    ids = random_ids(model, 1, 30)
    cache = SinkCache(model.config, sink_tokens=SINKS, window=WINDOW, rerotate=False)
    logits = chunked_logits(model, ids, cache, chunk=1)
    reference = chunked_logits(model, ids, DynamicCache(config=model.config), chunk=1)
    torch.testing.assert_close(logits[:, : SINKS + WINDOW + 1], reference[:, : SINKS + WINDOW + 1])
    assert cache.stored_tokens == SINKS + WINDOW


@pytest.mark.real_model
def test_real_model_streams_with_flat_memory(real_model):
    model, tokenizer = real_model
    prompt = tokenizer("Once upon a time", return_tensors="pt")
    cache = SinkCache(model.config, sink_tokens=4, window=60)
    sizes = []

    class Probe:
        def __call__(self, input_ids, scores):
            sizes.append(cache.memory_bytes())
            return scores

    model.generate(**prompt, past_key_values=cache, max_new_tokens=300, min_new_tokens=300, logits_processor=[Probe()])
    assert cache.get_seq_length() == prompt.input_ids.shape[1] + 299
    assert cache.stored_tokens == 64 and len(set(sizes[100:])) == 1


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_mask_functions_that_cannot_take_the_padding_correction_refuse_naming_themselves(implementation):
    """Sinks of a left-padded row are not at their labels: flash and flex masks (no CPU kernels to verify them
    here) refuse such a forward at mask time; without padding they are served as they are."""
    model = make_tiny_model("llama")
    mask_function = AttentionMaskInterface._global_mapping[implementation]
    for lengths, refused in (([6, 20], True), ([20, 20], False)):
        ids, mask = left_padded_batch(model, lengths)
        cache = SinkCache(model.config, sink_tokens=2, window=8)
        with torch.no_grad():
            model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
        kv_length, kv_offset = cache.get_mask_sizes(1, 0)  # the next decode step's mask, as transformers asks
        arguments = dict(batch_size=2, q_length=1, kv_length=kv_length, kv_offset=kv_offset, config=model.config)
        next_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if refused:
            with pytest.raises(ValueError, match=f"attn_implementation='{implementation}'.*padding"):
                mask_function(**arguments, attention_mask=next_mask)
        else:
            mask_function(**arguments, attention_mask=next_mask)
