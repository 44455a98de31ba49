"""KVzip: a context compressed once by reconstruction attention (against an eager reference), questions on
clones, positions and seen length, padded batches, quantized storage, and the prefix store's round trip."""

import copy

import pytest
import torch
from conftest import byte_tokenizer, make_tiny_model
from helpers import left_padded_batch, random_ids, sharp_model
from transformers import DynamicCache

from hf_kvcache import EvictionCache, Storage, build_cache, enable_score_capture
from hf_kvcache.caches.base import FULL_PRECISION
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies import KVzip, SnapKV
from hf_kvcache.prefix import DiskBackend, MemoryBackend, PrefixCache
from hf_kvcache.scoring import ScoreCaptureError

PROMPT = [40, 41, 42]  # reconstruction prompt ids for the tiny models (they have no tokenizer)
QUANTIZED = Storage(bits=4, token_wise=True, residual_length=4)


class PromptIds:
    """A stand-in tokenizer that encodes any prompt as `PROMPT`."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(PROMPT)


def compressed(model, ids, policy: KVzip, storage: Storage = FULL_PRECISION, mask=None) -> EvictionCache:
    cache = EvictionCache(model.config, policy, storage)
    cache.compress_context(model, ids, attention_mask=mask, tokenizer=PromptIds())
    return cache


@torch.no_grad()
def reference_scores(model, ids: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Per layer, [batch, kv_heads, context]: the highest attention any reconstruction query (any query head of
    the KV head's group) gives each context token, from eager `output_attentions` on DynamicCache copies."""
    cache = DynamicCache(config=model.config)
    length = ids.shape[1]
    for start in range(0, length, chunk):
        model(ids[:, start : start + chunk], **{CACHE_KWARG: cache})
    scores = None
    for start in range(0, length, chunk):
        repeat = torch.cat([torch.tensor([PROMPT] * ids.shape[0]), ids[:, max(0, start - 8) : start + chunk]], 1)
        positions = torch.arange(length, length + repeat.shape[1])[None]
        attentions = model(
            repeat, position_ids=positions, output_attentions=True, **{CACHE_KWARG: copy.deepcopy(cache)}
        ).attentions
        kv_heads = cache.layers[0].keys.shape[1]
        chunk_scores = [a.amax(2)[..., :length].unflatten(1, (kv_heads, -1)).amax(2) for a in attentions]
        scores = chunk_scores if scores is None else [torch.maximum(a, b) for a, b in zip(scores, chunk_scores)]
    return scores


def top(scores: torch.Tensor, budget: int) -> list:
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :budget].sort(-1).values.tolist()


@pytest.mark.parametrize("chunk", [64, 12])
def test_kept_tokens_match_the_eager_reconstruction_reference(attn, chunk):
    """Every layer and head keeps the `budget` context tokens with the highest max reconstruction attention,
    read from an independent eager run (one reconstruction forward, or three chunks with their anchors)."""
    ids = random_ids(sharp_model("eager"), 2, 30)
    expected = [top(scores, 10) for scores in reference_scores(sharp_model("eager"), ids, chunk)]
    model = enable_score_capture(sharp_model(attn))
    cache = compressed(model, ids, KVzip(budget=10, chunk_size=chunk))
    assert [layer.kept_positions() for layer in cache.layers] == expected
    assert cache.get_seq_length() == 30 and cache.stored_tokens == 10
    assert all(layer.state == {} for layer in cache.layers)  # the scores are dropped after selection


def test_shared_heads_and_sink_tokens():
    ids = random_ids(sharp_model("eager"), 1, 30)
    scores = reference_scores(sharp_model("eager"), ids, 64)
    model = enable_score_capture(sharp_model("sdpa"))
    shared = compressed(model, ids, KVzip(budget=8, per_head=False))
    for layer, layer_scores in zip(shared.layers, scores):
        expected = top(layer_scores.mean(1, keepdim=True), 8)[0][0]
        assert layer.kept_positions() == [[expected, expected]]
    sinks = compressed(model, ids, KVzip(budget=8, sink_tokens=3))
    for layer, layer_scores in zip(sinks.layers, scores):
        layer_scores = layer_scores.clone()
        layer_scores[..., :3] = float("inf")
        assert layer.kept_positions() == top(layer_scores, 8)


def answer(model, cache, context_length: int, question: torch.Tensor, new_tokens: int = 4) -> tuple[list, torch.Tensor]:
    """Feed `question` after the context, decode greedily; the tokens and the question's last logits."""
    with torch.no_grad():
        positions = torch.arange(context_length, context_length + question.shape[1])[None]
        logits = model(question, position_ids=positions, **{CACHE_KWARG: cache}).logits[:, -1]
        first, tokens = logits, []
        for step in range(new_tokens):
            tokens.append(int(logits.argmax(-1)))
            position = torch.tensor([[context_length + question.shape[1] + step]])
            logits = model(torch.tensor([[tokens[-1]]]), position_ids=position, **{CACHE_KWARG: cache}).logits[:, -1]
    return tokens, first


