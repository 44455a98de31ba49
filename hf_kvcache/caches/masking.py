"""Masks for caches that keep other tokens than transformers assumes.

Every mask function transformers ships is wrapped once (`hf_kvcache.attention.routing`); when a cache's
`get_mask_sizes` left a request for it, the cache's `prepare_mask` calls `corrected_mask`, so that the layer
whose mask is built can correct two assumptions:

- Padding of non-contiguous kept tokens (attention sinks): transformers looks up the padding status of
  stored token `j` at its *labelled* position `kv_offset + j`. A layer's head holds each row's first real
  tokens (its sinks) and its body the rest, so in a left-padded batch labels and true positions differ;
  the cache records each forward's 2D padding mask (`record_padding`, read by the layers as they store
  the new tokens) and the layer writes the true padding status onto its labels (`relabel_padding_mask`).
- A cache built from another model's config: transformers passes the model's config to the mask
  function, so the cache compares it (once per config object) with the geometry it was built for, and
  refuses a different RoPE, window or layer layout before any wrong attention is computed.
- Chunked attention (Llama 4): SDPA's mask may be skipped (left to `is_causal`) when fewer keys than the
  chunk size are attended, which holds for a cache that keeps whole chunks but not for a smaller window,
  whose keys can still straddle a chunk boundary. For a chunked layer the mask is always built.

Masks for any other cache or model pass through unchanged. The other mask functions transformers ships
(flash attention, flex attention) get the same config check; where a correction would change the mask (true
padding of kept tokens, a chunked layer whose kept keys do not start at position 0) they refuse the forward,
naming the implementation, before any attention runs: their masks are built in ways this module does not
verify (flash drops padding by index, flex compiles a block mask, neither runs on this project's CPU CI).
"""

import torch
from transformers import PreTrainedConfig

CORRECTING_IMPLEMENTATIONS = ("sdpa", "eager")  # mask functions that take the corrections


def corrected_mask(
    cache: object,
    layer: object,
    implementation: str,
    attention_mask: torch.Tensor | None,
    kv_offset: int,
    config: PreTrainedConfig | None,
) -> tuple[torch.Tensor | None, dict]:
    """The 2D padding mask [batch, kv] the mask function `implementation` should build from for `layer` of
    `cache`, and the keyword arguments it should get besides (a chunked layer's mask is never skipped).

    Raises:
        ValueError: `config` gives another geometry than the cache's (`check_model_config`), or a correction is
            needed that `implementation` cannot take, naming it.
    """
    corrects = implementation in CORRECTING_IMPLEMENTATIONS
    if config is not None:
        cache.check_model_config(config)
    cache.record_padding(attention_mask if isinstance(attention_mask, torch.Tensor) else None)
    relabel = getattr(layer, "relabel_padding_mask", None)
    chunked = getattr(getattr(layer, "geometry", None), "kind", None) == "chunked_attention"
    if relabel and isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        relabelled = relabel(attention_mask, kv_offset)
        if not corrects and not torch.equal(relabelled, attention_mask):
            _refuse(cache, implementation, "its kept tokens' padding is not where their labels say")
        attention_mask = relabelled
    if chunked and corrects:
        return attention_mask, {"allow_is_causal_skip": False}
    if chunked and kv_offset > 0:
        _refuse(cache, implementation, "a chunked-attention layer keeps keys that do not start a chunk")
    return attention_mask, {}


def _refuse(cache: object, implementation: str, reason: str) -> None:
    raise ValueError(
        f"{type(cache).__name__} cannot serve attn_implementation={implementation!r} here: {reason}, and only the "
        "sdpa and eager mask functions take the correction. Load the model with attn_implementation='sdpa' "
        "(or 'eager')."
    )
