"""The transform codec's calibration: principal components of every cached layer's keys (before RoPE) and values
over a text. Cost: one chunked forward over the text, then one eigendecomposition per layer and kind."""

from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device
from hf_kvcache.geometry import model_geometry
from hf_kvcache.prefix.keys import weights_digest
from hf_kvcache.prefix.transform_codec import (
    KINDS,
    CodecCalibration,
    Decorrelation,
    layer_ropes,
    rotate_to,
)
from hf_kvcache.validation import check_int


@torch.no_grad()
def calibrate_transform_codec(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    chunk: int = 512,
    skip_tokens: int = 4,
    progress: Callable[[int], object] | None = None,
    source: str = "",
) -> CodecCalibration:
    """Per cached layer, the PCA of its keys taken out of RoPE and of its values over the text `input_ids`
    [1, tokens], fed in forwards of `chunk` tokens (`progress(tokens)` after each). The first `skip_tokens`
    tokens (attention sinks, whose KV the codec keeps raw) are left out of the statistics.

    Raises:
        ValueError: `input_ids` not one row of more than `skip_tokens` + 1 tokens, `chunk` < 1, a model whose
            layers hold more than per-token KV (`layers_without_per_token_kv`), or a layer whose RoPE cannot be
            undone.
    """
    check_int("chunk", chunk, minimum=1)
    check_int("skip_tokens", skip_tokens)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < skip_tokens + 2:
        raise ValueError(
            f"input_ids must be one row of more than skip_tokens + 1 = {skip_tokens + 1} token ids, got "
            f"{tuple(input_ids.shape)}"
        )
    geometry, ropes = model_geometry(model.config), layer_ropes(model)
    layers = geometry.cached_layers
    unserved = [layer.describe() for layer in layers if not layer.is_attention]
    if unserved:
        raise ValueError(f"the transform codec codes attention KV only; {', '.join(unserved)} hold other state")
    tokens = input_ids.shape[1]
    cache = DynamicCache()  # no config: every layer keeps every token, sliding layers included
    input_ids = input_ids.to(input_device(model))
    for start in range(0, tokens, chunk):
        model(input_ids[:, start : start + chunk], use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
        if progress is not None:
            progress(min(chunk, tokens - start))
    if len(cache.layers) != len(layers):
        raise ValueError(f"the model cached {len(cache.layers)} layers, its geometry names {len(layers)} that cache KV")
    positions = torch.arange(skip_tokens, tokens)
    fitted: dict[str, list[Decorrelation]] = {kind: [] for kind in KINDS}
    for rope, cached in zip(ropes, cache.layers):
        for kind in KINDS:
            tensor = getattr(cached, kind)[0, :, skip_tokens:].float().cpu()
            features = rotate_to(rope, tensor, -positions, kind).transpose(0, 1).reshape(len(positions), -1)
            fitted[kind].append(Decorrelation.fit(features))
    features = geometry.cached_kv_sizes
    return CodecCalibration(
        tuple(fitted["keys"]), tuple(fitted["values"]), weights_digest(model), features, source, tokens
    )
