import math

import pytest
import torch
from conftest import make_tiny_model
from helpers import random_ids

from hf_kvcache.eval import evaluate
from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.eval.perplexity import bucket_perplexity, full_sequence_nll
from hf_kvcache.registry import build_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dynamic_chunk_and_token_match_full_forward(arch):
    model = make_tiny_model(arch)
    ids = random_ids(model, 1, 150)
    reference = math.exp(full_sequence_nll(model, ids).mean().item())
    chunk = evaluate(["dynamic"], model=model, input_ids=ids, chunk_size=32, progress=False).results[0]
    token = evaluate(["dynamic"], model=model, input_ids=ids, mode="token", progress=False).results[0]
    assert chunk.tokens == token.tokens == 149
    assert chunk.perplexity == pytest.approx(reference, rel=1e-4)
    assert token.perplexity == pytest.approx(chunk.perplexity, rel=1e-4)
    assert token.prefill_tokens_per_s is None and chunk.prefill_tokens_per_s > 0


def test_figures_of_a_quantized_run():
    model = make_tiny_model("llama")
    ids = random_ids(model, 1, 96)
    run = evaluate(
        ["dynamic", "quantized:bits=2,group_size=16,residual_length=16"],
        model=model,
        input_ids=ids,
        chunk_size=16,
        bucket_size=20,
        decode_tokens=2,
        progress=False,
    )
    dynamic, quantized = run.results
    assert dynamic.memory_positions == [16, 32, 48, 64, 80, 96]
    # DynamicCache holds 2 layers x (K, V) x 2 heads x 16 dims in fp32 per token.
    assert dynamic.memory_bytes == [p * 2 * 2 * 2 * 16 * 4 for p in dynamic.memory_positions]
    assert quantized.cache_bytes < dynamic.cache_bytes
    assert quantized.ratios["cache_bytes"] == pytest.approx(quantized.cache_bytes / dynamic.cache_bytes)
    assert dynamic.ratios == dict.fromkeys(dynamic.ratios, 1.0)
    assert len(quantized.bucket_perplexity) == 5  # 95 predicted tokens in buckets of 20
    nll = torch.tensor(quantized.nll)
    assert quantized.bucket_perplexity == pytest.approx(bucket_perplexity(nll, 20))
    assert quantized.perplexity == pytest.approx(math.exp(nll.mean().item()))
    assert quantized.perplexity != dynamic.perplexity


def test_transformers_cache_bytes_count_held_tensors():
    model = make_tiny_model("llama")
    cache = build_cache("hf-quantized:backend=fp8", model.config)
    with torch.no_grad():
        model(random_ids(model, 1, 40), past_key_values=cache)
    # fp8: one byte per element plus a float32 scale, for K and V of 2 layers.
    assert cache_bytes(cache) == 2 * 2 * (40 * 2 * 16 + 4)


@pytest.mark.real_model
def test_real_model_dynamic_matches_full_forward(real_model):
    model, tokenizer = real_model
    ids = tokenize_text(load_text("wikitext2", use_hub=False), tokenizer, 512)
    reference = math.exp(full_sequence_nll(model, ids).mean().item())
    result = evaluate(["dynamic"], model=model, input_ids=ids, chunk_size=128, decode_tokens=1, progress=False)
    assert result.results[0].perplexity == pytest.approx(reference, rel=1e-4)
    assert 5 < reference < 40


def test_an_overflowing_perplexity_is_reported_as_infinite_and_written(tmp_path):
    """A diverged model (mean NLL above ~709.8 nats) gets an infinite perplexity with its mean NLL, not an
    OverflowError, and every output file is written."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    ids = random_ids(model, 1, 40)
    run = evaluate(
        ["dynamic", "quantized:bits=4,group_size=8"], model=model, input_ids=ids, chunk_size=8, progress=False
    )
    for result in run.results:
        assert result.mean_nll > 710 and result.perplexity == math.inf
        assert all(value == math.inf for value in result.bucket_perplexity)
    run.write_json(tmp_path / "results.json")
    run.write_csv(tmp_path / "results.csv")
    assert "Infinity" in (tmp_path / "results.json").read_text() and "inf" in run.table()
