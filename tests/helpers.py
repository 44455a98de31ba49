"""Reference runs shared by the cache tests: the same inputs through DynamicCache and a candidate."""

import time

import torch
from conftest import make_tiny_model
from transformers import DynamicCache

from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.prefix import BackendError, MemoryBackend


@torch.no_grad()
def chunked_logits(model, input_ids: torch.Tensor, cache, chunk: int, attention_mask=None) -> torch.Tensor:
    """Feed `input_ids` through `cache` in chunks of `chunk` tokens; return all logits."""
    outputs = []
    for start in range(0, input_ids.shape[1], chunk):
        mask = None if attention_mask is None else attention_mask[:, : start + chunk]
        outputs.append(model(input_ids[:, start : start + chunk], past_key_values=cache, attention_mask=mask).logits)
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def dynamic_logits(model, input_ids: torch.Tensor, chunk: int, attention_mask=None) -> torch.Tensor:
    return chunked_logits(model, input_ids, DynamicCache(config=model.config), chunk, attention_mask)


@torch.no_grad()
def prefill_then_tokens(model, input_ids: torch.Tensor, cache, prefill: int = 8) -> torch.Tensor:
    """A prefill of `prefill` tokens through `cache`, then one token at a time: every logit."""
    logits = [model(input_ids[:, :prefill], **{CACHE_KWARG: cache}).logits]
    steps = range(prefill, input_ids.shape[1])
    logits += [model(input_ids[:, t : t + 1], **{CACHE_KWARG: cache}).logits for t in steps]
    return torch.cat(logits, dim=1)


def random_ids(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)


def left_padded_batch(model, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of different lengths, left-padded with the pad id, and their attention mask."""
    longest = max(lengths)
    ids = random_ids(model, len(lengths), longest, seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : longest - length] = model.config.pad_token_id
        mask[row, : longest - length] = 0
    return ids, mask


@torch.no_grad()
def eager_reference(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-0 attention weights [batch, q_heads, q, kv] and keys [batch, kv_heads, kv, dim] of an eager
    model run on `input_ids` with a `DynamicCache` (an independent reference for score-based caches)."""
    cache = DynamicCache(config=model.config)
    attentions = model(input_ids, past_key_values=cache, output_attentions=True).attentions
    return attentions[0], cache.layers[0].keys


def kept_indices(stored_keys: torch.Tensor, reference_keys: torch.Tensor) -> torch.Tensor:
    """Position in `reference_keys` of every stored key, per batch row and KV head: [batch, heads, kept]."""
    equal = (stored_keys[:, :, :, None] == reference_keys[:, :, None]).all(-1)
    assert (equal.sum(-1) == 1).all(), "every stored key must be one reference key"
    return equal.float().argmax(-1)


def sharp_model(attn: str):
    """A tiny llama whose first layer attends sharply (scaled q/k), so attention-based choices are clear."""
    model = make_tiny_model("llama", attn)
    with torch.no_grad():
        for name in ("q_proj", "k_proj"):
            getattr(model.model.layers[0].self_attn, name).weight.mul_(30)
    return model


def layer_geometry(kv_heads: int = 2, head_dim: int = 16) -> LayerGeometry:
    """A plain full-attention layer without RoPE, for testing a layer class on its own."""
    return LayerGeometry(0, "full_attention", None, kv_heads, head_dim, head_dim, positions="none")


def policy_layer(policy, kv_heads: int = 2, head_dim: int = 1):
    """A `PolicyLayer` serving `policy` over `layer_geometry`, in full precision, for unit tests."""
    from hf_kvcache.caches.base import FULL_PRECISION
    from hf_kvcache.caches.evicting import PolicyLayer

    return PolicyLayer(layer_geometry(kv_heads, head_dim), FULL_PRECISION, policy, policy.budget, num_layers=1)


def store_tokens(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """`layer.update` outside a model (nothing attends)."""
    layer.update(keys, values)


def observe(layer, scores: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> None:
    """Hand `layer` an attention call whose scores (per cached head, summed over the scored queries) are
    `scores`, as the capturing attention function would after the forward."""
    from types import SimpleNamespace

    layer.observe(SimpleNamespace(scores=lambda count: scores, query=queries, scaling=None))


class Switchable(MemoryBackend):
    """A memory level whose calls fail while `down` is set, and which can be slowed down."""

    down = False
    delay = 0.0

    def get_prefix(self, keys, parent=None):
        if self.down:
            raise BackendError("level down")
        time.sleep(self.delay)
        return super().get_prefix(keys, parent)

    def put(self, key, value, parent=None):
        if self.down:
            raise BackendError("level down")
        return super().put(key, value, parent)
