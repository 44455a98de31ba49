"""Attention-score capture for score-based eviction, without forking any model.

A cache's `update` never sees attention weights, so score-based caches (H2O, TOVA, SnapKV) get them
from an attention function registered in transformers' `AttentionInterface`, together with the
matching `AttentionMaskInterface` entry (without it transformers would silently pass no mask).

`enable_score_capture(model)` switches a model from `sdpa` (or `eager`) to the capturing variant.
The variant runs the original attention unchanged; when the layer that was just updated is a
score-based layer (it announces itself in `update`, see `caches/scored.py`), it then computes only
the scores that layer asks for (the last `n` queries' softmax attention, in chunks of queries, summed
over those queries and averaged over the query heads sharing a KV head) and hands them to the layer,
which evicts. With any other cache, or none, outputs are exactly those of the original function.
"""

import sys
import threading
from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

CAPTURE_PREFIX = "hf_kvcache_scores_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
QUERY_CHUNK = 256  # queries scored at once: memory is batch * heads * QUERY_CHUNK * kv_length floats

_pending = threading.local()


class ScoreCaptureError(RuntimeError):
    """A score-based cache is used on a model whose attention does not report scores."""


def announce_update(layer: object) -> None:
    """Called by a score-based layer's `update`: the next attention call belongs to it."""
    waiting = getattr(_pending, "layer", None)
    if waiting is not None:
        _pending.layer = None
        raise ScoreCaptureError(
            f"{type(layer).__name__} needs attention scores, but the attention of the previous layer never "
            "reported them: score capture is not active on this model. Call "
            "`hf_kvcache.enable_score_capture(model)` before using a score-based cache (HeavyHitterCache, "
            "TOVACache, SnapKVCache). If a forward failed midway, call `cache.reset()` and retry."
        )
    _pending.layer = layer


def _take_pending() -> object | None:
    layer = getattr(_pending, "layer", None)
    _pending.layer = None
    return layer


def _allowed(mask: torch.Tensor | None, rows: slice, q_length: int, kv_length: int, device) -> torch.Tensor:
    """Boolean [batch|1, 1, rows, kv] of what the queries in `rows` may attend (causal when `mask` is None)."""
    if mask is None:
        query_rows = torch.arange(rows.start, rows.stop, device=device)[:, None] + (kv_length - q_length)
        return (torch.arange(kv_length, device=device)[None, :] <= query_rows)[None, None]
    mask = mask[:, :, rows, :kv_length]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    last_queries: int,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of the last `last_queries` queries, summed over them, averaged per KV head.

    query [batch, q_heads, q, dim], key [batch, kv_heads, kv, dim] -> float32 [batch, kv_heads, kv].
    The probabilities are the model's own: `scaling`, `softcap` (tanh capping of the logits, Gemma 2) and
    learned per-query-head `sinks` logits [q_heads] that take part in the softmax without a key (GPT-OSS;
    the probabilities of real tokens then sum to less than one). Queries are scored `QUERY_CHUNK` at a
    time, so the full attention matrix is never held.
    """
    batch, q_heads, q_length, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    keys = key.float()[:, :, None].transpose(-1, -2)  # [batch, kv_heads, 1, dim, kv]
    total = query.new_zeros((batch, kv_heads, kv_length), dtype=torch.float32)
    for start in range(q_length - last_queries, q_length, QUERY_CHUNK):
        rows = slice(start, min(start + QUERY_CHUNK, q_length))
        queries = query[:, :, rows].float().reshape(batch, kv_heads, group, -1, dim)
        logits = (queries @ keys) * scaling  # [batch, kv_heads, group, rows, kv]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        allowed = _allowed(attention_mask, rows, q_length, kv_length, query.device)
        logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
        if sinks is not None:
            sink_logits = sinks.float().view(1, kv_heads, group, 1, 1).expand(*logits.shape[:-1], 1)
            probabilities = torch.cat([logits, sink_logits], dim=-1).softmax(dim=-1)[..., :-1]
        else:
            probabilities = logits.softmax(dim=-1)
        total += probabilities.sum(dim=-2).mean(dim=2)
    return total


def _refuse_padding(attention_mask: torch.Tensor | None, layer: object) -> None:
    """The newest query attends every stored token unless some of them are padding."""
    if attention_mask is None:
        return
    newest = _allowed(attention_mask, slice(-1, None), 1, attention_mask.shape[-1], attention_mask.device)
    if not bool(newest.all()):
        raise ValueError(
            f"{type(layer).__name__} does not support padded batches (attention_mask with zeros): its kept "
            "tokens are not contiguous, so the padding mask cannot be looked up for them. Run one sequence "
            "per batch row without padding, or use a cache without score-based eviction."
        )


def _eager_of(module: torch.nn.Module) -> Callable:
    """The model's own eager attention (each modeling file defines `eager_attention_forward`)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise ScoreCaptureError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file; "
            "use enable_score_capture on an sdpa model instead"
        )
    return function


def _capturing(base: str) -> Callable:
    def attention_with_scores(module, query, key, value, attention_mask, **kwargs):
        layer = _take_pending()
        if layer is not None:
            _refuse_padding(attention_mask, layer)
        original = sdpa_attention_forward if base == "sdpa" else _eager_of(module)
        output, weights = original(module, query, key, value, attention_mask, **kwargs)
        if layer is not None:
            count = layer.queries_needed(query.shape[2])
            scores = None
            if count:
                sinks = module.sinks if layer.geometry.learned_sinks else None
                scores = attention_scores(
                    query, key, attention_mask, kwargs.get("scaling"), count, kwargs.get("softcap"), sinks
                )
            layer.observe(scores)
        return output, weights

    return attention_with_scores


def _mask_of(base: str) -> Callable:
    # Looked up at call time, so wrappers installed later on the base mask function still apply.
    def mask(*args, **kwargs):
        return AttentionMaskInterface._global_mapping[base](*args, **kwargs)

    return mask


for _base in BASE_IMPLEMENTATIONS:
    AttentionInterface.register(CAPTURE_PREFIX + _base, _capturing(_base))
    AttentionMaskInterface.register(CAPTURE_PREFIX + _base, _mask_of(_base))


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


def disable_score_capture(model: PreTrainedModel) -> PreTrainedModel:
    """Restore the attention implementation that `enable_score_capture` replaced."""
    current = model.config._attn_implementation
    if current.startswith(CAPTURE_PREFIX):
        model.set_attn_implementation(current.removeprefix(CAPTURE_PREFIX))
    return model
