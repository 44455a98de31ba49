"""load_model: local folders load; a hub id without the hub fails at once with a clear error."""

import time

import pytest
import torch
from conftest import make_tiny_model
from tokenizers import Tokenizer
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

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
