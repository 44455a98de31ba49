"""`generate_with_prefix_cache`: `model.generate` that restores a stored prompt prefix and saves new blocks."""

from collections.abc import Mapping
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from hf_kvcache.compat import CACHE_KWARG, pop_cache
from hf_kvcache.prefix.store import PrefixCache, prompt_tokens


class _PrefillRecorder:
    """Wraps `cache.update` to keep the first `tokens` key/value states each layer receives.

    These are the prompt's KV exactly as the model computed them (after RoPE, before any
    quantization or eviction by the cache), which is what the store saves.
    """

    def __init__(self, cache: Cache, tokens: int):
        self.cache, self.tokens = cache, tokens
        self.states: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def __enter__(self) -> "_PrefillRecorder":
        original = self.cache.update

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = self.states.setdefault(layer_idx, ([], []))
            wanted = self.tokens - sum(k.shape[-2] for k in keys)
            if wanted > 0:
                keys.append(key_states[..., :wanted, :])
                values.append(value_states[..., :wanted, :])
            return original(key_states, value_states, layer_idx, *args, **kwargs)

        self.cache.update = update
        return self

    def __exit__(self, *exc_info) -> None:
        del self.cache.update

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's recorded `(keys, values)`, or [] unless all layers saw all the tokens."""
        layers = [(torch.cat(k, dim=-2), torch.cat(v, dim=-2)) for _, (k, v) in sorted(self.states.items())]
        complete = sorted(self.states) == list(range(len(layers))) and layers
        return layers if complete and all(k.shape[-2] == self.tokens for k, _ in layers) else []


def _setting(model: PreTrainedModel, generate_kwargs: dict, name: str, default: Any) -> Any:
    """A generation setting as `generate` resolves it: the keyword, else the given or the model's config."""
    if name in generate_kwargs:
        return generate_kwargs[name]
    config = generate_kwargs.get("generation_config") or model.generation_config
    return getattr(config, name, default)


def _prompt(model: PreTrainedModel, inputs: Any, generate_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    if inputs is None:
        if "input_ids" not in generate_kwargs:
            raise ValueError("no prompt: pass inputs (token ids or a tokenizer output) or input_ids=")
        inputs = {
            "input_ids": generate_kwargs.pop("input_ids"),
            "attention_mask": generate_kwargs.pop("attention_mask", None),
        }
    if isinstance(inputs, Mapping):
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        input_ids, attention_mask = inputs, generate_kwargs.pop("attention_mask", None)
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    prompt_tokens(input_ids)  # refuses batches with a clear error
    if input_ids.shape[1] == 0:
        raise ValueError("inputs must hold at least one token")
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
        raise ValueError("attention_mask has padding (zeros): the prefix store takes one unpadded prompt")
    for name in ("num_beams", "num_return_sequences"):  # also when set in a generation config
        if (value := _setting(model, generate_kwargs, name, 1)) not in (None, 1):
            raise ValueError(f"{name}={value!r} is not supported with a prefix store; accepted: 1")
    if _setting(model, generate_kwargs, "use_cache", True) is False:
        raise ValueError("use_cache=False leaves nothing to restore or save; accepted: use_cache=True")
    for name in ("output_hidden_states", "output_attentions"):
        if _setting(model, generate_kwargs, name, False):
            raise ValueError(
                f"{name}=True is not supported with a prefix store: restored prompt tokens are not run through "
                "the model, so a hit would return them for the uncomputed tail only; call model.generate for them"
            )
    return input_ids, attention_mask


@torch.no_grad()
def generate_with_prefix_cache(
    model: PreTrainedModel, inputs: Any = None, store: PrefixCache | None = None, **generate_kwargs: Any
):
    """`model.generate(inputs, **generate_kwargs)`, reusing the prompt's longest stored prefix.

    Restores whole stored blocks of the prompt (always leaving at least one prompt token to compute,
    so generation starts from fresh logits), prefills the rest, generates, then saves the prompt's
    new complete blocks. With the default cache (a `DynamicCache`) greedy outputs match plain
    `generate` token for token. Pass an empty `cache=` (or `past_key_values=`) to generate into another cache, e.g.
    `hf_kvcache.QuantizedCache`: restored KV enters it through `update`, like a prefill in two chunks.

    `inputs`: one prompt, a `(1, length)` or `(length,)` tensor of ids, or a tokenizer output
    (`input_ids`, optional `attention_mask`; also accepted as keywords). Batches, padding, beam search and
    per-token outputs are refused, whether asked for by keyword or in a generation config.
    Returns what `model.generate` returns.
    """
    if not isinstance(store, PrefixCache):
        raise ValueError(f"store={store!r} must be a PrefixCache (e.g. PrefixCache(MemoryBackend()))")
    input_ids, attention_mask = _prompt(model, inputs, generate_kwargs)
    cache = pop_cache(generate_kwargs)
    if cache is None:
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    restored = store.restore(model, input_ids, cache, max_tokens=input_ids.shape[1] - 1)
    if attention_mask is not None:
        generate_kwargs["attention_mask"] = attention_mask
    with _PrefillRecorder(cache, input_ids.shape[1] - restored) as recorder:
        output = model.generate(input_ids=input_ids, **{CACHE_KWARG: cache}, **generate_kwargs)
    store.save(model, input_ids, recorder.layers(), start=restored, cache=cache)
    return output
