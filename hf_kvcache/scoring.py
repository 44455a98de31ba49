"""The attention function of eviction policies (score capture), without forking any model.

A cache's `update` never sees attention, so policy layers (`caches/policy_layer.py`, `caches/ragged.py`)
return their keys tagged with a `ScoreRoute` (`hf_kvcache.attention.routing`). `enable_score_capture(model)`
switches a model from `sdpa` (or `eager`) to the capturing entry, which serves those routes: it asks the layer
for its own mask (the true padding of its kept tokens: `with_stored_padding`), runs the model's original
attention, then hands the layer an `AttentionCall`, from which the layer computes only what its policy needs
(the last `n` queries' softmax attention, in chunks of queries, summed over those queries and averaged over the
query heads sharing a KV head; or the queries themselves) and evicts. With any other cache, or none, outputs are
exactly those of the original function.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from hf_kvcache.attention import routing
from hf_kvcache.attention.probabilities import allowed_keys, attention_probabilities, grouped_logits
from hf_kvcache.attention.routing import CAPTURE_BASES as BASE_IMPLEMENTATIONS
from hf_kvcache.attention.routing import CAPTURE_PREFIX

QUERY_CHUNK = 256  # queries scored at once: memory is batch * heads * QUERY_CHUNK * kv_length floats


class ScoreCaptureError(RuntimeError):
    """A score-based cache is used on a model whose attention does not report scores."""


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    last_queries: int,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    real_queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of the last `last_queries` queries, summed over them, averaged per KV head.

    query [batch, q_heads, q, dim], key [batch, kv_heads, kv, dim] -> float32 [batch, kv_heads, kv].
    The probabilities are the model's own (`attention_probabilities`: `scaling`, `softcap`, learned `sinks`).
    Queries marked False in `real_queries` [batch, q] (padding) count zero. Queries are scored `QUERY_CHUNK`
    at a time, so the full attention matrix is never held.
    """
    batch, _, q_length, _ = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    total = query.new_zeros((batch, kv_heads, kv_length), dtype=torch.float32)
    for start in range(q_length - last_queries, q_length, QUERY_CHUNK):
        rows = slice(start, min(start + QUERY_CHUNK, q_length))
        allowed = allowed_keys(attention_mask, rows, q_length, kv_length, query.device)
        real = None if real_queries is None else real_queries[:, rows]
        probabilities = attention_probabilities(
            grouped_logits(query, key, rows, scaling), allowed, softcap, sinks, real
        )
        total += probabilities.sum(dim=-2).mean(dim=2)
    return total


@dataclass
class AttentionCall:
    """One attention call of a policy layer: what the layer may read after the attention ran.

    `query` [batch, q_heads, q, dim] (after RoPE), `key` [batch, kv_heads, kv, dim], and the mask the
    attention used. `scores(n)` computes the softmax attention of the last `n` queries on demand.
    """

    query: torch.Tensor
    key: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float | None
    softcap: float | None
    sinks: torch.Tensor | None
    real_queries: torch.Tensor | None = None

    def scores(self, last_queries: int) -> torch.Tensor:
        """float32 [batch, kv_heads, kv]: see `attention_scores`; padding queries (`real_queries` [batch, q]
        False) contribute nothing."""
        return attention_scores(
            self.query,
            self.key,
            self.attention_mask,
            self.scaling,
            last_queries,
            self.softcap,
            self.sinks,
            self.real_queries,
        )


