"""TriAttention's query statistics from a calibration text: the online form of the policy run over the text.

One chunked pass: the text goes through an `EvictionCache` whose policy is `TriAttention(statistics=None)` with
a budget of the whole text (nothing is evicted), which adds every query, rotated back to before RoPE, to its
running sums in every full-attention layer; their means are the statistics. Cost: one forward over the text.
"""

import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from hf_kvcache.caches.evicting import EvictionCache
from hf_kvcache.caches.policy_layer import PolicyLayer
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device
from hf_kvcache.policies.triattention import QueryStatistics, TriAttention
from hf_kvcache.scoring import score_capture
from hf_kvcache.validation import check_int


@torch.no_grad()
def calibrate_query_statistics(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    chunk: int = 64,
    progress: Callable[[int], object] | None = None,
    source: str = "",
) -> QueryStatistics:
    """The mean pre-RoPE query and mean component norms per full-attention layer and query head, over the text
    `input_ids` [1, tokens], fed in forwards of `chunk` tokens (`progress(tokens)` after each).

    Raises:
        ValueError: `input_ids` not one row of at least one token, `chunk` < 1, or a model with no layer
            TriAttention can serve (see `TriAttention.check_layer`).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be one row of token ids [1, tokens], got {tuple(input_ids.shape)}")
    check_int("chunk", chunk, minimum=1)
    tokens = input_ids.shape[1]
    cache = EvictionCache(model.config, TriAttention(budget=tokens, recent=0))
    began = time.perf_counter()
    input_ids = input_ids.to(input_device(model))
    with score_capture(model):
        for start in range(0, tokens, chunk):
            model(input_ids[:, start : start + chunk], use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
            if progress is not None:
                progress(min(chunk, tokens - start))
    centers, norms = {}, {}
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, PolicyLayer):
            count = layer.running["query_count"][0]
            centers[index] = (layer.running["query_sum"][0] / count).cpu()
            norms[index] = (layer.running["norm_sum"][0] / count).cpu()
    if not centers:
        raise ValueError(f"{type(model).__name__} has no full-attention layer to calibrate query statistics for")
    name = getattr(model.config, "name_or_path", "") or model.config.model_type
    return QueryStatistics(centers, norms, name, source, tokens, chunk, time.perf_counter() - began)