def same_answers(first: tuple[list, torch.Tensor], second: tuple[list, torch.Tensor]) -> None:
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def held_equal(first: EvictionCache, second: EvictionCache) -> bool:
    a, b = first.held_state(), second.held_state()
    return a.keys() == b.keys() and all(a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("storage", [Storage(), QUANTIZED], ids=["fp", "4bit"])
def test_one_compressed_cache_answers_many_questions_from_clones(storage):
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 40)
    cache = compressed(model, ids, KVzip(budget=12, chunk_size=16), storage)
    before = cache.clone()
    for seed in range(3):
        question = random_ids(model, 1, 5, seed=10 + seed)
        fresh = compressed(model, ids, KVzip(budget=12, chunk_size=16), storage)
        for copy_of in (cache.clone(), copy.deepcopy(cache)):
            same_answers(answer(model, copy_of, 40, question), answer(model, fresh.clone(), 40, question))
            assert copy_of.get_seq_length() == 40 + 5 + 4 and copy_of.stored_tokens == 12 + 5 + 4  # questions grow
    assert held_equal(cache, before) and cache.get_seq_length() == 40 and cache.stored_tokens == 12


@pytest.mark.parametrize("arch", ["llama", "gemma3-local-rope"])
def test_a_context_within_the_budget_answers_as_a_full_cache(arch):
    """Nothing evicted: reconstruction tokens are forgotten in every layer (the model's own sliding windows
    included), so questions continue at the context's length with DynamicCache's logits."""
    model = enable_score_capture(make_tiny_model(arch))
    ids, question = random_ids(model, 1, 30), random_ids(model, 1, 4, seed=5)
    cache = compressed(model, ids, KVzip(budget=64, chunk_size=8))
    assert cache.get_seq_length() == 30
    with torch.no_grad():
        full = DynamicCache(config=model.config)
        model(ids, **{CACHE_KWARG: full})
        expected = model(question, **{CACHE_KWARG: full}).logits[:, -1]
    torch.testing.assert_close(answer(model, cache, 30, question, new_tokens=1)[1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [64, 10])
def test_padded_batch_rows_keep_what_they_keep_alone(chunk):
    model = enable_score_capture(make_tiny_model("llama"))
    lengths = [30, 22, 26, 17]
    ids, mask = left_padded_batch(model, lengths, seed=3)
    batch = compressed(model, ids, KVzip(budget=12, chunk_size=chunk), mask=mask)
    assert batch.get_seq_length() == 30
    for row, length in enumerate(lengths):
        padding = 30 - length
        alone = compressed(model, ids[row : row + 1, padding:], KVzip(budget=12, chunk_size=chunk))
        for batch_layer, alone_layer in zip(batch.layers, alone.layers):
            kept = [[position - padding for position in head] for head in batch_layer.kept_positions()[row]]
            assert kept == alone_layer.kept_positions()[0], f"row {row}"
    assert sum(layer.padding_held() for layer in batch.layers) == 0  # every row has more real tokens than 12


def test_quantized_storage_keeps_the_budget_in_fewer_bytes():
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 40)
    full = compressed(model, ids, KVzip(budget=12))
    quantized = compressed(model, ids, KVzip(budget=12), QUANTIZED)
    assert quantized.get_seq_length() == 40 and quantized.stored_tokens == 12
    assert quantized.layers[0].body.key_codes.shape[-2] >= 8  # at most the 4-token residual in full precision
    assert quantized.memory_bytes() < 0.6 * full.memory_bytes()
    same = sum(
        len(set(a) & set(b))
        for fp, q in zip(full.layers, quantized.layers)
        for a, b in zip(fp.kept_positions()[0], q.kept_positions()[0])
    )
    assert same >= 0.75 * 12 * 2 * 2  # mostly the same tokens as in full precision


