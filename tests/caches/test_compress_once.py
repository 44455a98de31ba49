"""The compress-once protocol run by the cache: a text read in chunks, the evaluation's perplexity pass and its
task mode feed KVzip by it (it compresses, holds fewer bytes, and its scores change), other caches unchanged."""

import pytest
import torch
from conftest import make_tiny_model, save_tiny_model_folder
from helpers import random_ids

from hf_kvcache import EvictionCache, build_cache, enable_score_capture
from hf_kvcache.caches.compress_once import compress_newest, compresses_once
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.eval.perplexity import evaluation_pass
from hf_kvcache.eval.runner import evaluate
from hf_kvcache.eval.task_eval import context_length, evaluate_task, prompt_ids
from hf_kvcache.eval.tasks import generate_samples
from hf_kvcache.models import load_model
from hf_kvcache.policies import KVzip
from hf_kvcache.scoring import ScoreCaptureError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compressing_the_newest_tokens_equals_compressing_them_as_a_context():
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 24)
    policy = KVzip(budget=10, chunk_size=16, prompt="")  # two scoring forwards: tokens 0-15, then 8-23
    reference = EvictionCache(model.config, policy)
    reference.compress_context(model, ids)
    fed = EvictionCache(model.config, policy)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: fed})
    assert fed.stored_tokens == 24  # ordinary forwards never evict
    compress_newest(fed, model, ids, newest=24)
    assert [layer.kept_positions() for layer in fed.layers] == [layer.kept_positions() for layer in reference.layers]
    assert fed.stored_tokens == 10 and fed.get_seq_length() == 24
    with pytest.raises(ValueError, match="the 24 tokens the cache has seen"):
        compress_newest(fed, model, ids[:, 1:], newest=4)
    with pytest.raises(ScoreCaptureError, match="enable_score_capture"):
        compress_newest(fed, make_tiny_model("llama"), ids, newest=4)


def test_the_perplexity_pass_compresses_after_every_chunk():
    """Chunks predicted before the cache first exceeds its budget equal dynamic's; later ones differ, and the
    cache holds its budget, not the text."""
    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 1, 48)
    dynamic = evaluation_pass(model, ids, build_cache("dynamic", model.config), step=8)
    kvzip = build_cache("kvzip:budget=12,chunk_size=64,prompt=", model.config)
    assert compresses_once(kvzip) and not compresses_once(build_cache("snapkv:budget=64", model.config))
    record = evaluation_pass(model, ids, kvzip, step=8)
    torch.testing.assert_close(record.nll[:15], dynamic.nll[:15])  # tokens 1-15: nothing evicted yet
    assert not torch.allclose(record.nll[16:], dynamic.nll[16:])
    assert kvzip.stored_tokens == 12 and kvzip.get_seq_length() == 48
    assert record.bytes_held[-1] < dynamic.bytes_held[-1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("compress-once") / "tiny")


def test_evaluate_really_compresses_kvzip_and_leaves_the_others_as_they_were(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    specs = ["dynamic", "kvzip:budget=32,chunk_size=64"]
    text = "the quick brown fox jumps over the lazy dog. " * 8
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    run = evaluate(specs, model=model, tokenizer=tokenizer, input_ids=ids, decode_tokens=1, progress=False)
    dynamic, kvzip = run.results
    assert kvzip.cache_bytes < dynamic.cache_bytes / 2
    assert kvzip.perplexity != dynamic.perplexity
    alone = evaluate(["dynamic"], model=model, tokenizer=tokenizer, input_ids=ids, decode_tokens=1, progress=False)
    assert alone.results[0].nll == dynamic.nll
    assert model.config._attn_implementation == "sdpa"  # handed back as it came


def test_task_mode_compresses_the_context_then_feeds_the_question(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    samples = generate_samples("passkey", tokenizer, 300, samples=2)
    ids = prompt_ids(tokenizer, samples[0])
    cut = context_length(tokenizer, samples[0], ids)
    question = tokenizer(samples[0].question)["input_ids"]  # one token per byte: the parts tokenize apart
    assert ids[0, :cut].tolist() == tokenizer(samples[0].context)["input_ids"]
    assert ids[0, cut : cut + len(question)].tolist() == question and len(question) > 5
    dynamic = evaluate_task(model, tokenizer, "dynamic", samples, max_new_tokens=2)
    kvzip = evaluate_task(model, tokenizer, "kvzip:budget=32,chunk_size=128", samples, max_new_tokens=2)
    assert kvzip.mean_cache_bytes < dynamic.mean_cache_bytes / 2
    assert model.config._attn_implementation == "sdpa"
