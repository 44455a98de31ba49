"""load_model: local folders load; a hub id without the hub fails at once with a clear error."""

import time

import pytest
import torch
from conftest import make_tiny_model
from tokenizers import Tokenizer
from tokenizers import models as tokenizer_models
from transformers import DynamicCache, PreTrainedTokenizerFast

from hf_kvcache import models


def test_local_folder_loads_in_the_asked_dtype(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tokenizer_models.WordLevel({"a": 3}, unk_token="a"))
    ).save_pretrained(tmp_path)
    model, tokenizer = models.load_model(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("a").input_ids == [3]


def test_hub_id_without_the_hub_fails_fast(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    started = time.perf_counter()
    with pytest.raises(OSError, match="not a local folder, the Hugging Face hub is unreachable"):
        models.load_model("someone/unknown-model")
    assert time.perf_counter() - started < 10


def test_unknown_packaged_model_is_refused_with_the_accepted_names():
    with pytest.raises(ValueError, match=r"packaged model 'gemma9' is unknown; accepted values: smollm2-135m, gemma3"):
        models.packaged_model_path("gemma9")


def test_packaged_model_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_KVCACHE_CACHE_DIR", str(tmp_path))
    missing = models.PackagedModel("Missing-1M", "no_such_package_here", "pip install no-such-package", str)
    monkeypatch.setitem(models.PACKAGED_MODELS, "missing-1m", missing)
    with pytest.raises(
        RuntimeError, match=r"missing-1m \(Missing-1M\) is not installed. Install it with `pip install no-such"
    ):
        models.load_model("missing-1m")


def test_a_converted_copy_is_loaded_and_a_local_folder_of_that_name_wins(monkeypatch, tmp_path):
    """A packaged name loads its converted copy from the cache folder (no package needed once converted);
    a folder in the working directory with that name is a local folder, loaded as such."""
    monkeypatch.setenv("HF_KVCACHE_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tokenizer_models.WordLevel({"a": 3}, unk_token="a")))
    converted = tmp_path / "cache" / f"{models.PACKAGED_MODELS['gemma3-270m'].title}-fp32"
    make_tiny_model("llama").save_pretrained(converted)
    tokenizer.save_pretrained(converted)
    model, _ = models.load_model("gemma3-270m")
    assert model.config.model_type == "llama"
    assert models.model_title("gemma3-270m") == "gemma-3-270m (packaged)"
    assert models.model_title(None) == "SmolLM2-135M-Instruct (packaged)"

    monkeypatch.chdir(tmp_path)
    make_tiny_model("qwen2").save_pretrained(tmp_path / "gemma3-270m")
    tokenizer.save_pretrained(tmp_path / "gemma3-270m")
    model, _ = models.load_model("gemma3-270m")
    assert model.config.model_type == "qwen2"
    assert models.model_title("./gemma3-270m") == "./gemma3-270m"


def test_packaged_gemma_scores_a_novel_as_measured(gemma_model):
    """The second packaged model: Gemma 3 with sliding and full layers. Fed in chunks of 64 through a
    DynamicCache, 1,024 tokens of the bundled novel score as one forward without a cache does, and near the
    perplexity ../shared/data/README.md measured on "1,024 tokens of a novel" (23.46; this test's slice, with
    the tokenizer's BOS, measures 24.42)."""
    from hf_kvcache.eval.data import load_text, tokenize_text
    from hf_kvcache.eval.perplexity import evaluation_pass

    model, tokenizer = gemma_model
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    assert {"sliding_attention", "full_attention"} == set(model.config.layer_types)
    ids = tokenize_text(load_text("pg19", use_hub=False), tokenizer, 1024)
    record = evaluation_pass(model, ids, DynamicCache(config=model.config), step=64)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, :-1]
    whole = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).exp().item()
    assert record.perplexity == pytest.approx(whole, rel=1e-4)
    assert record.perplexity == pytest.approx(23.46, rel=0.05)