@pytest.mark.parametrize("storage", [Storage(), QUANTIZED], ids=["fp", "4bit"])
@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_the_prefix_store_restores_exactly_what_was_saved(backend, storage, tmp_path):
    model = enable_score_capture(make_tiny_model("llama"))
    ids, question = random_ids(model, 1, 40), random_ids(model, 1, 5, seed=9)
    store = PrefixCache(MemoryBackend() if backend == "memory" else DiskBackend(tmp_path / "store"))
    policy = KVzip(budget=12, chunk_size=16)
    cache = compressed(model, ids, policy, storage)
    assert store.save_compressed(model, ids, cache, tokenizer=PromptIds())
    restored = EvictionCache(model.config, policy, storage)
    assert store.restore_compressed(model, ids[0], restored, tokenizer=PromptIds())
    assert held_equal(restored, cache) and restored.get_seq_length() == 40
    same_answers(answer(model, restored, 40, question), answer(model, cache.clone(), 40, question))
    assert store.stats()["hits"] == 1 and store.stats()["tokens_reused"] == 40

    def misses(cache_policy=policy, cache_storage=storage, context=ids, restore_model=model, tokenizer=None):
        empty = EvictionCache(restore_model.config, cache_policy, cache_storage)
        tokenizer = tokenizer or PromptIds()
        return (
            not store.restore_compressed(restore_model, context, empty, tokenizer=tokenizer)
            and not empty.layers[0].is_initialized
        )

    assert misses(cache_policy=KVzip(budget=11, chunk_size=16))
    assert misses(cache_policy=KVzip(budget=12, chunk_size=8))
    assert misses(cache_policy=SnapKV(budget=12, observation_window=4))
    assert misses(cache_storage=Storage() if storage.bits else QUANTIZED)
    assert misses(context=random_ids(model, 1, 40, seed=1))
    assert misses(restore_model=enable_score_capture(make_tiny_model("llama", seed=1)))
    assert misses(tokenizer=byte_tokenizer())  # another reconstruction prompt


def test_the_prefix_store_refuses_what_it_cannot_key():
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 20)
    store = PrefixCache(MemoryBackend())
    cache = compressed(model, ids, KVzip(budget=8))
    with pytest.raises(ValueError, match="one prompt"):
        store.save_compressed(model, torch.cat([ids, ids]), cache, tokenizer=PromptIds())
    with pytest.raises(ValueError, match="seen 20 tokens, the context has 19"):
        store.save_compressed(model, ids[:, 1:], cache, tokenizer=PromptIds())
    with pytest.raises(ValueError, match="must be empty"):
        store.restore_compressed(model, ids, cache, tokenizer=PromptIds())
    with pytest.raises(ValueError, match="must be an EvictionCache"):
        store.save_compressed(model, ids, DynamicCache(config=model.config))


def test_the_prompt_is_tokenized_by_the_given_or_saved_tokenizer(tmp_path):
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 20)
    assert KVzip(prompt="ab").prompt_ids(model, byte_tokenizer()) == byte_tokenizer().encode("ab")
    assert KVzip(prompt="").prompt_ids(model) == []
    with pytest.raises(ValueError, match="pass tokenizer=, or use prompt=''"):
        EvictionCache(model.config, KVzip(budget=8)).compress_context(model, ids)
    cache = EvictionCache(model.config, KVzip(budget=8))
    cache.compress_context(model, ids, tokenizer=byte_tokenizer())
    assert cache.stored_tokens == 8
    byte_tokenizer().save_pretrained(tmp_path)
    model.name_or_path = str(tmp_path)  # what from_pretrained sets: the tokenizer saved there is used
    assert KVzip().prompt_ids(model) == byte_tokenizer().encode(KVzip().prompt)


def test_normal_forwards_never_evict_and_other_policies_compress_as_one_prompt():
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 30)
    cache = build_cache("kvzip:budget=8", model.config)
    assert cache.policy.compress_once and cache.storage.token_wise
    model.generate(ids, max_new_tokens=3, do_sample=False, **{CACHE_KWARG: cache})
    assert cache.stored_tokens == 32  # a plain prompt is kept whole
    snap, prompt = (EvictionCache(model.config, SnapKV(budget=8, observation_window=4)) for _ in range(2))
    snap.compress_context(model, ids)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: prompt})
    assert held_equal(snap, prompt) and snap.stored_tokens == 8


def test_refusals():
    model = make_tiny_model("llama")
    ids = random_ids(model, 1, 20)
    with pytest.raises(ScoreCaptureError, match="enable_score_capture"):
        compressed(model, ids, KVzip(budget=8))
    enable_score_capture(model)
    cache = compressed(model, ids, KVzip(budget=8))
    with pytest.raises(ValueError, match="fills an empty cache"):
        cache.compress_context(model, ids, tokenizer=PromptIds())
    with pytest.raises(ValueError, match="at least one real token"):
        compressed(model, ids, KVzip(budget=8), mask=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="sink_tokens=9 must be an integer between 0 and budget=8"):
        KVzip(budget=8, sink_tokens=9)
    with pytest.raises(ValueError, match="chunk_size=0"):
        KVzip(chunk_size=0)
    with pytest.raises(ValueError, match="prompt=3"):
        KVzip(prompt=3)