def padding_of_new_tokens(attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
    """bool [batch, query_length]: True where a token of this forward is real (None: all are). Read from the
    newest query's row, which attends every real earlier token (left padding: the newest token is real)."""
    if attention_mask is None:
        return None
    kv_length = attention_mask.shape[-1]
    newest = allowed_keys(attention_mask, slice(-1, None), 1, kv_length, attention_mask.device)
    return newest[:, 0, 0, kv_length - query_length :]


def with_stored_padding(
    attention_mask: torch.Tensor | None, real: torch.Tensor, query: torch.Tensor
) -> torch.Tensor | None:
    """This layer's mask: columns for its stored tokens (all before every query) from `real` [batch, kv_heads,
    stored] (False: padding, per query head when heads differ), then the given mask's columns for this
    forward's own tokens.

    transformers builds one mask for all full-attention layers, from the first layer's sizes, and looks
    padding up at the stored tokens' labelled positions; layers that evicted different numbers of tokens
    (per-layer budgets) or out of order need their own. Returns `attention_mask` (None included) when
    every stored token is real and the sizes agree."""
    stored = real.shape[-1]
    batch, q_heads, q_length, _ = query.shape
    if attention_mask is not None and attention_mask.shape[-1] == stored + q_length and bool(real.all()):
        labelled_real = allowed_keys(attention_mask, slice(q_length - 1, q_length), q_length, stored, query.device)
        if bool(labelled_real.all()):
            return attention_mask
    if attention_mask is None:
        if bool(real.all()):
            return None
        attention_mask = allowed_keys(None, slice(0, q_length), q_length, q_length, query.device).expand(
            batch, 1, -1, -1
        )
    shared = bool((real == real[:, :1]).all())
    columns = real[:, :1] if shared else real.repeat_interleave(q_heads // real.shape[1], dim=1)
    columns = columns[:, :, None, :].expand(-1, -1, q_length, -1)
    own = attention_mask[..., attention_mask.shape[-1] - q_length :]
    own = own.expand(batch, columns.shape[1] if own.shape[1] == 1 else own.shape[1], -1, -1)
    if own.dtype != torch.bool:
        columns = torch.zeros((), dtype=own.dtype).masked_fill(~columns, torch.finfo(own.dtype).min)
    return torch.cat([columns.expand(-1, own.shape[1], -1, -1), own], dim=-1)


class ScoreRoute(routing.Route):
    """A policy layer's returned keys: the capturing attention runs the model's attention with the layer's own
    mask (`attention_mask`), then hands the layer the call (`observe`)."""

    entry = routing.CAPTURE
    served_by_key = False  # latent attention (DeepSeek-V3) expands cached latents into keys after the update

    def __init__(self, layer: object):
        self.layer = layer

    def attend(self, attention: Callable, module, query, key, value, attention_mask, **kwargs):
        layer = self.layer
        attention_mask = layer.attention_mask(attention_mask, query)
        output, weights = attention(module, query, key, value, attention_mask, **kwargs)
        sinks = module.sinks if layer.geometry.learned_sinks else None
        call = AttentionCall(
            query,
            key,
            attention_mask,
            kwargs.get("scaling"),
            kwargs.get("softcap"),
            sinks,
            padding_of_new_tokens(attention_mask, query.shape[2]),
        )
        layer.observe(call)
        return output, weights

    def unread_error(self) -> Exception:
        layer = self.layer
        return ScoreCaptureError(
            f"{type(layer).__name__} ({type(getattr(layer, 'policy', None)).__name__}) evicts after attention, but the "
            "attention of the previous layer never reported back: score capture is not active on this model. Call "
            "`hf_kvcache.enable_score_capture(model)` before using an eviction-policy cache (EvictionCache and its "
            "presets, whatever the policy reads)."
        )


def enable_score_capture(model: PreTrainedModel) -> PreTrainedModel:
    """Switch `model` (sdpa or eager attention) to the score-capturing variant; returns the model.

    Needed before a score-based cache is passed to the model. Outputs are unchanged: the original
    attention still computes them, and scores are only computed for score-based caches' layers.

    Raises:
        ValueError: another attention implementation, or a model whose attention does not go through
            transformers' `AttentionInterface` (e.g. Falcon), so that scores could never be captured.
    """
    current = model.config._attn_implementation
    if current.startswith(CAPTURE_PREFIX):
        return model
    routing.install()
    if current not in BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"score capture wraps the sdpa or eager attention; this model uses attn_implementation={current!r}. "
            "Load it with attn_implementation='sdpa' or 'eager'."
        )
    model.set_attn_implementation(CAPTURE_PREFIX + current)
    if model.config._attn_implementation != CAPTURE_PREFIX + current:  # transformers only logs the refusal
        raise ValueError(
            f"{type(model).__name__} does not take attention functions from transformers' AttentionInterface, "
            "so score capture cannot be enabled and score-based caches (HeavyHitterCache, TOVACache, "
            "SnapKVCache) cannot serve it; use a cache without score-based eviction"
        )
    return model


@contextlib.contextmanager
def score_capture(model: PreTrainedModel, enabled: bool = True) -> Iterator[PreTrainedModel]:
    """Within the block, `model` captures scores (`enable_score_capture`, when `enabled`); afterwards it has the
    attention implementation it had before, whatever happened inside, so a tool that needs capture for one
    cache hands the model back as it got it.

    Raises:
        ValueError: as `enable_score_capture`.
    """
    previous = model.config._attn_implementation
    if enabled:
        enable_score_capture(model)
    try:
        yield model
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def disable_score_capture(model: PreTrainedModel) -> PreTrainedModel:
    """Restore the attention implementation that `enable_score_capture` replaced."""
    current = model.config._attn_implementation
    if current.startswith(CAPTURE_PREFIX):
        model.set_attn_implementation(current.removeprefix(CAPTURE_PREFIX))
    return model
